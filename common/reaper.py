"""Recovery of jobs whose worker died: expired leases are re-queued at the head, or failed.

A job's lease is its entry in RQ's started registry, renewed by its worker every second or so.
When the entry's expiry passes, the worker is gone (or wedged). Any process may reap: the
registry entry is claimed with ZREM, so two reapers never both re-queue one job.
"""
from __future__ import annotations

import logging
import time

import redis
from rq import Queue
from rq.job import Job, JobStatus
from rq.exceptions import NoSuchJobError
from rq.registry import FailedJobRegistry, StartedJobRegistry
from rq.serializers import JSONSerializer

from common import protocol
from common.schemas import ErrorEvent

log = logging.getLogger(__name__)


def reap_expired(connection: redis.Redis, queue: Queue, max_attempts: int) -> list[str]:
    """Re-queue (attempt + 1) or fail every job whose lease expired; returns the job ids handled."""
    registry = StartedJobRegistry(queue.name, connection, serializer=JSONSerializer)
    handled: list[str] = []
    for member in connection.zrangebyscore(registry.key, 0, time.time()):
        if connection.zrem(registry.key, member) != 1:
            continue  # another reaper claimed it
        job_id = registry.parse_job_id(member)
        try:
            job = Job.fetch(job_id, connection=connection, serializer=JSONSerializer)
        except NoSuchJobError:
            continue
        if job.get_status(refresh=False) != JobStatus.STARTED:
            continue
        attempt = int((job.meta or {}).get("attempt", 0)) + 1
        if attempt < max_attempts:
            job.meta["attempt"] = attempt
            job.save_meta()
            queue.enqueue_job(job, at_front=True)
            log.warning("job %s: lease expired; re-queued at the head (attempt %d)", job_id, attempt)
        else:
            _fail(connection, queue, job, attempt)
        handled.append(job_id)
    return handled


def _fail(connection: redis.Redis, queue: Queue, job: Job, attempts: int) -> None:
    reason = f"the worker running this job died {attempts} times (lease expired); giving up"
    log.error("job %s: %s", job.id, reason)
    payload = job.args[0] if job.args else {}
    event = ErrorEvent(job.id, attempts, "Incomplete generation", "incomplete_generation")
    data = protocol.encode_event(event)
    with connection.pipeline() as pipe:
        job.set_status(JobStatus.FAILED, pipeline=pipe)
        FailedJobRegistry(queue.name, connection, serializer=JSONSerializer).add(
            job, exc_string=reason, pipeline=pipe)
        pipe.set(protocol.result_key(job.id), data, ex=protocol.RESULT_TTL_S)
        if isinstance(payload, dict) and isinstance(payload.get("reply_to"), str):
            pipe.publish(payload["reply_to"], data)
        pipe.execute()

"""Recovery of jobs whose worker died: expired leases are re-queued at the head, or failed.

A job's lease is its entry in RQ's started registry, renewed by its worker every second or so.
When the entry's expiry passes, the worker is gone (or wedged). Any process may reap — every
worker does, and so does every API process, so a request whose only worker died still gets its
answer: the registry entry is claimed with ZREM, so two reapers never both re-queue one job.

How many runs a job gets is the setting of the worker that took it (`max_attempts` in the job's
meta, written when the worker takes it); `max_attempts` here is only the fallback.

A job popped off the queue (into RQ's intermediate list) by a worker that died before marking it
started has no lease: `reap_stranded` puts such a job back once it has sat there `stranded_after_s`,
and ends the taker's claim on it in the same transaction, so a taker that was only stalled finds
the job is no longer its own (`worker.rq_bookkeeping.CLAIMED_WRITES`).
"""
from __future__ import annotations

import logging
import time

import redis
from rq import Queue
from rq.job import Job, JobStatus
from rq.exceptions import NoSuchJobError
from rq.registry import FailedJobRegistry, StartedJobRegistry
from rq.defaults import DEFAULT_RESULT_TTL
from rq.results import Result
from rq.serializers import JSONSerializer
from rq.utils import now

from . import protocol
from .schemas import ErrorEvent, Event, FinalEvent

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
        ended = connection.get(protocol.result_key(job_id))
        if ended is not None:  # its worker published the job's end, then died before telling RQ
            _record_end(connection, queue, job, protocol.decode_event(ended))
            handled.append(job_id)
            continue
        meta = job.meta or {}
        attempt = int(meta.get("attempt", 0)) + 1
        if attempt < int(meta.get("max_attempts", max_attempts)):
            job.meta["attempt"] = attempt
            job.save_meta()
            queue.enqueue_job(job, at_front=True)
            log.warning("job %s: lease expired; re-queued at the head (attempt %d)", job_id, attempt)
        else:
            _fail(connection, queue, job, attempt)
        handled.append(job_id)
    return handled


def reap_stranded(connection: redis.Redis, queue: Queue, stranded_after_s: float = 10.0) -> list[str]:
    """Re-queue jobs left in RQ's intermediate list (popped, never started) for `stranded_after_s`."""
    handled: list[str] = []
    for raw_id in connection.lrange(queue.intermediate_queue_key, 0, -1):
        job_id = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
        status = connection.hget(Job.key_for(job_id), "status")
        if status is None:
            connection.lrem(queue.intermediate_queue_key, 1, raw_id)  # the job hash is gone
            continue
        if status.decode() != JobStatus.QUEUED.value:
            continue  # taken: its worker removes it from the list itself
        seen_key = protocol.stranded_key(job_id)
        connection.set(seen_key, time.time(), nx=True, ex=protocol.CANCEL_TTL_S)
        first_seen = float(connection.get(seen_key) or time.time())
        if time.time() - first_seen < stranded_after_s:
            continue
        with connection.pipeline() as pipe:  # one transaction: the taker's claim ends with the entry
            pipe.lrem(queue.intermediate_queue_key, 1, raw_id)
            pipe.delete(protocol.claim_key(job_id))
            removed, _ = pipe.execute()
        if removed != 1:
            continue  # another reaper (or the worker) got there first
        connection.delete(seen_key)
        job = Job.fetch(job_id, connection=connection, serializer=JSONSerializer)
        queue.enqueue_job(job, at_front=True)
        log.warning("job %s: popped by a worker that never started it; re-queued at the head", job_id)
        handled.append(job_id)
    return handled


def _record_end(connection: redis.Redis, queue: Queue, job: Job, event: Event) -> None:
    """Record in RQ the end its worker already published (and stored) but did not record."""
    log.warning("job %s: lease expired after its final event was published; recorded as ended, not re-run", job.id)
    with connection.pipeline() as pipe:
        if isinstance(event, FinalEvent):
            record_success(pipe, job, success_result(event))
        else:  # only final and error events are stored as results
            record_failure(pipe, queue, job, failure_reason(event) if isinstance(event, ErrorEvent) else "ended")
        pipe.execute()


def success_result(event: FinalEvent) -> dict[str, object]:
    """What RQ keeps as a finished tgq job's return value."""
    return {"generated_tokens": event.generated_tokens, "finish_reason": event.finish_reason.value}


def failure_reason(event: ErrorEvent) -> str:
    """What RQ keeps as a failed tgq job's reason."""
    return f"{event.error_type}: {event.message}"


def _fail(connection: redis.Redis, queue: Queue, job: Job, attempts: int) -> None:
    reason = f"the worker running this job died {attempts} times (lease expired); giving up"
    log.error("job %s: %s", job.id, reason)
    payload = job.args[0] if job.args else {}
    event = ErrorEvent(job.id, attempts, "Incomplete generation", "incomplete_generation")
    data = protocol.encode_event(event)
    with connection.pipeline() as pipe:
        record_failure(pipe, queue, job, reason)
        pipe.set(protocol.result_key(job.id), data, ex=protocol.RESULT_TTL_S)
        if isinstance(payload, dict) and isinstance(payload.get("reply_to"), str):
            pipe.publish(payload["reply_to"], data)
        pipe.execute()


def record_failure(pipe: redis.client.Pipeline, queue: Queue, job: Job, reason: str) -> None:
    """Mark a job that has no running execution failed in RQ, with `reason` as what `rq info`,
    rq-dashboard and job.latest_result() show."""
    job.set_status(JobStatus.FAILED, pipeline=pipe)
    FailedJobRegistry(queue.name, queue.connection, serializer=JSONSerializer).add(
        job, ttl=job.failure_ttl, exc_string=reason, pipeline=pipe)
    Result.create_failure(job, job.failure_ttl, exc_string=reason, pipeline=pipe)


def record_success(pipe: redis.client.Pipeline, job: Job, result: dict[str, object]) -> None:
    """Mark a job that has no running execution finished in RQ, with `result` as its return value."""
    ttl = job.result_ttl if job.result_ttl is not None else DEFAULT_RESULT_TTL
    job.ended_at = now()
    job._result = result
    job._handle_success(ttl, pipeline=pipe)
    job.cleanup(ttl, pipeline=pipe, remove_from_queue=False)

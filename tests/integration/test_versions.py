"""Rolling upgrades: APIs and workers one protocol version apart interoperate (real Redis, real RQ).

The previous release is `tests.support.v1_codec`, a frozen copy of its wire codec: one event per
message, jobs without "v"."""
from __future__ import annotations

import time
import uuid

import pytest
import redis
from rq import Queue
from rq.job import Job, JobStatus
from rq.registry import FailedJobRegistry
from rq.serializers import JSONSerializer

from api.core.replies import ReplyHub
from common import protocol
from common.schemas import JOB_VERSION, FinalEvent, FinishReason, GenerationJob, SamplingParams, StoppingParams, Token, TokenEvent
from tests.support import v1_codec
from worker.rq_worker import BatchWorker, RedisJobs

pytestmark = pytest.mark.integration


def new_job(reply_to: str) -> GenerationJob:
    return GenerationJob(request_id=uuid.uuid4().hex, input_ids=(1, 2, 3), sampling=SamplingParams(seed=7),
                         stopping=StoppingParams(max_new_tokens=2), reply_to=reply_to, enqueued_at=time.time())


def make_jobs(conn: redis.Redis) -> tuple[Queue, RedisJobs]:
    queue = Queue(protocol.queue_name("m"), connection=conn, serializer=JSONSerializer)
    worker = BatchWorker([queue], connection=conn, name=f"w-{uuid.uuid4().hex[:6]}", serializer=JSONSerializer)
    worker.register_birth()
    return queue, RedisJobs(conn, worker, queue, "m")


def final(job: GenerationJob) -> FinalEvent:
    return FinalEvent(job.request_id, 0, 1, Token(5, "z", -0.2, False), "yz", FinishReason.LENGTH, 2, None,
                      time.time(), time.time())


def subscribed(conn: redis.Redis, channel: str):
    sub = conn.pubsub()
    sub.subscribe(channel)
    assert sub.get_message(timeout=1)["type"] == "subscribe"
    return sub


def test_a_new_worker_answers_an_old_api_in_its_own_layout(conn):
    """An old API's job (no "v", no presence key) is run, and answered one v1 event per message."""
    queue, jobs = make_jobs(conn)
    job = new_job(protocol.reply_channel("old-api"))
    queue.enqueue_call(func=protocol.JOB_FUNC, args=[v1_codec.job_dict(job)], job_id=job.request_id)
    sub = subscribed(conn, job.reply_to)
    [taken] = jobs.fetch(4)
    assert taken.request_id == job.request_id and taken.version == 1
    events = [TokenEvent(job.request_id, 0, 0, Token(4, "y", -0.1, False)), final(taken)]
    assert jobs.step_done(events, [taken]) == set()
    got = [v1_codec.decode_event(sub.get_message(timeout=1)["data"]) for _ in events]
    assert got == events
    assert v1_codec.decode_event(conn.get(protocol.result_key(job.request_id))) == events[1]  # an old reader's too


def test_a_new_api_reads_an_old_workers_events_and_a_new_workers_steps(conn):
    hub = ReplyHub(conn)
    try:
        q = hub.register(["a", "b"])
        old = [TokenEvent("a", 0, 0, Token(4, "y", -0.1, False)), TokenEvent("a", 0, 1, Token(5, "z", -0.1, False))]
        for event in old:  # an old worker: one v1 message per event
            conn.publish(hub.channel, v1_codec.encode_event(event))
        new = [TokenEvent("b", 0, 0, Token(6, "w", -0.3, False)), TokenEvent("a", 0, 2, Token(7, "v", -0.1, False))]
        conn.publish(hub.channel, protocol.encode_step(new))  # a new worker: the step in one message
        assert [q.get(timeout=2) for _ in range(4)] == old + new
        assert conn.exists(hub.presence)  # what new workers check before they start a job of this process
    finally:
        hub.close()
    assert not conn.exists(hub.presence)


def test_a_job_newer_than_the_worker_is_failed_with_a_clear_error(conn):
    queue, jobs = make_jobs(conn)
    job = new_job(protocol.reply_channel("newer-api"))
    conn.set(protocol.presence_key(job.reply_to), b"1", ex=60)
    queue.enqueue_call(func=protocol.JOB_FUNC, args=[{**job.to_dict(), "v": JOB_VERSION + 1}], job_id=job.request_id)
    sub = subscribed(conn, job.reply_to)
    assert jobs.fetch(4) == []
    [error] = protocol.decode_message(sub.get_message(timeout=1)["data"])
    assert "newer than this worker runs" in error.message and "upgrade the worker" in error.message
    assert job.request_id in FailedJobRegistry(queue=queue).get_job_ids()


def test_a_late_presence_key_does_not_cancel_a_subscribed_api_processes_jobs(conn):
    """An overloaded API process can renew its presence key late; while it is still subscribed to its
    reply channel, its queued jobs run (the fleet simulation cancelled such jobs before PUBSUB NUMSUB)."""
    queue, jobs = make_jobs(conn)
    job = new_job(protocol.reply_channel("late-api"))
    sub = subscribed(conn, job.reply_to)  # listening, but no presence key
    queue.enqueue_call(func=protocol.JOB_FUNC, args=[job.to_dict()], job_id=job.request_id)
    assert [j.request_id for j in jobs.fetch(4)] == [job.request_id]
    sub.close()


def test_queued_jobs_of_a_dead_api_process_are_canceled_not_run(conn):
    queue, jobs = make_jobs(conn)
    alive, dead = new_job(protocol.reply_channel("alive")), new_job(protocol.reply_channel("dead"))
    conn.set(protocol.presence_key(alive.reply_to), b"1", ex=60)
    for job in (alive, dead):
        queue.enqueue_call(func=protocol.JOB_FUNC, args=[job.to_dict()], job_id=job.request_id)
    assert [j.request_id for j in jobs.fetch(4)] == [alive.request_id]
    rq_job = Job.fetch(dead.request_id, connection=conn, serializer=JSONSerializer)
    assert rq_job.get_status() == JobStatus.CANCELED

"""The worker's Redis side against a real redis-server: leases, registries, cancel, reaping."""
from __future__ import annotations

import time
import uuid
import zlib

import orjson
import pytest
import redis
from rq import Queue
from rq.job import Job, JobStatus
from rq.registry import (CanceledJobRegistry, FailedJobRegistry, FinishedJobRegistry,
                         StartedJobRegistry)
from rq.serializers import JSONSerializer

from common import protocol
from common.schemas import (FinalEvent, FinishReason, GenerationJob, SamplingParams,
                            StoppingParams, Token, TokenEvent)
from common.reaper import reap_expired, reap_stranded
from worker.rq_worker import BatchWorker, RedisJobs

pytestmark = pytest.mark.integration


def enqueue(conn, queue, reply_to="tgq:reply:test") -> GenerationJob:
    job = GenerationJob(request_id=uuid.uuid4().hex, input_ids=(1, 2, 3), sampling=SamplingParams(seed=7),
                        stopping=StoppingParams(max_new_tokens=2), reply_to=reply_to, enqueued_at=time.time())
    conn.set(protocol.presence_key(reply_to), b"1", ex=protocol.PRESENCE_TTL_S)  # its API process is alive
    queue.enqueue_call(func=protocol.JOB_FUNC, args=[job.to_dict()], job_id=job.request_id)
    return job


def make_jobs(conn, name="w1", lease_ttl=15):
    queue = Queue(protocol.queue_name("m"), connection=conn, serializer=JSONSerializer)
    worker = BatchWorker([queue], connection=conn, name=name, serializer=JSONSerializer)
    worker.lease_ttl = lease_ttl
    worker.register_birth()
    return queue, worker, RedisJobs(conn, worker, queue, "m", max_attempts=2)


def final(job: GenerationJob) -> FinalEvent:
    return FinalEvent(job.request_id, 0, 1, Token(5, "x", -0.5, False), "yx", FinishReason.LENGTH, 2,
                      None, time.time(), time.time())


def test_payload_is_json_not_pickle(conn):
    queue, _, _ = make_jobs(conn)
    job = enqueue(conn, queue)
    raw = zlib.decompress(conn.hget(f"rq:job:{job.request_id}", "data"))  # RQ compresses the field
    func, _, args, kwargs = orjson.loads(raw)  # JSON inside, never pickle
    assert func == protocol.JOB_FUNC and args == [job.to_dict()] and kwargs == {}


def test_fetch_publish_finish_moves_the_job_through_rq(conn):
    queue, worker, jobs = make_jobs(conn)
    job = enqueue(conn, queue)
    sub = conn.pubsub()
    sub.subscribe(job.reply_to)
    assert sub.get_message(timeout=1)["type"] == "subscribe"
    [taken] = jobs.fetch(4)
    assert taken == job
    assert Job.fetch(job.request_id, connection=conn, serializer=JSONSerializer).get_status() == JobStatus.STARTED
    assert job.request_id in StartedJobRegistry(queue=queue).get_job_ids()
    events = [TokenEvent(job.request_id, 0, 0, Token(4, "y", -0.1, False)), final(job)]
    assert jobs.step_done(events, []) == set()
    got = sub.get_message(timeout=1)  # the step's events for this API process: one message
    assert protocol.decode_message(got["data"]) == events
    assert sub.get_message(timeout=0.2) is None
    assert protocol.decode_event(conn.get(protocol.result_key(job.request_id))) == events[1]
    jobs.finished([(job, events[1])])
    assert job.request_id in FinishedJobRegistry(queue=queue).get_job_ids()
    assert job.request_id not in StartedJobRegistry(queue=queue).get_job_ids()


def test_cancel_flag_is_reported_and_the_job_lands_in_canceled(conn):
    queue, worker, jobs = make_jobs(conn)
    _, b = enqueue(conn, queue), enqueue(conn, queue)
    taken = jobs.fetch(4)
    conn.set(protocol.cancel_key(b.request_id), 1)
    assert jobs.step_done([], taken) == {b.request_id}
    jobs.finished([(b, None)])
    assert b.request_id in CanceledJobRegistry(queue=queue).get_job_ids()


def test_a_job_cancelled_while_queued_is_never_run(conn):
    queue, worker, jobs = make_jobs(conn)
    job = enqueue(conn, queue)
    conn.set(protocol.cancel_key(job.request_id), 1)
    assert jobs.fetch(4) == []
    assert Job.fetch(job.request_id, connection=conn, serializer=JSONSerializer).get_status() == JobStatus.CANCELED


def test_give_back_puts_jobs_at_the_head(conn):
    queue, worker, jobs = make_jobs(conn)
    first = enqueue(conn, queue)
    [taken] = jobs.fetch(1)
    later = enqueue(conn, queue)
    jobs.give_back([taken])
    assert queue.get_job_ids() == [first.request_id, later.request_id]


def test_expired_lease_is_requeued_then_failed_with_an_error_event(conn):
    queue, worker, jobs = make_jobs(conn, lease_ttl=2)
    job = enqueue(conn, queue)
    jobs.fetch(1)  # this "worker" now dies: no renewals
    time.sleep(2.2)
    assert reap_expired(conn, queue, max_attempts=2) == [job.request_id]
    assert queue.get_job_ids() == [job.request_id]
    jobs.wait(1)  # what an idle engine does before it fetches
    [rerun] = jobs.fetch(1)
    assert rerun.attempt == 1
    sub = conn.pubsub()
    sub.subscribe(job.reply_to)
    sub.get_message(timeout=1)
    time.sleep(2.2)
    assert reap_expired(conn, queue, max_attempts=2) == [job.request_id]
    event = protocol.decode_event(sub.get_message(timeout=1)["data"])
    assert event.error_type == "incomplete_generation"
    assert job.request_id in FailedJobRegistry(queue=queue).get_job_ids()
    assert reap_expired(conn, queue, max_attempts=2) == []


def test_a_job_whose_end_was_published_is_recorded_not_rerun(conn):
    """A worker that dies between publishing a job's final event and recording it in RQ: the reaper
    records the stored end instead of running the job a second time."""
    queue, worker, jobs = make_jobs(conn, lease_ttl=2)
    job = enqueue(conn, queue)
    [taken] = jobs.fetch(1)
    assert jobs.step_done([final(taken)], [taken]) == set()  # ... and the worker dies here
    time.sleep(2.2)
    assert reap_expired(conn, queue, max_attempts=2) == [job.request_id]
    assert queue.get_job_ids() == []
    rq_job = Job.fetch(job.request_id, connection=conn, serializer=JSONSerializer)
    assert rq_job.get_status() == JobStatus.FINISHED
    assert rq_job.latest_result().return_value == {"generated_tokens": 2, "finish_reason": "length"}
    assert job.request_id in FinishedJobRegistry(queue=queue).get_job_ids()


def status_of(conn, job_id: str) -> JobStatus:
    return Job.fetch(job_id, connection=conn, serializer=JSONSerializer).get_status()


def test_a_worker_stalled_between_take_and_start_leaves_a_rescued_job_alone(conn):
    """Taking jobs is two round trips. A worker stopped between them finds, when it resumes, that a
    reaper put the job back and another worker ran it: it must not mark it started or run it again."""
    queue, _, stalled = make_jobs(conn, name="stalled")
    _, _, healthy = make_jobs(conn, name="healthy")
    job = enqueue(conn, queue)
    taken = stalled._take(1)  # ... and the worker stops here
    assert conn.get(protocol.claim_key(job.request_id)) == b"stalled"
    assert reap_stranded(conn, queue, stranded_after_s=0) == [job.request_id]
    assert conn.get(protocol.claim_key(job.request_id)) is None
    [rerun] = healthy.fetch(1)
    healthy.step_done([final(rerun)], [rerun])
    healthy.finished([(rerun, final(rerun))])
    assert status_of(conn, job.request_id) == JobStatus.FINISHED
    assert stalled._start(taken) == []  # resumed: the claim is gone, so nothing is written
    assert status_of(conn, job.request_id) == JobStatus.FINISHED
    assert StartedJobRegistry(queue=queue).get_job_ids() == []
    assert stalled.held == {} and stalled.worker.executions == {}
    assert conn.lrange(queue.intermediate_queue_key, 0, -1) == []


def test_a_job_popped_by_a_stalled_wait_is_taken_by_one_worker_only(conn):
    """A blocking wait pops a job before any claim; if a reaper hands it back meanwhile, whichever
    worker claims it first runs it, and the other drops its stale copy."""
    queue, _, stalled = make_jobs(conn, name="stalled")
    _, _, healthy = make_jobs(conn, name="healthy")
    job = enqueue(conn, queue)
    stalled.wait(1)  # popped to RQ's intermediate queue; then the worker stops
    assert reap_stranded(conn, queue, stranded_after_s=0) == [job.request_id]
    healthy.wait(1)  # the other worker pops it in turn
    assert [j.request_id for j in stalled.fetch(1)] == [job.request_id]  # resumed first: it claims it
    assert healthy.fetch(1) == []
    assert status_of(conn, job.request_id) == JobStatus.STARTED
    assert conn.lrange(queue.intermediate_queue_key, 0, -1) == []
    assert conn.get(protocol.claim_key(job.request_id)) is None  # a started job has a lease, not a claim


def test_taking_and_publishing_survive_redis_losing_its_script_cache(conn):
    """After a Redis restart the scripts are gone: the worker loads them again and goes on."""
    queue, _, jobs = make_jobs(conn)
    first = enqueue(conn, queue)
    [taken] = jobs.fetch(1)  # both scripts loaded and used once
    assert jobs.step_done([TokenEvent(taken.request_id, 0, 0, Token(4, "y", -0.1, False))], [taken]) == set()
    conn.script_flush()
    second = enqueue(conn, queue)
    jobs.step_done([], [taken])  # reads the queue length: a job waits
    assert [j.request_id for j in jobs.fetch(1)] == [second.request_id]
    sub = conn.pubsub()
    sub.subscribe(first.reply_to)
    sub.get_message(timeout=1)
    end = final(taken)
    assert jobs.step_done([end], [taken]) == set()
    assert protocol.decode_message(sub.get_message(timeout=1)["data"]) == [end]


def test_jobs_taken_but_not_started_are_taken_again_by_the_same_worker(conn):
    """What a Redis error between take and start leaves: jobs claimed by this worker, kept for the retry."""
    queue, _, jobs = make_jobs(conn)
    job = enqueue(conn, queue)
    jobs._take(1)  # claimed; the start never happened
    jobs._stash = [job.request_id]  # what _fetch keeps when the start fails on a Redis error
    assert [j.request_id for j in jobs.fetch(1)] == [job.request_id]
    assert status_of(conn, job.request_id) == JobStatus.STARTED
    assert conn.lrange(queue.intermediate_queue_key, 0, -1) == []


def test_a_duplicate_queue_entry_of_a_claimed_job_is_dropped(conn):
    queue, _, first = make_jobs(conn, name="first")
    _, _, second = make_jobs(conn, name="second")
    job = enqueue(conn, queue)
    taken = first._take(1)
    conn.rpush(queue.key, job.request_id)  # the same id queued again while it is claimed
    assert second.fetch(1) == []
    assert [j.request_id for j in first._start(taken)] == [job.request_id]
    assert conn.llen(queue.key) == 0 and conn.lrange(queue.intermediate_queue_key, 0, -1) == []


class CountingConnection(redis.Connection):
    """A real connection that counts its sends: a command or a whole pipeline is one send."""
    sends = 0

    def send_packed_command(self, command, check_health=True):
        CountingConnection.sends += 1
        super().send_packed_command(command, check_health)


def counted(fn) -> int:
    before = CountingConnection.sends
    fn()
    return CountingConnection.sends - before


@pytest.mark.parametrize("n", [1, 24])
def test_round_trips_per_step_do_not_grow_with_the_batch(redis_url, n):
    """Taking n jobs costs 3 round trips (take, check their API processes are alive, start), a step
    publishing 2 events per row 1, retiring all n 1."""
    pool = redis.ConnectionPool.from_url(redis_url, connection_class=CountingConnection)
    conn = redis.Redis(connection_pool=pool)
    queue = Queue(protocol.queue_name("m"), connection=conn, serializer=JSONSerializer)
    worker = BatchWorker([queue], connection=conn, name=f"counted-{n}", serializer=JSONSerializer)
    worker.register_birth()
    jobs = RedisJobs(conn, worker, queue, "m", reap_every_s=3600)
    enqueue(conn, queue)  # first use loads the Lua scripts: not what is measured
    [warm_job] = jobs.fetch(1)
    jobs.step_done([final(warm_job)], [])
    jobs.finished([(warm_job, final(warm_job))])

    batch = [enqueue(conn, queue) for _ in range(n)]
    jobs.step_done([], [])  # an idle step sees the queue length
    taken: list[GenerationJob] = []
    assert counted(lambda: taken.extend(jobs.fetch(n))) == 3
    assert taken == batch
    events = [e for j in taken for e in (TokenEvent(j.request_id, 0, 0, Token(4, "y", -0.1, False)), final(j))]
    assert counted(lambda: jobs.step_done(events, taken)) == 1
    assert counted(lambda: jobs.finished([(j, final(j)) for j in taken])) == 1

    ids = {j.request_id for j in batch}
    assert ids <= set(FinishedJobRegistry(queue=queue).get_job_ids())
    assert StartedJobRegistry(queue=queue).get_job_ids() == []
    assert queue.get_job_ids() == [] and conn.llen(queue.intermediate_queue_key) == 0
    for rid in ids:
        rq_job = Job.fetch(rid, connection=conn, serializer=JSONSerializer)
        assert rq_job.get_status() == JobStatus.FINISHED
        assert rq_job.latest_result().return_value == {"generated_tokens": 2, "finish_reason": "length"}
    worker.refresh()
    assert worker.successful_job_count == n + 1
    pool.disconnect()

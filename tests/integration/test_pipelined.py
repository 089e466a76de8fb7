"""PipelinedJobs: the step round trip runs on a helper thread, in order, one step in flight."""
from __future__ import annotations

import pytest
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from common import protocol
from common.schemas import Token, TokenEvent
from worker.pipelined import PipelinedJobs

from .test_rq_bookkeeping import enqueue, final, make_jobs

pytestmark = pytest.mark.integration


def token(job, index: int) -> TokenEvent:
    return TokenEvent(job.request_id, 0, index, Token(4, "y", -0.1, False))


def test_events_go_out_in_step_order_and_the_final_before_rq_records_it(conn):
    queue, _, jobs = make_jobs(conn)
    io = PipelinedJobs(jobs)
    job = enqueue(conn, queue)
    sub = conn.pubsub()
    sub.subscribe(job.reply_to)
    assert sub.get_message(timeout=1)["type"] == "subscribe"
    [taken] = io.fetch(4)
    for i in range(20):
        io.step_done([token(taken, i)], [taken])
    io.step_done([final(taken)], [])
    io.finished([(taken, final(taken))])
    io.close()
    got = [e for _ in range(21) for e in protocol.decode_message(sub.get_message(timeout=1)["data"])]
    assert [e.index for e in got] == list(range(20)) + [final(taken).index]
    rq_job = Job.fetch(job.request_id, connection=conn, serializer=JSONSerializer)
    assert rq_job.get_status() == JobStatus.FINISHED


def test_a_cancel_flag_is_reported_by_the_next_step(conn):
    queue, _, jobs = make_jobs(conn)
    io = PipelinedJobs(jobs)
    _, b = enqueue(conn, queue), enqueue(conn, queue)
    taken = io.fetch(4)
    conn.set(protocol.cancel_key(b.request_id), 1)
    assert io.step_done([], taken) == set()  # the flag is read by this step's round trip ...
    assert io.step_done([], taken) == {b.request_id}  # ... and reported when the next step hands over
    assert io.drain() == {b.request_id}
    io.close()


def test_an_error_on_the_helper_thread_reaches_the_engine(conn):
    queue, _, jobs = make_jobs(conn)
    io = PipelinedJobs(jobs)
    enqueue(conn, queue)
    taken = io.fetch(4)
    io.step_done([], [None])  # not a job: the helper's step fails
    with pytest.raises(AttributeError):
        io.step_done([], taken)
    io.close()

"""Faults done for real (SIGKILL, SIGSTOP, SIGTERM, clients that leave, deadlines) against a real
redis-server, real `tgq worker` processes (tiny model) and a real `tgq api` (gunicorn, gevent)."""
from __future__ import annotations

import concurrent.futures as cf
import signal
import time

import pytest
import redis
import requests
from rq.job import Job, JobStatus
from rq.registry import CanceledJobRegistry, FailedJobRegistry, FinishedJobRegistry, StartedJobRegistry

from common import protocol
from common.schemas import ErrorEvent, FinalEvent, TokenEvent
from tests.support.processes import start_worker, wait_worker_ready

from .conftest import MODEL_ID, make_stack
from .faults import ReplyTap, rq_queue, wait_for
from .sse import stream_events

pytestmark = pytest.mark.integration

LONG = {"max_new_tokens": 1400}  # ~3.5 s for one row of the tiny model on one thread
INCOMPLETE = {"error": "Incomplete generation", "error_type": "incomplete_generation"}


@pytest.fixture
def redis_url(redis_server):
    redis.Redis.from_url(redis_server.url).flushall()
    return redis_server.url


@pytest.fixture
def tap(redis_url):
    t = ReplyTap(redis.Redis.from_url(redis_url))
    yield t
    t.close()


def job(client: redis.Redis, rid: str) -> Job:
    return Job.fetch(rid, connection=client, serializer=rq_queue(client).serializer)


def test_killed_on_its_last_attempt_answers_500_and_fails_the_job(redis_url, tiny_model_dir, tap):
    """--max-attempts 1, the only worker SIGKILLed mid-generation: the API's own lease sweep
    answers both requests within seconds, and RQ's failed registry says why."""
    stack = make_stack(redis_url, tiny_model_dir, workers=0)
    try:
        worker = stack.add_worker("--max-attempts", "1", "--lease-ttl", "2")
        body = {"inputs": "doomed", "parameters": LONG}
        with cf.ThreadPoolExecutor(2) as pool:
            plain = pool.submit(requests.post, stack.url + "/generate", json=body, timeout=60)
            streamed = pool.submit(stream_events, stack.url + "/generate_stream", body, 60)
            rids = wait_for(lambda: len(tap.request_ids()) == 2 and tap.request_ids(), 30, "both jobs running")
            worker.kill_group(signal.SIGKILL)
            killed = time.monotonic()
            resp = plain.result()
            _, events, _ = streamed.result()
            answered_in = time.monotonic() - killed
        assert resp.status_code == 500 and resp.json() == INCOMPLETE
        assert events[-1] == INCOMPLETE and all("token" in e for e in events[:-1])
        assert answered_in < 12, answered_in  # lease 2 s + a sweep every 2 s, with slack
        failed = FailedJobRegistry(queue=rq_queue(stack.redis)).get_job_ids()
        for rid in rids:
            assert rid in failed
            j = job(stack.redis, rid)
            assert j.get_status() == JobStatus.FAILED
            assert "lease expired" in j.latest_result().exc_string
        assert StartedJobRegistry(queue=rq_queue(stack.redis)).get_job_ids() == []
    finally:
        stack.stop()


def test_client_that_leaves_mid_generation_frees_its_row_within_a_step(redis_url, tiny_model_dir, tap):
    stack = make_stack(redis_url, tiny_model_dir, workers=1)
    try:
        client = stack.redis
        # non-stream: the client gives up after 1 s (closes its socket)
        with pytest.raises(requests.exceptions.ReadTimeout):
            requests.post(stack.url + "/generate", json={"inputs": "impatient", "parameters": LONG},
                          timeout=(5, 1.0))
        # stream: the client reads one token and hangs up
        resp = requests.post(stack.url + "/generate_stream", json={"inputs": "bored", "parameters": LONG},
                             stream=True, timeout=30)
        next(line for line in resp.iter_lines() if line.startswith(b"data:"))
        resp.close()
        rids = tap.request_ids()
        assert len(rids) == 2
        # the worker's current batch size, refreshed each step (see common.protocol)
        [batch_key] = list(client.scan_iter(protocol.worker_batch_pattern(MODEL_ID)))
        canceled = CanceledJobRegistry(queue=rq_queue(client))
        wait_for(lambda: set(rids) <= set(canceled.get_job_ids()), 10, "both jobs in the canceled registry")
        for rid in rids:
            assert client.exists(protocol.cancel_key(rid))
            assert not client.exists(protocol.result_key(rid))  # never finished
            # dropped within a step of the flag: no final event, and far fewer tokens than asked for
            events = tap.of(rid)
            assert not any(isinstance(e, (FinalEvent, ErrorEvent)) for e in events)
            assert len(events) < LONG["max_new_tokens"]
        wait_for(lambda: client.get(batch_key) == b"0", 5, "the worker's batch to be empty")
        metrics = requests.get(stack.url + "/metrics", timeout=10).text
        dropped = [line for line in metrics.splitlines() if line.startswith('tgi_request_failure{err="dropped"}')]
        assert dropped and float(dropped[0].rsplit(" ", 1)[1]) == 2.0, dropped
        # the freed slots serve the next request
        ok = requests.post(stack.url + "/generate", json={"inputs": "next", "parameters": {"max_new_tokens": 5}},
                           timeout=30)
        assert ok.status_code == 200
    finally:
        stack.stop()


def test_cancel_flag_stops_the_row_within_one_step(redis_url, tiny_model_dir, tap):
    """Set a running job's cancel flag (as the API does) and count what the worker publishes after."""
    stack = make_stack(redis_url, tiny_model_dir, workers=1)
    try:
        with cf.ThreadPoolExecutor(1) as pool:
            pending = pool.submit(requests.post, stack.url + "/generate",
                                  json={"inputs": "stop me", "parameters": LONG}, timeout=(5, 4))
            [rid] = wait_for(lambda: tap.request_ids(), 30, "the job to start")
            tap.cancel_marked(rid)
            wait_for(lambda: rid in CanceledJobRegistry(queue=rq_queue(stack.redis)).get_job_ids(), 10,
                     "the row to be dropped")
            wait_for(tap.marked, 5, "the marker")
            after = tap.after_marker(rid)
            # at most the step that read the flag and the step whose EXISTS ran just before the SET
            assert len(after) <= 2, after
            assert all(isinstance(e, TokenEvent) for e in after)
            with pytest.raises(requests.exceptions.ReadTimeout):
                pending.result()  # nothing more comes: the client gives up
    finally:
        stack.stop()

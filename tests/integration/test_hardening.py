"""Faults done for real (SIGKILL, SIGSTOP, SIGTERM, clients that leave, deadlines) against a real
redis-server, real `tgq worker` processes (tiny model) and a real `tgq api` (gunicorn, gevent)."""
from __future__ import annotations

import concurrent.futures as cf
import json
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
        # the tap is a subscriber of its own: it may see the stream's first token after the client did
        rids = wait_for(lambda: tap.request_ids() if len(tap.request_ids()) == 2 else None, 5, "both jobs' events")
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


def test_queued_jobs_of_departed_or_expired_clients_are_never_run(redis_url, tiny_model_dir, tap):
    """No worker yet. Four requests wait in the queue: a non-stream client that gives up, a stream
    client that hangs up, and one of each that outlives --request-timeout (documented 500 /
    error event). Then a worker starts: it must run none of them and publish nothing for them."""
    stack = make_stack(redis_url, tiny_model_dir, workers=0, api_args=("--request-timeout", "6"))
    try:
        client = stack.redis
        body = {"inputs": "waiting", "parameters": {"max_new_tokens": 5}}

        def flagged() -> list[str]:
            return [r for r in rq_queue(client).get_job_ids() if client.exists(protocol.cancel_key(r))]

        started = time.monotonic()
        with cf.ThreadPoolExecutor(4) as pool:
            expired = pool.submit(requests.post, stack.url + "/generate", json=body, timeout=30)
            expired_stream = pool.submit(stream_events, stack.url + "/generate_stream", body, 30)
            with pytest.raises(requests.exceptions.ReadTimeout):
                requests.post(stack.url + "/generate", json=body, timeout=(5, 1.0))
            resp = requests.post(stack.url + "/generate_stream", json=body, stream=True, timeout=30)
            assert resp.status_code == 200  # headers come at once, before any token
            resp.close()
            # the two departed clients are noticed within ~1 s each, well before the 6 s deadline
            wait_for(lambda: len(flagged()) == 2, 3, "the departed clients' cancel flags")
            assert time.monotonic() - started < 5
            plain, (_, events, _) = expired.result(), expired_stream.result()
        assert plain.status_code == 500 and plain.json() == INCOMPLETE
        assert events == [INCOMPLETE]
        assert 6 <= time.monotonic() - started < 12  # answered at the deadline, not left hanging
        rids = rq_queue(client).get_job_ids()
        assert len(rids) == 4
        wait_for(lambda: len(flagged()) == 4, 5, "all four cancel flags")

        stack.add_worker()
        canceled = CanceledJobRegistry(queue=rq_queue(client))
        wait_for(lambda: set(rids) <= set(canceled.get_job_ids()), 20, "the worker to cancel all four")
        for rid in rids:
            assert job(client, rid).started_at is None  # never marked started
            assert not client.exists(protocol.result_key(rid))
        assert tap.request_ids() == []  # not one event for any of them
        ok = requests.post(stack.url + "/generate", json=body, timeout=30)
        assert ok.status_code == 200
    finally:
        stack.stop()


def test_stopped_worker_is_reaped_and_harmless_after_sigcont(redis_url, tiny_model_dir, tap):
    """Two workers, 2 s leases. SIGSTOP one mid-generation: its jobs are re-run by the other and
    every request completes with the right text. SIGCONT: the stale worker drops the rows it no
    longer owns (publishes nothing, leaves RQ alone) and then serves new requests."""
    stack = make_stack(redis_url, tiny_model_dir, workers=0)
    try:
        client = stack.redis
        # the healthy worker's leases are longer, so CPU contention on a shared box cannot get it reaped
        for name, lease in (("stuck", "2"), ("healthy", "6")):
            stack.workers.append(start_worker(stack.redis_url, stack.model, "--model-id", MODEL_ID,
                                              "--lease-ttl", lease, "--max-batch-size", "4", "--name", name))
        wait_worker_ready(client, stack.workers)
        stuck, healthy = stack.workers
        params = {"max_new_tokens": 600, "details": True}
        expected = requests.post(stack.url + "/generate", json={"inputs": "the same", "parameters": params},
                                 timeout=60).json()["generated_text"]
        queue = rq_queue(client)
        before = set(tap.request_ids())

        def held_by(name: str) -> list[str]:
            return [r for r in StartedJobRegistry(queue=queue).get_job_ids() if job(client, r).worker_name == name]

        body = {"inputs": "the same", "parameters": params}
        with cf.ThreadPoolExecutor(8) as pool:
            plain = [pool.submit(requests.post, stack.url + "/generate", json=body, timeout=90) for _ in range(4)]
            streams = [pool.submit(stream_events, stack.url + "/generate_stream", body, 90) for _ in range(4)]
            victims = wait_for(lambda: len(held_by("healthy")) > 0 and held_by("stuck"), 30, "both workers busy")
            stuck.send(signal.SIGSTOP)
            results = [f.result() for f in plain]
            streamed = [f.result()[1] for f in streams]
        assert all(r.status_code == 200 for r in results), [r.text for r in results]
        assert all(r.json()["generated_text"] == expected for r in results)
        for events in streamed:
            assert "error" not in events[-1], events[-1]
            assert "".join(e["token"]["text"] for e in events) == expected  # each token exactly once
            assert events[-1]["details"]["generated_tokens"] == len(events)
        for rid in victims:  # RQ hears of the end just after the final event is published
            wait_for(lambda rid=rid: job(client, rid).get_status() == JobStatus.FINISHED, 10, "RQ to record the re-run")
            j = job(client, rid)
            assert j.meta["attempt"] == 1 and j.worker_name == "healthy"
        ours = set(tap.request_ids()) - before
        stored = {rid: protocol.decode_event(client.get(protocol.result_key(rid))) for rid in ours}

        published = len(tap.events)
        stuck.send(signal.SIGCONT)
        wait_for(lambda: "lease lost" in stuck.output(), 20, "the stale worker to notice its lost leases")
        for rid in victims:  # nothing more from the stale attempt, and RQ's record is unchanged
            assert all(e.attempt == 1 for e in tap.of(rid)[-1:])
            assert job(client, rid).get_status() == JobStatus.FINISHED
        assert all(e.attempt >= 1 for _, e in tap.events[published:] if e is not None and e.request_id in victims)
        assert {rid: protocol.decode_event(client.get(protocol.result_key(rid))) for rid in ours} == stored
        wait_for(lambda: set(FinishedJobRegistry(queue=queue).get_job_ids()) >= ours, 10, "every job finished")
        assert StartedJobRegistry(queue=queue).get_job_ids() == []
        assert FailedJobRegistry(queue=queue).get_job_ids() == []

        # the resumed worker carries on: with the other one gone it serves a new request
        healthy.send(signal.SIGTERM)
        assert healthy.proc.wait(40) == 0
        stack.workers.remove(healthy)
        assert stuck.alive()
        again = requests.post(stack.url + "/generate", json={"inputs": "the same", "parameters": params}, timeout=60)
        assert again.status_code == 200 and again.json()["generated_text"] == expected
    finally:
        for w in stack.workers:
            w.send(signal.SIGCONT)
        stack.stop()


def test_sigterm_to_the_api_finishes_open_streams_and_refuses_new_connections(redis_url, tiny_model_dir):
    limits = ("--max-input-length", "64", "--max-total-tokens", "4000")
    stack = make_stack(redis_url, tiny_model_dir, workers=0, api_args=limits + ("--graceful-timeout", "60"))
    try:
        stack.add_worker(*limits)
        resp = requests.post(stack.url + "/generate_stream", json={"inputs": "a long one", "parameters": {
            "max_new_tokens": 3900, "details": True}}, stream=True, timeout=60)
        frames = resp.iter_lines()
        first = next(line for line in frames if line.startswith(b"data:"))
        stack.api.send(signal.SIGTERM)
        signalled = time.monotonic()

        def refused() -> bool:
            try:
                requests.get(stack.url + "/metrics", timeout=2)
            except requests.exceptions.ConnectionError:
                return True
            return False

        wait_for(refused, 5, "new connections to be refused", every=0.1)
        assert stack.api.alive()  # still finishing the open stream
        rest = [line for line in frames if line.startswith(b"data:")]
        events = [json.loads(line[5:]) for line in [first, *rest]]
        assert events[-1]["details"]["finish_reason"] == "length"
        assert events[-1]["details"]["generated_tokens"] == len(events) == 3900
        assert stack.api.proc.wait(30) == 0
        assert time.monotonic() - signalled < 60
    finally:
        stack.stop()


def test_429_exactly_past_the_queue_limit_on_real_gunicorn(redis_url, tiny_model_dir):
    """No worker: 3 requests fill --max-queue-length 3; the 4th is 429 (a 200 stream with the error
    event on /generate_stream, as TGI); the server stays healthy, and all 3 complete once a worker runs."""
    stack = make_stack(redis_url, tiny_model_dir, workers=0, api_args=("--max-queue-length", "3"))
    try:
        queue = rq_queue(stack.redis)
        body = {"inputs": "queued", "parameters": {"max_new_tokens": 3}}
        with cf.ThreadPoolExecutor(3) as pool:
            waiting = [pool.submit(requests.post, stack.url + "/generate", json=body, timeout=90) for _ in range(3)]
            wait_for(lambda: queue.count == 3, 10, "three queued jobs")
            over = requests.post(stack.url + "/generate", json=body, timeout=10)
            assert over.status_code == 429
            assert over.json() == {"error": "Model is overloaded", "error_type": "overloaded"}
            _, events, _ = stream_events(stack.url + "/generate_stream", body, 10)
            assert events == [{"error": "Model is overloaded", "error_type": "overloaded"}]
            assert queue.count == 3  # the refused requests enqueued nothing
            assert requests.get(stack.url + "/metrics", timeout=10).status_code == 200
            stack.add_worker()
            assert all(f.result().status_code == 200 for f in waiting)
        assert requests.post(stack.url + "/generate", json=body, timeout=30).status_code == 200
        metrics = requests.get(stack.url + "/metrics", timeout=10).text.splitlines()
        overloaded = [line for line in metrics if line.startswith('tgi_request_failure{err="overloaded"}')]
        assert overloaded and float(overloaded[0].rsplit(" ", 1)[1]) == 2.0, overloaded
    finally:
        stack.stop()

"""A dead API process must not leave its requests running on the workers (real processes).

The API's gunicorn workers are SIGKILLed under streaming load, as an OOM killer would: the worker
notices from PUBLISH's subscriber counts that nobody reads their channels any more, drops the rows
after its grace period and records the jobs as canceled in RQ; jobs of the dead process still
waiting in the queue are not run. A subscriber that drops for less than the grace period loses
nothing."""
from __future__ import annotations

import threading
import time

import psutil
import pytest
import requests
from rq.registry import CanceledJobRegistry, FinishedJobRegistry, StartedJobRegistry
from rq.serializers import JSONSerializer

from common import protocol
from tests.integration.conftest import MODEL_ID
from tests.integration.faults import wait_for
from tests.support.processes import start_api, start_worker, wait_http, wait_worker_ready

pytestmark = pytest.mark.integration

GRACE_S = 3.0
NEW_TOKENS = 3000
API_LIMITS = ("--max-input-length", "64", "--max-total-tokens", "4096")


def batch_size(conn) -> int:
    return sum(int(conn.get(k) or 0) for k in conn.scan_iter(protocol.worker_batch_pattern(MODEL_ID)))


def open_streams(url: str, n: int, body: dict) -> list[threading.Thread]:
    def read() -> None:
        try:
            with requests.post(url + "/generate_stream", json=body, stream=True, timeout=120) as resp:
                for _ in resp.iter_lines():
                    pass
        except requests.RequestException:
            pass  # the API process died under it: what the test does

    threads = [threading.Thread(target=read, daemon=True) for _ in range(n)]
    for t in threads:
        t.start()
    return threads


@pytest.fixture
def fleet(redis_server, tiny_model_dir):
    import redis

    conn = redis.Redis.from_url(redis_server.url)
    conn.flushall()
    api, url = start_api(redis_server.url, tiny_model_dir, "--model-id", MODEL_ID, *API_LIMITS)
    worker = start_worker(redis_server.url, tiny_model_dir, "--model-id", MODEL_ID, "--orphan-grace-s", str(GRACE_S),
                          "--max-batch-size", "4", "--max-batch-total-tokens", "20000")
    try:
        wait_worker_ready(conn, [worker])
        wait_http(url, [api])
        yield conn, api, url, worker
    finally:
        api.stop()
        worker.stop(40)


def test_killed_api_processes_leave_no_rows_running(fleet):
    conn, api, url, worker = fleet
    body = {"inputs": "Hello", "parameters": {"max_new_tokens": NEW_TOKENS}}
    open_streams(url, 4, body)
    wait_for(lambda: batch_size(conn) == 4, 60, "four streaming rows")
    queued = open_streams(url, 2, body)  # batch full (4 rows): these two wait in the queue
    queue_key = f"rq:queue:{protocol.queue_name(MODEL_ID)}"
    wait_for(lambda: conn.llen(queue_key) == 2, 30, "two queued jobs")
    started = set(StartedJobRegistry(protocol.queue_name(MODEL_ID), conn, serializer=JSONSerializer).get_job_ids())
    waiting = {j.decode() for j in conn.lrange(queue_key, 0, -1)}
    assert len(started) == 4 and len(waiting) == 2

    children = psutil.Process(api.proc.pid).children()
    assert len(children) == 2
    for child in children:
        child.kill()  # SIGKILL: no cleanup runs, no cancel flag is set
    killed_at = time.monotonic()

    wait_for(lambda: batch_size(conn) == 0, GRACE_S + 15, "the worker's batch to empty")
    emptied_after = time.monotonic() - killed_at
    registry = CanceledJobRegistry(protocol.queue_name(MODEL_ID), conn, serializer=JSONSerializer)
    wait_for(lambda: (started | waiting) <= set(registry.get_job_ids()), 20, "all six jobs canceled in RQ")
    finished = set(FinishedJobRegistry(protocol.queue_name(MODEL_ID), conn, serializer=JSONSerializer).get_job_ids())
    assert not finished & (started | waiting)  # none ran to its end
    assert emptied_after >= GRACE_S - 0.5  # not before the grace period: a blip must not drop rows
    for t in queued:
        t.join(5)

    # gunicorn's master forked new workers: they serve a new request normally
    wait_for(lambda: len(psutil.Process(api.proc.pid).children()) == 2, 60, "gunicorn to restart its workers")
    wait_http(url, [api])
    resp = requests.post(url + "/generate", json={"inputs": "Hello", "parameters": {"max_new_tokens": 5}}, timeout=60)
    assert resp.status_code == 200, resp.text
    assert resp.json()["generated_text"]


def test_a_subscriber_gone_for_less_than_the_grace_keeps_its_streams(fleet):
    conn, _api, url, _worker = fleet
    params = {"max_new_tokens": 300, "details": True}
    reference = requests.post(url + "/generate", json={"inputs": "Hello", "parameters": params}, timeout=120).json()
    expected = [t["id"] for t in reference["details"]["tokens"]]
    got: list[list[int]] = [[], []]

    def read(i: int) -> None:
        with requests.post(url + "/generate_stream", json={"inputs": "Hello", "parameters": params}, stream=True,
                           timeout=120) as resp:
            for line in resp.iter_lines():
                if line.startswith(b"data:"):
                    import json

                    event = json.loads(line[len(b"data:"):])
                    assert "error" not in event, event
                    got[i].append(event["token"]["id"])

    threads = [threading.Thread(target=read, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    wait_for(lambda: min(len(g) for g in got) >= 3, 60, "both streams under way")
    # The API's reply subscriptions are cut, again and again, for most of the grace period: each
    # reconnects in half a second, so the channel is never silent for as long as the grace.
    until = time.monotonic() + GRACE_S * 0.8
    while time.monotonic() < until:
        conn.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
        time.sleep(0.1)
    for t in threads:
        t.join(120)
    assert got == [expected, expected]
    assert not CanceledJobRegistry(protocol.queue_name(MODEL_ID), conn, serializer=JSONSerializer).get_job_ids()

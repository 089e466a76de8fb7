"""`tgq status` against a live fleet: real redis-server, `tgq api` and `tgq worker` processes."""
from __future__ import annotations

import concurrent.futures as cf
import json
import subprocess
import sys
import time

import pytest
import requests

from .conftest import MODEL_ID, make_stack

pytestmark = pytest.mark.integration


def status(redis_url: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "common.cli", "status", "--redis-url", redis_url, *args],
                          capture_output=True, text=True, timeout=60)


def status_json(redis_url: str) -> dict:
    done = status(redis_url, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_status_shows_the_queue_the_429s_and_the_workers(redis_url, tiny_model_dir):
    stack = make_stack(redis_url, tiny_model_dir, workers=0,
                       api_args=("--max-queue-length", "1", "--request-timeout", "60"))
    try:
        with cf.ThreadPoolExecutor(4) as pool:
            waiting = pool.submit(requests.post, stack.url + "/generate", timeout=90,
                                  json={"inputs": "Hello", "parameters": {"max_new_tokens": 200}})
            deadline = time.monotonic() + 20
            while not status_json(redis_url)["models"] or status_json(redis_url)["models"][0]["waiting"] < 1:
                assert time.monotonic() < deadline, "the job was not enqueued"
                time.sleep(0.2)
            refused = [requests.post(stack.url + "/generate", json={"inputs": "x"}, timeout=30).status_code
                       for _ in range(3)]
            assert refused == [429] * 3
            time.sleep(1.2)  # so the waiting job has a measurable age below
            models = status_json(redis_url)["models"]
            assert [(m["model"], m["waiting"], m["overloaded_last_minute"], m["workers"]) for m in models] == [
                (MODEL_ID, 1, 3, 0)]
            assert models[0]["oldest_wait_s"] >= 1.0

            stack.add_worker()
            assert waiting.result().status_code == 200
            # while a long generation runs, the worker's row shows its rows and rate
            busy = pool.submit(requests.post, stack.url + "/generate", timeout=90,
                               json={"inputs": "Hello", "parameters": {"max_new_tokens": 1000}})
            seen = []
            while not busy.done():
                seen += [(w["rows"], w["tok_s"]) for w in status_json(redis_url)["workers"]]
            assert busy.result().status_code == 200
            assert any(rows == 1 and tok_s > 0 for rows, tok_s in seen), seen
        snapshot = status_json(redis_url)
        (model,) = snapshot["models"]
        assert (model["waiting"], model["oldest_wait_s"], model["workers"]) == (0, None, 1)
        (worker,) = snapshot["workers"]
        assert worker["model"] == MODEL_ID and worker["capacity"] == 32 and 0 <= worker["rows"] <= 32
        assert worker["heartbeat_age_s"] < 5
        text = status(redis_url)
        assert text.returncode == 0 and MODEL_ID in text.stdout and worker["name"] in text.stdout
        assert "32" in text.stdout and "429s/min" in text.stdout
    finally:
        stack.stop()
    assert status_json(redis_url)["workers"] == []  # a worker that stopped removes its row


def test_status_watch_refreshes(redis_url, tiny_model_dir):
    proc = subprocess.Popen([sys.executable, "-m", "common.cli", "status", "--redis-url", redis_url, "--json",
                             "--watch", "0.3"], stdout=subprocess.PIPE, text=True)
    try:
        lines = [proc.stdout.readline() for _ in range(3)]
    finally:
        proc.terminate()
        proc.wait(10)
    readings = [json.loads(line) for line in lines]
    assert readings[0]["at"] < readings[1]["at"] < readings[2]["at"]


def test_status_without_redis_is_a_clear_error():
    done = status("redis://127.0.0.1:1/0")
    assert done.returncode == 1 and "Redis cannot be reached" in done.stderr

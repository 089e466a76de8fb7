"""Load-test worker mode with real processes: API + `tgq worker --load-test-tokens-per-s 200` (no model)."""
from __future__ import annotations

import time

import pytest
import redis
import requests

from worker.loadtest import PLACEHOLDER

from .conftest import make_stack
from .sse import stream_events

pytestmark = pytest.mark.integration

RATE = 200.0


@pytest.fixture(scope="module")
def load_stack(redis_server, tiny_model_dir):
    redis.Redis.from_url(redis_server.url).flushall()
    s = make_stack(redis_server.url, tiny_model_dir, workers=0)
    try:
        s.add_worker("--load-test-tokens-per-s", str(RATE))
    except BaseException:
        s.stop()
        raise
    yield s
    s.stop()


def test_stream_emits_placeholder_tokens_in_order(load_stack):
    t0 = time.monotonic()
    resp, events, _ = stream_events(load_stack.url + "/generate_stream",
                                    {"inputs": "Hello world", "parameters": {"max_new_tokens": 20, "details": True}})
    elapsed = time.monotonic() - t0
    assert resp.status_code == 200
    assert len(events) == 20, events
    # TGI's stream frames carry no index; the worker's indexes 0..19 are checked in tests/unit/test_loadtest.py.
    assert all(e["token"]["text"] == PLACEHOLDER.text and e["token"]["id"] == PLACEHOLDER.id for e in events)
    assert all(e["generated_text"] is None for e in events[:-1])
    final = events[-1]
    assert final["generated_text"] == PLACEHOLDER.text * 20
    assert final["details"]["generated_tokens"] == 20
    assert final["details"]["finish_reason"] == "length"
    assert elapsed >= 19 / RATE * 0.9  # paced: 20 tokens take at least 19 step intervals


def test_generate_works(load_stack):
    resp = requests.post(load_stack.url + "/generate",
                         json={"inputs": "Hi", "parameters": {"max_new_tokens": 5, "details": True}}, timeout=30)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["generated_text"] == PLACEHOLDER.text * 5
    assert body["details"]["generated_tokens"] == 5
    assert [t["text"] for t in body["details"]["tokens"]] == [PLACEHOLDER.text] * 5
    assert body["details"]["seed"] is None


def test_worker_loaded_no_torch(load_stack):
    worker = load_stack.workers[0]
    assert worker.alive()
    maps = open(f"/proc/{worker.proc.pid}/maps").read()
    assert "torch" not in maps  # neither libtorch nor torch's extension modules were mapped
    assert "LOAD-TEST MODE: no model, placeholder tokens" in worker.output()

"""Queued jobs survive a Redis restart when Redis keeps an append-only file (compose's Redis does)."""
from __future__ import annotations

import concurrent.futures as cf
import signal
import time
from pathlib import Path

import pytest
import redis
import requests
import yaml
from rq import Queue

from common import protocol
from tests.support.redis_server import RedisServer

from .conftest import MODEL_ID, make_stack

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["Hello there", "The capital of France is", "One two three"]


def test_compose_redis_keeps_an_append_only_file():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    command = compose["services"]["redis"]["command"]
    assert command[command.index("--appendonly") + 1] == "yes"


def test_jobs_waiting_in_an_aof_redis_are_served_after_it_is_killed_and_restarted(tiny_model_dir):
    server = RedisServer(aof=True).start()
    stack = make_stack(server.url, tiny_model_dir, workers=0)  # no worker yet: the jobs wait
    try:
        with cf.ThreadPoolExecutor(len(PROMPTS)) as pool:
            futures = [pool.submit(requests.post, stack.url + "/generate", timeout=120,
                                   json={"inputs": p, "parameters": {"max_new_tokens": 4}}) for p in PROMPTS]
            client = redis.Redis.from_url(server.url)
            queue_key = Queue(protocol.queue_name(MODEL_ID), connection=client).key
            deadline = time.monotonic() + 30
            while client.llen(queue_key) < len(PROMPTS):
                assert time.monotonic() < deadline, "the jobs were not enqueued"
                time.sleep(0.05)
            client.close()
            server.proc.send_signal(signal.SIGKILL)  # no shutdown save: only the AOF keeps the jobs
            server.proc.wait()
            server.start()  # same port, same directory
            assert redis.Redis.from_url(server.url).llen(queue_key) == len(PROMPTS)
            stack.add_worker()
            answers = [f.result() for f in futures]
        assert [a.status_code for a in answers] == [200] * len(PROMPTS), [a.text for a in answers]
        assert all(a.json()["generated_text"] for a in answers)
    finally:
        stack.stop()
        server.cleanup()

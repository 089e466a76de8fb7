"""Several workers on one queue share the work; a worker drains on SIGTERM and exits 0."""
from __future__ import annotations

import concurrent.futures as cf
import signal

import pytest
import redis
import requests
from rq import Queue
from rq.job import Job
from rq.registry import FinishedJobRegistry
from rq.serializers import JSONSerializer

from common import protocol

from .conftest import MODEL_ID, make_stack

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def two_worker_stack(redis_server, tiny_model_dir):
    redis.Redis.from_url(redis_server.url).flushall()
    s = make_stack(redis_server.url, tiny_model_dir, workers=2)
    yield s
    s.stop()


def test_two_workers_share_one_queue(two_worker_stack):
    stack = two_worker_stack
    body = {"inputs": "share the load", "parameters": {"max_new_tokens": 40}}
    with cf.ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(lambda _: requests.post(stack.url + "/generate", json=body, timeout=120),
                                  range(32)))
    assert all(r.status_code == 200 for r in responses)
    queue = Queue(protocol.queue_name(MODEL_ID), connection=stack.redis, serializer=JSONSerializer)
    ids = FinishedJobRegistry(queue=queue).get_job_ids()
    names = {Job.fetch(i, connection=stack.redis, serializer=JSONSerializer).worker_name for i in ids}
    assert len(names) == 2, names


def test_sigterm_finishes_the_running_batch_and_exits_zero(two_worker_stack):
    stack = two_worker_stack
    victim = stack.workers[0]
    body = {"inputs": "drain me", "parameters": {"max_new_tokens": 200}}
    with cf.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(requests.post, stack.url + "/generate", json=body, timeout=120) for _ in range(4)]
        victim.send(signal.SIGTERM)
        results = [f.result() for f in futures]
    assert all(r.status_code == 200 for r in results), [r.text for r in results]
    assert victim.proc.wait(60) == 0
    stack.workers.remove(victim)

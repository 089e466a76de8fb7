"""Real stacks: redis-server + `tgq worker` (tiny random model, fp32) + `tgq api` (gunicorn)."""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import redis

from tests.support.processes import TgqProcess, start_api, start_worker, wait_http, wait_worker_ready

MODEL_ID = "tiny"


@dataclass
class Stack:
    redis_url: str
    model: str
    url: str
    api: TgqProcess
    workers: list[TgqProcess] = field(default_factory=list)

    @property
    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis_url)

    def add_worker(self, *extra: str) -> TgqProcess:
        proc = start_worker(self.redis_url, self.model, "--model-id", MODEL_ID, *extra)
        self.workers.append(proc)
        wait_worker_ready(self.redis, self.workers)
        return proc

    def stop(self) -> None:
        self.api.stop()
        for w in self.workers:
            w.stop(40)


@pytest.fixture
def conn(redis_url):
    """A client of the test's Redis database."""
    c = redis.Redis.from_url(redis_url)
    yield c
    c.close()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from tests.support.tiny_model import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("tiny") / "model"))


def make_stack(redis_url: str, model: str, workers: int = 1, api_args: tuple[str, ...] = ()) -> Stack:
    api, url = start_api(redis_url, model, "--model-id", MODEL_ID, *api_args)
    stack = Stack(redis_url, model, url, api)
    try:
        for _ in range(workers):
            stack.add_worker()
        wait_http(url, [api])
    except BaseException:
        stack.stop()
        raise
    return stack


@pytest.fixture(scope="module")
def stack(redis_server, tiny_model_dir):
    """One API + one worker on the session's redis-server, shared by a test module."""
    redis.Redis.from_url(redis_server.url).flushall()
    s = make_stack(redis_server.url, tiny_model_dir)
    yield s
    s.stop()


def make_fragile_stack(redis_url: str, model: str, max_batch_size: int) -> Stack:
    """Two workers with 2-second leases, so a killed worker's jobs are re-run quickly."""
    redis.Redis.from_url(redis_url).flushall()
    stack = make_stack(redis_url, model, workers=0)
    for _ in range(2):
        stack.workers.append(start_worker(redis_url, model, "--model-id", MODEL_ID, "--lease-ttl", "2",
                                          "--max-batch-size", str(max_batch_size)))
    wait_worker_ready(stack.redis, stack.workers)
    return stack

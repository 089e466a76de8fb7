"""The bounded, blocking connection pool every tgq process uses (real redis-server)."""
from __future__ import annotations

import threading

import pytest
import redis

from common.redis_client import connect
from common.settings import RedisSettings

pytestmark = pytest.mark.integration


def burst(client: redis.Redis, n: int, hold_s: float) -> tuple[list, list]:
    """`n` threads at once, each holding a connection for `hold_s` (a BLPOP on an empty list)."""
    results: list = []
    errors: list = []

    def one() -> None:
        try:
            results.append(client.blpop(["tgq:test:empty"], timeout=hold_s))
        except redis.RedisError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return results, errors


def test_a_burst_beyond_the_pool_waits_for_a_free_connection(redis_url):
    client = connect(RedisSettings(redis_url=redis_url), max_connections=2, pool_wait_s=10)
    results, errors = burst(client, 8, 0.3)
    assert errors == [] and results == [None] * 8  # redis-py's plain pool raised "Too many connections"
    assert len(client.connection_pool._connections) <= 2


def test_a_command_that_waits_longer_than_pool_wait_fails_as_unreachable(redis_url):
    client = connect(RedisSettings(redis_url=redis_url), max_connections=1, pool_wait_s=0.2)
    results, errors = burst(client, 2, 1.5)
    assert results == [None]
    assert len(errors) == 1 and isinstance(errors[0], redis.ConnectionError)  # the API answers 503

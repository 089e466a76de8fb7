"""The one place that builds Redis clients (password and TLS come in through the URL)."""
from __future__ import annotations

from typing import Callable, TypeVar

import redis

from .settings import RedisSettings

T = TypeVar("T")


def connect(settings: RedisSettings, *, socket_timeout: float | None = 30.0,
            max_connections: int = 200) -> redis.Redis:
    """A client for `settings.redis_url`.

    redis-py 8 defaults to a 5 s socket timeout and 100 connections per pool; blocking reads in
    tgq wait at most a few seconds, so 30 s only bounds a dead server. RESP2 keeps RQ's replies
    in the shapes it expects.
    """
    return redis.Redis.from_url(settings.redis_url, socket_timeout=socket_timeout,
                                socket_connect_timeout=5.0, health_check_interval=10,
                                max_connections=max_connections, protocol=2)


def count_round_trips(client: redis.Redis) -> Callable[[], int]:
    """Make `client` count what it sends — one command, or one whole pipeline, is one round trip —
    and return a reader of the count. Call it before the client's first command."""
    sent = [0]
    base = client.connection_pool.connection_class

    class Counting(base):  # type: ignore[valid-type,misc]
        def send_packed_command(self, command: object, check_health: bool = True) -> None:
            sent[0] += 1
            super().send_packed_command(command, check_health)

    client.connection_pool.connection_class = Counting
    return lambda: sent[0]


class PipelinedScript:
    """A Lua script called by its hash from inside pipelines.

    redis-py's Script objects make every pipeline that holds one ask SCRIPT EXISTS first (a second
    round trip); this loads the script once, and again after Redis lost its script cache (a restart):
    `retrying` runs a call that queues the script once more if it failed with NoScriptError."""

    def __init__(self, connection: redis.Redis, source: str) -> None:
        self.connection = connection
        self.source = source
        self._sha = ""

    def queue(self, pipe: redis.client.Pipeline, keys: list[str], args: list[object]) -> None:
        if not self._sha:
            self._sha = self.connection.script_load(self.source)
        pipe.evalsha(self._sha, len(keys), *keys, *args)

    def retrying(self, call: Callable[[], T]) -> T:
        try:
            return call()
        except redis.exceptions.NoScriptError:
            self._sha = ""
            return call()

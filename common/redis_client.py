"""The one place that builds Redis clients (password and TLS come in through the URL).

Besides redis:// and rediss://, a Sentinel URL names the sentinels and the monitored service:
`redis+sentinel://[:password@]host:port[,host:port...]/service[/db]`; the client asks the sentinels
for the current primary and asks again after a connection to it fails (a failover).
"""
from __future__ import annotations

from typing import Any, Callable, TypeVar
from urllib.parse import unquote, urlsplit

import redis
from redis.sentinel import Sentinel

from .settings import RedisSettings

T = TypeVar("T")


# How long a command waits for a free pooled connection before it fails as "Redis unreachable".
POOL_WAIT_S = 20.0


def connect(settings: RedisSettings, *, socket_timeout: float | None = 30.0,
            max_connections: int = 200, pool_wait_s: float = POOL_WAIT_S) -> redis.Redis:
    """A client for `settings.redis_url`.

    redis-py 8 defaults to a 5 s socket timeout and 100 connections per pool; blocking reads in
    tgq wait at most a few seconds, so 30 s only bounds a dead server. RESP2 keeps RQ's replies
    in the shapes it expects. The pool is bounded and blocking: under a burst (a gevent API process
    with a thousand requests arriving at once) a command waits up to `pool_wait_s` for a free
    connection instead of failing with "Too many connections" or opening one per request.
    """
    options: dict[str, Any] = dict(socket_timeout=socket_timeout, socket_connect_timeout=5.0,
                                   health_check_interval=10, max_connections=max_connections, protocol=2)
    if settings.redis_url.startswith(SENTINEL_SCHEME + "://"):
        return _sentinel_primary(settings.redis_url, options)
    pool = redis.BlockingConnectionPool.from_url(settings.redis_url, timeout=pool_wait_s, **options)
    return redis.Redis(connection_pool=pool)


SENTINEL_SCHEME = "redis+sentinel"


class SentinelURLError(ValueError):
    """A redis+sentinel:// URL without sentinels or a service name."""


def _sentinel_primary(url: str, options: dict[str, Any]) -> redis.Redis:
    parts = urlsplit(url)
    hosts = []
    for item in parts.netloc.rpartition("@")[2].split(","):
        host, _, port = item.rpartition(":")
        if not host or not port.isdigit():
            raise SentinelURLError(f"{url!r}: sentinels must be host:port[,host:port...]")
        hosts.append((host, int(port)))
    path = [p for p in parts.path.split("/") if p]
    if not path or len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
        raise SentinelURLError(f"{url!r}: the path must be /service[/db]")
    password = unquote(parts.password) if parts.password else None
    sentinel = Sentinel(hosts, socket_timeout=options["socket_connect_timeout"])
    return sentinel.master_for(path[0], db=int(path[1]) if len(path) == 2 else 0, password=password, **options)


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

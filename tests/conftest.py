from __future__ import annotations

import pytest
import redis

from tests.support.redis_server import RedisServer


@pytest.fixture(scope="session")
def redis_server():
    server = RedisServer().start()
    yield server
    server.cleanup()


@pytest.fixture
def redis_url(redis_server):
    """A clean database on the session's real redis-server."""
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return redis_server.url


@pytest.fixture(scope="session")
def hub_model(tmp_path_factory):
    """The tiny model, sharded, as a Hub model in a hand-built Hub cache (refs/main and refs/dev)."""
    from tests.support.hub_cache import build_hub_model

    return build_hub_model(tmp_path_factory.mktemp("hub-model"))


@pytest.fixture
def offline_hub(hub_model, monkeypatch):
    """huggingface_hub's variables pointing at `hub_model`'s cache, offline, for this test."""
    for name in ("HF_HOME", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in hub_model.env().items():
        monkeypatch.setenv(name, value)
    return hub_model

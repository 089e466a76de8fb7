"""Helpers for fault tests: watch every reply channel, read RQ's registries, poll with deadlines."""
from __future__ import annotations

import threading
import time
from typing import Callable

import redis
from rq import Queue
from rq.serializers import JSONSerializer

from common import protocol
from common.schemas import Event

from .conftest import MODEL_ID


def rq_queue(client: redis.Redis) -> Queue:
    return Queue(protocol.queue_name(MODEL_ID), connection=client, serializer=JSONSerializer)


def wait_for(predicate: Callable[[], object], timeout: float, what: str, every: float = 0.05) -> object:
    """Poll `predicate` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(every)


MARK_CHANNEL = protocol.reply_channel("test-mark")


class ReplyTap:
    """Every event any worker publishes to any API process, in publication order (one pattern
    subscription delivers in order), with its arrival time. `cancel_marked` sets a cancel flag and
    publishes a marker in one MULTI, so what a worker published after the flag is known exactly."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.events: list[tuple[float, Event | None]] = []  # None: a marker
        self._pubsub = client.pubsub()
        self._pubsub.psubscribe(protocol.reply_channel("*"))
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            message = self._pubsub.get_message(timeout=0.2)
            if message and message["type"] == "pmessage" and message["data"]:
                marker = message["channel"] == MARK_CHANNEL.encode()
                events = [None] if marker else protocol.decode_message(message["data"])
                with self._lock:
                    self.events += [(time.monotonic(), event) for event in events]

    def of(self, request_id: str) -> list[Event]:
        with self._lock:
            return [e for _, e in self.events if e is not None and e.request_id == request_id]

    def after_marker(self, request_id: str) -> list[Event]:
        with self._lock:
            marks = [i for i, (_, e) in enumerate(self.events) if e is None]
            assert marks, "no marker seen yet"
            return [e for _, e in self.events[marks[-1]:] if e is not None and e.request_id == request_id]

    def marked(self) -> bool:
        with self._lock:
            return any(e is None for _, e in self.events)

    def cancel_marked(self, request_id: str) -> None:
        with self.client.pipeline(transaction=True) as pipe:
            pipe.set(protocol.cancel_key(request_id), b"1", ex=60)
            pipe.publish(MARK_CHANNEL, b"mark")
            pipe.execute()

    def request_ids(self) -> list[str]:
        with self._lock:
            return list(dict.fromkeys(e.request_id for _, e in self.events if e is not None))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._pubsub.close()

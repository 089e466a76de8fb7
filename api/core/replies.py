"""Worker -> API replies: one pub/sub subscription per API process, events handed out by request id.

Every job names this process's channel in `reply_to`; a worker sends it one message per step with
all of this process's rows' events (older workers: one per event), and this process keeps a
presence key alive beside it so workers can tell its queued jobs from those of a dead process. One reader thread (a greenlet under
gunicorn's gevent worker, which patches `threading` and `queue`) reads that channel and puts each
decoded event on the queue of the request it belongs to. A request registers before its job is
enqueued, and `register` returns only once the subscription is live, so no event can be missed
by a healthy connection. If the connection drops, messages are lost: readers then poll the final
event the worker stores at `protocol.result_key` whenever they hear nothing for a while.
"""
from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

import redis

from common import protocol
from common.errors import Unavailable
from common.schemas import ErrorEvent, Event, FinalEvent, TokenEvent

log = logging.getLogger(__name__)

SUBSCRIBE_WAIT_S = 5.0  # how long a request waits for the subscription before answering 503
RESULT_POLL_S = 2.0  # silence after which a reader looks for a stored result
RECONNECT_DELAY_S = 0.5


def new_instance_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


class ReplyHub:
    """The process's single subscription and the per-request queues it feeds."""

    def __init__(self, client: redis.Redis, instance_id: str | None = None) -> None:
        self.redis = client
        self.instance_id = instance_id or new_instance_id()
        self.channel = protocol.reply_channel(self.instance_id)
        self.presence = protocol.presence_key(self.channel)
        self._queues: dict[str, queue.Queue[Event]] = {}
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._presence_thread: threading.Thread | None = None
        self._pid = 0

    # lifecycle ---------------------------------------------------------------------------------

    def _ensure_started(self) -> None:
        with self._lock:
            if self._thread is not None and self._thread.is_alive() and self._pid == os.getpid():
                return
            self._pid = os.getpid()
            self._ready.clear()
            self._thread = threading.Thread(target=self._run, name="tgq-replies", daemon=True)
            self._thread.start()
            self._presence_thread = threading.Thread(target=self._keep_present, name="tgq-presence", daemon=True)
            self._presence_thread.start()

    def close(self) -> None:
        self._stop.set()
        try:
            self.redis.delete(self.presence)  # workers stop its queued jobs at once, not after the TTL
        except (redis.exceptions.RedisError, OSError):
            pass
        if self._thread is not None and self._thread.is_alive():
            try:
                self.redis.publish(self.channel, b"")  # wake the reader now rather than at its next poll
            except (redis.exceptions.RedisError, OSError):
                pass
            self._thread.join(timeout=3)
        if self._presence_thread is not None and self._presence_thread.is_alive():
            self._presence_thread.join(timeout=3)

    @property
    def subscribed(self) -> bool:
        return self._ready.is_set()

    # requests ----------------------------------------------------------------------------------

    def register(self, request_ids: list[str]) -> queue.Queue[Event]:
        """One queue for the events of these requests (a submission's copies or choices); returns
        once the channel is subscribed (else Unavailable)."""
        self._ensure_started()
        q: queue.Queue[Event] = queue.Queue()
        with self._lock:
            for rid in request_ids:
                self._queues[rid] = q
        if not self._ready.wait(SUBSCRIBE_WAIT_S):
            self.unregister(request_ids)
            raise Unavailable()
        return q

    def unregister(self, request_ids: list[str]) -> None:
        with self._lock:
            for rid in request_ids:
                self._queues.pop(rid, None)

    def dispatch(self, data: bytes) -> None:
        """Hand each event of one message (a worker's step for this process, or one v1 event) to its request."""
        try:
            events = protocol.decode_message(data)
        except protocol.ProtocolError as exc:
            log.warning("dropping a reply that is not a tgq message: %s", exc)
            return
        with self._lock:
            queues = [(self._queues.get(event.request_id), event) for event in events]
        for q, event in queues:
            if q is not None:  # else: the request already ended (client gone, timeout, duplicate)
                q.put(event)

    # reader ------------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            pubsub = self.redis.pubsub()
            try:
                pubsub.subscribe(self.channel)
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    if message is None:
                        continue
                    if message["type"] == "subscribe":
                        self._renew_presence()  # before any job of this process is enqueued
                        self._ready.set()
                    elif message["type"] == "message" and message["data"]:
                        self.dispatch(message["data"])
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as exc:
                if self._ready.is_set():
                    log.warning("reply channel lost (%s); resubscribing", exc)
                self._ready.clear()
                self._stop.wait(RECONNECT_DELAY_S)
            finally:
                try:
                    pubsub.close()
                except (redis.exceptions.RedisError, OSError):
                    pass
        self._ready.clear()


    def _keep_present(self) -> None:
        """Renew the presence key every PRESENCE_EVERY_S while subscribed, on its own thread, so a
        slow or failing renewal (an exhausted connection pool under a burst) never holds up the
        reader or tears down the subscription."""
        while not self._stop.wait(protocol.PRESENCE_EVERY_S):
            if self._ready.is_set():
                self._renew_presence()

    def _renew_presence(self) -> None:
        """Tell workers this process is alive: they skip queued jobs of a process whose key is gone
        and whose channel has no subscriber. A failure is logged and retried at the next renewal."""
        try:
            self.redis.set(self.presence, b"1", ex=protocol.PRESENCE_TTL_S)
        except (redis.exceptions.RedisError, OSError) as exc:
            log.warning("presence key not renewed (%s); retrying in %.0f s", exc, protocol.PRESENCE_EVERY_S)


@dataclass
class Relay:
    """Which of a request's events to pass on, given re-runs (attempt + 1), repeats and losses.

    Tokens are forwarded once per index, in order; a re-run's tokens at indexes already sent are
    compared with what was sent and dropped, or end the request if they differ. Events from an
    attempt older than the newest seen are stale and dropped. A token whose index skips one
    (pub/sub lost a message) is held back with every later one of that attempt: a stream never
    shows a hole. The final event fills the gap (`GenerationService.events`), or a re-run does.
    """
    attempt: int = 0
    last_index: int = -1
    sent_ids: list[int] = field(default_factory=list)
    gap: bool = False  # a token was lost: later tokens of this attempt wait for the final event

    def accept(self, event: Event) -> Event | None:
        if event.attempt < self.attempt:
            return None
        if event.attempt > self.attempt:
            self.gap = False  # the re-run sends every index again, in order
        self.attempt = event.attempt
        if isinstance(event, ErrorEvent):
            return event
        if isinstance(event, TokenEvent) and event.index <= self.last_index:
            if self.sent_ids[event.index] != event.token.id:
                return ErrorEvent(event.request_id, event.attempt,
                                  "the re-run of this request diverged from the tokens already sent",
                                  "generation")
            return None
        if isinstance(event, FinalEvent) and event.index <= self.last_index:
            return ErrorEvent(event.request_id, event.attempt,
                              "the re-run of this request ended before the tokens already sent",
                              "generation")
        if isinstance(event, TokenEvent):
            if self.gap or event.index > self.last_index + 1:
                self.gap = True
                return None
            self.record(event.token.id)
        return event

    def record(self, token_id: int) -> None:
        """A token sent to the client: the next index."""
        self.sent_ids.append(token_id)
        self.last_index += 1


class Subscription:
    """The incoming events of one submission's requests, with the stored-result fallback."""

    def __init__(self, request_ids: list[str], q: queue.Queue[Event],
                 fetch_stored: Callable[[str], bytes | None]) -> None:
        self.pending = list(request_ids)  # requests whose final or error event has not arrived
        self._queue = q
        self._fetch_stored = fetch_stored
        self._quiet_since = time.monotonic()

    def ended(self, request_id: str) -> None:
        if request_id in self.pending:
            self.pending.remove(request_id)

    def next(self, timeout: float) -> Event | None:
        """The next event, or None after `timeout` seconds of silence."""
        event: Event | None
        try:
            event = self._queue.get(timeout=max(0.0, timeout))
        except queue.Empty:
            event = self._stored() if time.monotonic() - self._quiet_since >= RESULT_POLL_S else None
            if event is None:
                return None
        self._quiet_since = time.monotonic()
        return event

    def _stored(self) -> Event | None:
        """The first pending request's stored outcome, if a worker stored one."""
        self._quiet_since = time.monotonic()
        for request_id in self.pending:
            data = self._fetch_stored(request_id)
            if data is None:
                continue
            try:
                event = protocol.decode_event(data)
            except protocol.ProtocolError as exc:
                log.warning("stored result of %s is not a tgq event: %s", request_id, exc)
                continue
            if isinstance(event, (FinalEvent, ErrorEvent)):
                return event
        return None

"""How any stream ends, whatever its dialect's framing: the route's hooks, the guard that turns a
failure into the dialect's error event or a dropped client into a cancel, and keep-alive comments
while no event arrives."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

from common.errors import ServiceError, Unavailable
from common.schemas import Event, FinalEvent

from .service import ClientGone

log = logging.getLogger(__name__)


@dataclass
class StreamHooks:
    """What the route wants done when a stream (of either dialect) ends one way or another."""
    on_success: Callable[[list[FinalEvent]], None]  # every job's final event
    on_failure: Callable[[ServiceError], None]
    on_dropped: Callable[[], None]  # client went away mid-stream: cancel the jobs, count `dropped`
    on_close: Callable[[], None]  # always, last
    # polled while no event arrives (e.g. queued behind others): True once the client hung up
    client_gone: Callable[[], bool] = lambda: False
    ended: bool = False  # every job succeeded: a client that goes away now is not a drop

    def succeeded(self, finals: list[FinalEvent]) -> None:
        """The body calls this once every job's final event is in, before writing the last of it."""
        self.ended = True
        self.on_success(finals)


def guarded(body: Iterator[bytes], hooks: StreamHooks, on_error: Callable[[ServiceError], bytes]) -> Iterator[bytes]:
    """Run a stream body with the hooks: a ServiceError becomes the dialect's error event (`on_error`),
    a client gone (seen by polling, or by the WSGI server closing the generator) counts as dropped."""
    ended = False
    try:
        # An empty first chunk makes the WSGI server send the headers now, as axum does, rather
        # than with the first token (which may be a long queue wait away). It writes no bytes.
        yield b""
        yield from body
        ended = True
    except ClientGone:
        ended = True
        hooks.on_dropped()
    except ServiceError as exc:
        ended = True
        if isinstance(exc, Unavailable):
            log.warning("Redis unreachable mid-stream: %s", exc.__cause__)
        hooks.on_failure(exc)
        yield on_error(exc)
    except GeneratorExit:
        if not (ended or hooks.ended):
            hooks.on_dropped()
        raise
    finally:
        hooks.on_close()


def keepalives(events: Iterable[Event | None], keepalive_s: float, comment: bytes) -> Iterator[Event | bytes]:
    """The events, with `comment` put in after `keepalive_s` without anything written."""
    last_write = time.monotonic()
    for event in events:
        if event is None:
            if time.monotonic() - last_write >= keepalive_s:
                last_write = time.monotonic()
                yield comment
            continue
        last_write = time.monotonic()
        yield event

"""Server-sent events as TGI 0.5.0 (axum) writes them.

Each event is `data:` + compact JSON + `\\n\\n` (no space, no `event:`/`id:` lines); after 15 s
without an event a `:\\n\\n` comment keeps the connection alive (and lets the server notice a
client that went away: the WSGI server closes the generator, GeneratorExit at the `yield`).
Errors are one `data:{"error":..,"error_type":..}` event, after which the stream ends.
While no event arrives the client's socket is looked at every second, so a client that hangs up
while its job waits in the queue is noticed (and the job cancelled) before any worker runs it.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

from common.errors import ServiceError, Unavailable
from common.schemas import Event, FinalEvent, Token, TokenEvent

from .responses import dumps, token_dict
from .service import ClientGone

log = logging.getLogger(__name__)

KEEPALIVE_S = 15.0
KEEPALIVE = b":\n\n"
CONTENT_TYPE = "text/event-stream"


def sse(obj: Any) -> bytes:
    return b"data:" + dumps(obj) + b"\n\n"


def error_event(exc: ServiceError) -> bytes:
    return sse({"error": exc.message, "error_type": exc.error_type})


def token_event(token: Token) -> bytes:
    return sse({"token": token_dict(token), "generated_text": None, "details": None})


def final_event(final: FinalEvent, *, prefix: str, details: bool) -> bytes:
    d = ({"finish_reason": final.finish_reason.value, "generated_tokens": final.generated_tokens,
          "seed": final.seed} if details else None)
    return sse({"token": token_dict(final.token), "generated_text": prefix + final.generated_text,
                "details": d})


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


def relay_stream(events: Iterable[TokenEvent | FinalEvent | None], *, prefix: str, details: bool,
                 hooks: StreamHooks, keepalive_s: float = KEEPALIVE_S) -> Iterator[bytes]:
    """TGI's SSE body for one (non-best_of) request whose job is already enqueued."""
    def body() -> Iterator[bytes]:
        for item in keepalives(events, keepalive_s, KEEPALIVE):
            if isinstance(item, bytes):
                yield item
            elif isinstance(item, TokenEvent):
                yield token_event(item.token)
            elif isinstance(item, FinalEvent):
                hooks.succeeded([item])
                yield final_event(item, prefix=prefix, details=details)
    return guarded(body(), hooks, error_event)


def single_error_stream(exc: ServiceError) -> Iterator[bytes]:
    """A stream that is only an error event (validation, overload: TGI still answers 200)."""
    yield error_event(exc)

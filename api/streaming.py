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
from typing import Any, Callable, Iterator

import redis

from common.errors import IncompleteGeneration, ServiceError, Unavailable
from common.schemas import ErrorEvent, FinalEvent, Token, TokenEvent

from .responses import dumps, token_dict
from .service import CLIENT_CHECK_S, Submission, error_from_event

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
    """What the route wants done when the stream ends one way or another."""
    on_success: Callable[[FinalEvent], None]
    on_failure: Callable[[ServiceError], None]
    on_dropped: Callable[[], None]  # client went away mid-stream: cancel the job, count `dropped`
    on_close: Callable[[], None]  # always, last
    # polled while no event arrives (e.g. queued behind others): True once the client hung up
    client_gone: Callable[[], bool] = lambda: False


def relay_stream(sub: Submission, deadline: float, *, prefix: str, details: bool,
                 hooks: StreamHooks, keepalive_s: float = KEEPALIVE_S) -> Iterator[bytes]:
    """The SSE body for one (non-best_of) request whose job is already enqueued."""
    subscription, relay = sub.subscriptions[0], sub.relays[0]
    ended = False
    try:
        # An empty first chunk makes the WSGI server send the headers now, as axum does, rather
        # than with the first token (which may be a long queue wait away). It writes no bytes.
        yield b""
        last_write = last_check = time.monotonic()
        while True:
            now = time.monotonic()
            if now >= deadline:
                ended = True
                hooks.on_failure(IncompleteGeneration())
                yield error_event(IncompleteGeneration())
                return
            try:
                event = subscription.next(min(deadline - now, CLIENT_CHECK_S,
                                              max(0.0, keepalive_s - (now - last_write))))
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
                log.warning("Redis unreachable mid-stream: %s", exc)
                ended = True
                hooks.on_failure(Unavailable())
                yield error_event(Unavailable())
                return
            if event is None:
                if time.monotonic() - last_check >= CLIENT_CHECK_S:
                    last_check = time.monotonic()
                    if hooks.client_gone():  # noticed without waiting for a keep-alive write
                        ended = True
                        hooks.on_dropped()
                        return
                if time.monotonic() - last_write >= keepalive_s:
                    yield KEEPALIVE
                    last_write = time.monotonic()
                continue
            accepted = relay.accept(event)
            if accepted is None:
                continue
            if isinstance(accepted, TokenEvent):
                yield token_event(accepted.token)
                last_write = time.monotonic()
            elif isinstance(accepted, ErrorEvent):
                ended = True
                error = error_from_event(accepted)
                hooks.on_failure(error)
                yield error_event(error)
                return
            elif isinstance(accepted, FinalEvent):
                # Tokens lost in transit (a dropped subscription) are recovered from the final
                # event when the worker included them.
                for index in range(relay.last_index + 1, accepted.index):
                    if index < len(accepted.tokens):
                        relay.record(index, accepted.tokens[index].id)
                        yield token_event(accepted.tokens[index])
                ended = True
                hooks.on_success(accepted)
                yield final_event(accepted, prefix=prefix, details=details)
                return
    except GeneratorExit:
        if not ended:
            hooks.on_dropped()
        raise
    finally:
        hooks.on_close()


def single_error_stream(exc: ServiceError) -> Iterator[bytes]:
    """A stream that is only an error event (validation, overload: TGI still answers 200)."""
    yield error_event(exc)

"""Server-sent events as TGI 0.5.0 (axum) writes them.

Each event is `data:` + compact JSON + `\\n\\n` (no space, no `event:`/`id:` lines); after 15 s
without an event a `:\\n\\n` comment keeps the connection alive (and lets the server notice a
client that went away: the WSGI server closes the generator, GeneratorExit at the `yield`).
Errors are one `data:{"error":..,"error_type":..}` event, after which the stream ends.
While no event arrives the client's socket is looked at every second, so a client that hangs up
while its job waits in the queue is noticed (and the job cancelled) before any worker runs it.
"""
from __future__ import annotations

from typing import Any, Iterable, Iterator

from common.errors import ServiceError
from common.schemas import FinalEvent, Token, TokenEvent

from ..core.streams import StreamHooks, guarded, keepalives
from .responses import dumps, token_dict

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

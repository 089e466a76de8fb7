"""What the handlers of both dialects share: the app's state, the client's socket, waiting for
the final events of a submission, and the hooks that end a stream (metrics, cancel, release).

Flask request context only; the formats live in the dialects (`api.tgi`, `api.v1`).
"""
from __future__ import annotations

import contextlib
import logging
import select
import socket
from typing import Iterator

from flask import current_app, request

from common.errors import ServiceError, Unavailable
from common.schemas import FinalEvent

from .models import ServedModel
from .timing import timing_for
from .service import REDIS_DOWN, ClientGone, Submission
from .state import TgqState
from .streams import StreamHooks

log = logging.getLogger(__name__)


def state() -> TgqState:
    return current_app.extensions["tgq"]  # type: ignore[no-any-return]


def client_gone() -> bool:
    """True when the client closed its connection (socket readable, nothing to read)."""
    return socket_closed(request.environ.get("gunicorn.socket"))


def socket_closed(sock: socket.socket | None) -> bool:
    if sock is None:
        return False
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
    except (BlockingIOError, InterruptedError):
        return False
    except (OSError, ValueError):  # ValueError: the socket was already closed (fileno -1)
        return True


def cancel(model: ServedModel, sub: Submission) -> None:
    try:
        model.queue.cancel(sub.request_ids)
    except REDIS_DOWN as exc:
        log.warning("could not flag %s as cancelled: %s", sub.request_ids, exc)


@contextlib.contextmanager
def failures_counted(st: TgqState) -> Iterator[None]:
    """Around admission, validation and submission: a failure is counted in `tgi_request_failure`."""
    try:
        yield
    except ServiceError as exc:
        st.metrics.failure(exc.metric_label)
        raise
    except REDIS_DOWN:
        st.metrics.failure(Unavailable.metric_label)
        raise


def wait_finals(st: TgqState, model: ServedModel, sub: Submission) -> list[FinalEvent] | None:
    """Every job's final event (metrics counted); None when the client went away (jobs cancelled).

    Raises the ServiceError that ended the request, after cancelling the other jobs."""
    try:
        finals = st.service.collect(sub, client_gone)
    except ClientGone:
        cancel(model, sub)
        st.metrics.failure("dropped")
        return None
    except ServiceError as exc:
        st.metrics.failure(exc.metric_label)
        cancel(model, sub)  # failed or timed out after enqueueing: stop the other jobs too
        raise
    finally:
        st.service.release(sub)
    return finals


def count_successes(st: TgqState, sub: Submission, finals: list[FinalEvent], start: float) -> None:
    for final in finals:
        st.metrics.succeeded(timing_for(start, sub.enqueued_at, final), final.generated_tokens)


def stream_hooks(st: TgqState, model: ServedModel, sub: Submission, start: float) -> StreamHooks:
    """Metrics, cancellation and release for a stream of either dialect."""
    metrics, service = st.metrics, st.service

    def succeeded(finals: list[FinalEvent]) -> None:
        count_successes(st, sub, finals, start)

    def failed(exc: ServiceError) -> None:
        metrics.failure(exc.metric_label)
        cancel(model, sub)

    def dropped() -> None:
        metrics.failure("dropped")
        cancel(model, sub)

    sock = request.environ.get("gunicorn.socket")  # the generator runs outside the request context
    return StreamHooks(on_success=succeeded, on_failure=failed, on_dropped=dropped,
                       on_close=lambda: service.release(sub), client_gone=lambda: socket_closed(sock))

"""TGI 0.5.0's routes. Handlers parse, validate, submit and respond; the work lives elsewhere.

Check order (TGI §3.3): body extraction (plain-text 415/400/422) -> handler-level best_of ->
429 against the shared queue -> validation (422) -> subscribe + enqueue -> wait.
"""
from __future__ import annotations

import logging
import select
import socket
import time

import redis
from flask import Blueprint, Response, current_app, request

from common.errors import Overloaded, ServiceError, Unavailable, ValidationError
from common.schemas import FinalEvent

from .errors import JSON
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .parsing import JSON_CONTENT_TYPE_MSG, RawParameters, RawRequest, Rejection, is_json_content_type, parse_request
from .responses import dumps, generate_body, generate_headers, pick_best, stream_headers, timing_for
from .service import ClientGone, GenerationService, Submission
from .state import TgqState
from .streaming import CONTENT_TYPE as SSE_TYPE
from .streaming import StreamHooks, relay_stream, single_error_stream
from .validation import ValidRequest, check_best_of

log = logging.getLogger(__name__)

bp = Blueprint("tgq", __name__)

# tgq serves decoder-only text-generation models, i.e. Hub models whose pipeline_tag is
# "text-generation": for those TGI makes `return_full_text` default to true on `POST /` and
# `/invocations` (it stays false on `/generate` and `/generate_stream`).
COMPAT_RETURN_FULL_TEXT = True
HEALTH_REQUEST = RawRequest(inputs="liveness", parameters=RawParameters(max_new_tokens=1))
GENERATION_ENDPOINTS = frozenset({"tgq.generate", "tgq.generate_stream", "tgq.compat_generate"})
REDIS_DOWN = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)


def _state() -> TgqState:
    return current_app.extensions["tgq"]  # type: ignore[no-any-return]


def _body() -> RawRequest:
    content_type = request.headers.get("Content-Type")
    if not is_json_content_type(content_type):  # axum checks this before reading the body
        raise Rejection(415, JSON_CONTENT_TYPE_MSG)
    return parse_request(request.get_data(cache=False), content_type,
                         compat=request.endpoint == "tgq.compat_generate")


def _client_gone() -> bool:
    """True when the client closed its connection (socket readable, nothing to read)."""
    return _socket_closed(request.environ.get("gunicorn.socket"))


def _socket_closed(sock: socket.socket | None) -> bool:
    if sock is None:
        return False
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
    except (BlockingIOError, InterruptedError):
        return False
    except (OSError, ValueError):  # ValueError: the socket was already closed (fileno -1)
        return True


def _cancel(service: GenerationService, sub: Submission) -> None:
    try:
        service.cancel(sub)
    except REDIS_DOWN as exc:
        log.warning("could not flag %s as cancelled: %s", sub.request_ids, exc)


def _full_text(valid: ValidRequest, default: bool) -> bool:
    return default if valid.return_full_text is None else valid.return_full_text


# --- routes --------------------------------------------------------------------------------

# TGI's handlers (and so their clock and `tgi_request_count`) start once the body was extracted.

@bp.post("/generate")
def generate() -> Response:
    raw = _body()
    start = time.time()
    _state().metrics.request_count.inc()
    return _generate(raw, start, full_text_default=False, as_list=False)


@bp.post("/generate_stream")
def generate_stream() -> Response:
    raw = _body()
    start = time.time()
    _state().metrics.request_count.inc()
    return _stream(raw, start, full_text_default=False)


@bp.post("/")
@bp.post("/invocations")
def compat_generate() -> Response:
    raw = _body()
    start = time.time()
    _state().metrics.request_count.inc()
    if raw.stream:
        return _stream(raw, start, full_text_default=COMPAT_RETURN_FULL_TEXT)
    return _generate(raw, start, full_text_default=COMPAT_RETURN_FULL_TEXT, as_list=True)


@bp.get("/health")
@bp.get("/")
@bp.get("/ping")
def health() -> Response:
    """TGI 0.5.0: a real one-token request through the queue; 200 with an empty body."""
    return _generate(HEALTH_REQUEST, time.time(), full_text_default=False, as_list=False, health=True)


@bp.get("/metrics")
def metrics() -> Response:
    st = _state()
    text = st.metrics.scrape(st.redis, st.model_id, st.service.queue.key)
    return Response(text, content_type=METRICS_CONTENT_TYPE)


# --- non-streaming -------------------------------------------------------------------------

def _generate(raw: RawRequest, start: float, *, full_text_default: bool, as_list: bool,
              health: bool = False) -> Response:
    st = _state()
    copies = check_best_of(raw.parameters, st.limits, stream=False)  # TGI counts no failure here
    sub: Submission | None = None
    try:
        st.service.admit(copies)
        valid = st.validator.validate(raw, best_of=copies)
        st.metrics.validated(valid.input_length, valid.stopping.max_new_tokens, copies)
        sub = st.service.submit(valid, stream=False)
        finals = st.service.collect(sub, st.service.deadline(), _client_gone)
    except ClientGone:
        if sub is not None:
            _cancel(st.service, sub)
        st.metrics.failure("dropped")
        return Response(b"", status=499)  # nobody reads it
    except ServiceError as exc:
        st.metrics.failure(exc.metric_label)
        if sub is not None:  # failed or timed out after enqueueing: stop the other copies too
            _cancel(st.service, sub)
        raise
    except REDIS_DOWN:
        st.metrics.failure(Unavailable.metric_label)
        raise
    finally:
        if sub is not None:
            st.service.release(sub)
    if health:
        return Response(b"", status=200)
    winner = pick_best(finals)
    body = generate_body(finals, winner, details=valid.details,
                         prefix=raw.inputs if _full_text(valid, full_text_default) else "")
    final = finals[winner]
    timing = timing_for(start, sub.enqueued_at, final)
    st.metrics.succeeded(timing, final.generated_tokens)
    headers = generate_headers(timing, final.generated_tokens, len(raw.inputs))
    return Response(dumps([body] if as_list else body), status=200, headers=headers, content_type=JSON)


# --- streaming -----------------------------------------------------------------------------

def _stream(raw: RawRequest, start: float, *, full_text_default: bool) -> Response:
    st = _state()
    headers = stream_headers(len(raw.inputs))
    try:
        copies = check_best_of(raw.parameters, st.limits, stream=True)
        st.service.admit(copies)
        valid = st.validator.validate(raw, best_of=copies)
        st.metrics.validated(valid.input_length, valid.stopping.max_new_tokens, copies)
        sub = st.service.submit(valid, stream=True)
    except (Unavailable, *REDIS_DOWN):
        st.metrics.failure(Unavailable.metric_label)
        raise  # before the stream starts, a Redis outage is a plain 503 rather than a 200 stream
    except (Overloaded, ValidationError) as exc:
        st.metrics.failure(exc.metric_label)
        # TGI answers 200 and sends the error as the only event.
        return Response(single_error_stream(exc), status=200, headers=headers, content_type=SSE_TYPE)

    metrics, service = st.metrics, st.service

    def succeeded(final: FinalEvent) -> None:
        metrics.succeeded(timing_for(start, sub.enqueued_at, final), final.generated_tokens)

    def failed(exc: ServiceError) -> None:
        metrics.failure(exc.metric_label)
        _cancel(service, sub)

    def dropped() -> None:
        metrics.failure("dropped")
        _cancel(service, sub)

    sock = request.environ.get("gunicorn.socket")  # the generator runs outside the request context
    hooks = StreamHooks(on_success=succeeded, on_failure=failed, on_dropped=dropped,
                        on_close=lambda: service.release(sub), client_gone=lambda: _socket_closed(sock))
    body = relay_stream(sub, service.deadline(), details=valid.details, hooks=hooks,
                        keepalive_s=st.keepalive_s,
                        prefix=raw.inputs if _full_text(valid, full_text_default) else "")
    return Response(body, status=200, headers=headers, content_type=SSE_TYPE)

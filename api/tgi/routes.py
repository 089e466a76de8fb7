"""TGI 0.5.0's routes. Handlers parse, validate, submit and respond; the work lives elsewhere.

Check order (TGI §3.3): body extraction (plain-text 415/400/422) -> handler-level best_of ->
429 against the shared queue -> validation (422) -> subscribe + enqueue -> wait.
"""
from __future__ import annotations

import time

from flask import Blueprint, Response, request

from common.errors import Overloaded, Unavailable, ValidationError

from ..core.handlers import failures_counted, state, stream_hooks, wait_finals
from ..core.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from ..core.request import RawParameters, RawRequest
from ..core.service import REDIS_DOWN, JobSpec
from ..core.timing import timing_for
from ..core.validation import ValidRequest, check_best_of, random_seed
from .errors import JSON
from .parsing import JSON_CONTENT_TYPE_MSG, Rejection, is_json_content_type, parse_request
from .responses import dumps, generate_body, generate_headers, pick_best, stream_headers
from .streaming import CONTENT_TYPE as SSE_TYPE
from .streaming import relay_stream, single_error_stream

bp = Blueprint("tgq", __name__)

# tgq serves decoder-only text-generation models, i.e. Hub models whose pipeline_tag is
# "text-generation": for those TGI makes `return_full_text` default to true on `POST /` and
# `/invocations` (it stays false on `/generate` and `/generate_stream`).
COMPAT_RETURN_FULL_TEXT = True
HEALTH_REQUEST = RawRequest(inputs="liveness", parameters=RawParameters(max_new_tokens=1))
GENERATION_ENDPOINTS = frozenset({"tgq.generate", "tgq.generate_stream", "tgq.compat_generate"})


def _body() -> RawRequest:
    content_type = request.headers.get("Content-Type")
    if not is_json_content_type(content_type):  # axum checks this before reading the body
        raise Rejection(415, JSON_CONTENT_TYPE_MSG)
    return parse_request(request.get_data(cache=False), content_type,
                         compat=request.endpoint == "tgq.compat_generate")


def _full_text(valid: ValidRequest, default: bool) -> bool:
    return default if valid.return_full_text is None else valid.return_full_text


# --- routes --------------------------------------------------------------------------------

# TGI's handlers (and so their clock and `tgi_request_count`) start once the body was extracted.

@bp.post("/generate")
def generate() -> Response:
    raw = _body()
    start = time.time()
    state().metrics.request_count.inc()
    return _generate(raw, start, full_text_default=False, as_list=False)


@bp.post("/generate_stream")
def generate_stream() -> Response:
    raw = _body()
    start = time.time()
    state().metrics.request_count.inc()
    return _stream(raw, start, full_text_default=False)


@bp.post("/")
@bp.post("/invocations")
def compat_generate() -> Response:
    raw = _body()
    start = time.time()
    state().metrics.request_count.inc()
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
    st = state()
    text = st.metrics.scrape(st.redis, [(m.id, m.queue.key) for m in st.models.models])
    return Response(text, content_type=METRICS_CONTENT_TYPE)


# --- non-streaming -------------------------------------------------------------------------

def _spec(valid: ValidRequest, *, stream: bool) -> JobSpec:
    """TGI's request in the workers' terms: one job per best_of copy, each with its own seed."""
    seeds = (valid.sampling.seed,) if valid.seed_given else tuple(random_seed() for _ in range(valid.best_of))
    return JobSpec(input_ids=valid.input_ids, sampling=valid.sampling, stopping=valid.stopping, seeds=seeds,
                   want_tokens=stream or valid.details or valid.best_of > 1,
                   want_prefill=not stream and valid.details, grammar=valid.grammar)


def _generate(raw: RawRequest, start: float, *, full_text_default: bool, as_list: bool,
              health: bool = False) -> Response:
    st = state()
    model = st.models.default
    copies = check_best_of(raw.parameters, model.limits, stream=False)  # TGI counts no failure here
    with failures_counted(st):
        model.admit(copies)
        valid = model.validator.validate(raw, best_of=copies)
        st.metrics.validated(valid.input_length, valid.stopping.max_new_tokens, copies)
        sub = st.service.submit(model.queue, [_spec(valid, stream=False)])
    finals = wait_finals(st, model, sub)
    if finals is None:
        return Response(b"", status=499)  # the client went away: nobody reads it
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
    st = state()
    model = st.models.default
    headers = stream_headers(len(raw.inputs))
    try:
        copies = check_best_of(raw.parameters, model.limits, stream=True)
        model.admit(copies)
        valid = model.validator.validate(raw, best_of=copies)
        st.metrics.validated(valid.input_length, valid.stopping.max_new_tokens, copies)
        sub = st.service.submit(model.queue, [_spec(valid, stream=True)])
    except (Unavailable, *REDIS_DOWN):
        st.metrics.failure(Unavailable.metric_label)
        raise  # before the stream starts, a Redis outage is a plain 503 rather than a 200 stream
    except (Overloaded, ValidationError) as exc:
        st.metrics.failure(exc.metric_label)
        # TGI answers 200 and sends the error as the only event.
        return Response(single_error_stream(exc), status=200, headers=headers, content_type=SSE_TYPE)

    hooks = stream_hooks(st, model, sub, start)
    body = relay_stream(st.service.events(sub, hooks.client_gone, tick_s=st.keepalive_s), details=valid.details,
                        hooks=hooks, keepalive_s=st.keepalive_s,
                        prefix=raw.inputs if _full_text(valid, full_text_default) else "")
    return Response(body, status=200, headers=headers, content_type=SSE_TYPE)

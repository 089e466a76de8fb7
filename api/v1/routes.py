"""The /v1 routes: read an OpenAI body, route it to a served model, submit, answer in OpenAI's format.

Check order: body (400) -> model (404) -> chat template (400) -> 429 against the model's queue ->
/generate's validation (400) -> subscribe + enqueue -> wait or stream.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Iterable, Iterator

import orjson
from flask import Blueprint, Response, request

from common.schemas import FinalEvent, TokenEvent

from ..core.chat_template import TemplateError
from ..core.handlers import count_successes, failures_counted, state, stream_hooks, wait_finals
from ..core.models import ServedModel
from ..core.service import Submission
from ..core.state import TgqState
from ..core.streams import StreamHooks, guarded, keepalives
from .answers import AnswerRules
from .errors import JSON, InvalidRequest, openai_error
from .requests import Planned, V1Request, chat_request, choices, completion_request, load_body, plan
from .responses import DONE, Envelope, sse
from .tools import Tools

bp = Blueprint("v1", __name__)

GUARDED_ENDPOINTS = frozenset({"v1.chat_completions", "v1.completions", "v1.models"})
SSE_TYPE = "text/event-stream"
KEEPALIVE = b": keep-alive\n\n"


@bp.post("/v1/chat/completions")
def chat_completions() -> Response:
    st = state()
    req = chat_request(load_body(request.get_data(cache=False)), st.api.max_n)
    model = st.models.route(req.model)
    return _serve(st, model, dataclasses.replace(req, prompts=[render_chat(model, req.messages or [], req.tools)]),
                  chat=True)


@bp.post("/v1/completions")
def completions() -> Response:
    st = state()
    req = completion_request(load_body(request.get_data(cache=False)), st.api.max_n)
    return _serve(st, st.models.route(req.model), req, chat=False)


@bp.get("/v1/models")
def models() -> Response:
    st = state()
    data = [{"id": m.id, "object": "model", "created": m.created, "owned_by": "tgq", "workers": m.live_workers()}
            for m in st.models.models]
    return Response(orjson.dumps({"object": "list", "data": data}), content_type=JSON)


def render_chat(model: ServedModel, messages: list[dict], tools: Tools | None = None) -> str:
    """The model's chat template applied to the messages (and the tools the model is shown); 400
    without a template or when it raises."""
    if model.template is None:
        raise InvalidRequest(f"Template error: the model `{model.id}` has no chat template", "messages")
    shown = None
    if tools is not None:
        messages, shown = tools.prompt(messages, model.template.handles_tools)
    try:
        return model.template.render(messages, shown)
    except TemplateError as exc:
        raise InvalidRequest(f"Template error: {exc}", "messages") from None


def _serve(st: TgqState, model: ServedModel, req: V1Request, *, chat: bool) -> Response:
    start = time.time()
    st.metrics.request_count.inc()
    with failures_counted(st):
        wanted = choices(req)
        if wanted > model.limits.max_queue_length:  # could never be admitted: not worth a retry
            raise InvalidRequest(f"The request asks for {wanted} choices (`n` per prompt); at most "
                                 f"{model.limits.max_queue_length} may wait in the queue", "prompt" if not chat else "n")
        model.admit(wanted)
        planned = plan(model, req)
        for spec in planned.specs:
            st.metrics.validated(len(spec.input_ids), spec.stopping.max_new_tokens, len(spec.seeds))
        sub = st.service.submit(model.queue, planned.specs)
    envelope = Envelope(chat=chat, model=model.id)
    logprobs = req.sampling.top_logprobs is not None
    if req.stream:
        hooks = stream_hooks(st, model, sub, start)
        events = st.service.events(sub, hooks.client_gone, tick_s=st.keepalive_s)
        body = _stream(events, sub, envelope, planned, hooks, keepalive_s=st.keepalive_s, logprobs=logprobs,
                       include_usage=req.include_usage, rules=req.rules)
        return Response(body, status=200, content_type=SSE_TYPE,
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    finals = wait_finals(st, model, sub)
    if finals is None:
        return Response(b"", status=499)  # the client went away: nobody reads it
    count_successes(st, sub, finals, start)
    return Response(orjson.dumps(envelope.body(finals, planned.prompt_tokens, logprobs, req.rules)), content_type=JSON)


def _stream(events: Iterable[TokenEvent | FinalEvent | None], sub: Submission, envelope: Envelope,
            planned: Planned, hooks: StreamHooks, *, keepalive_s: float, logprobs: bool,
            include_usage: bool, rules: AnswerRules) -> Iterator[bytes]:
    """OpenAI's chunks: per choice the role first (chat), one chunk per token, `finish_reason` on the
    last token's chunk (a tool call: its chunks, then one with `finish_reason`); then the usage chunk
    when asked for, then `data: [DONE]`."""
    def body() -> Iterator[bytes]:
        started: set[int] = set()
        answers = [rules.stream() for _ in sub.jobs]  # each choice's text shown so far, and held back
        offsets = [0] * len(sub.jobs)  # and their length (completions' text_offset)
        finals: list[FinalEvent] = []
        for item in keepalives(events, keepalive_s, KEEPALIVE):
            if isinstance(item, bytes):
                yield item
                continue
            i = sub.choice(item)
            if envelope.chat and i not in started:
                started.add(i)
                yield envelope.chunk(i, None, role=True, with_usage=include_usage)
            last = isinstance(item, FinalEvent)
            if last:
                finals.append(item)
                if len(finals) == len(sub.jobs):
                    hooks.succeeded(finals)  # before the last chunk: a client gone after it is no drop
            if not last:
                text = answers[i].token(item.token)
                if text is not None:  # None: a tool call, shown once it is complete
                    yield envelope.chunk(i, item.token, text=text, logprobs=logprobs, offset=offsets[i],
                                         with_usage=include_usage)
                    offsets[i] += len(text)
                continue
            text, answer = answers[i].final(item)
            if answer.tool_calls is not None:
                yield from envelope.tool_call_chunks(i, answer.tool_calls, with_usage=include_usage)
                yield envelope.chunk(i, None, text="", reason=answer.finish_reason, with_usage=include_usage)
            else:
                yield envelope.chunk(i, item.token, text=text, logprobs=logprobs, offset=offsets[i],
                                     reason=answer.finish_reason, with_usage=include_usage)
            offsets[i] += len(text)
        if include_usage:
            yield envelope.usage_chunk(planned.prompt_tokens, sum(f.generated_tokens for f in finals))
        yield DONE

    return guarded(body(), hooks, lambda exc: sse(openai_error(exc)[1]) + DONE)

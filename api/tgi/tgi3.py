"""TGI 3.x routes that 0.5.0 lacks: `GET /info`, `POST /tokenize`, `POST /chat_tokenize`.

`/info` and `/tokenize` describe the default model, as TGI's routes do; `/chat_tokenize` takes a
chat request and routes it by its `model` field like /v1/chat/completions.
"""
from __future__ import annotations

from typing import Any

import orjson
from flask import Blueprint, Response, request
from tokenizers import Tokenizer

from ..core.handlers import state
from ..core.models import ServedModel
from ..v1.requests import chat_request, load_body
from ..v1.routes import render_chat
from .errors import JSON
from .parsing import parse_request

bp = Blueprint("tgi3", __name__)

GUARDED_ENDPOINTS = frozenset({"tgi3.tokenize", "tgi3.chat_tokenize"})
VERSION = "0.1.0"
ROUTER = "tgq"


@bp.get("/info")
def info() -> Response:
    st = state()
    model = st.models.default
    limits = model.limits
    body = {"model_id": model.id, "model_sha": None, "model_pipeline_tag": "text-generation",
            "max_concurrent_requests": limits.max_queue_length, "max_best_of": limits.max_best_of,
            "max_stop_sequences": limits.max_stop_sequences, "max_input_tokens": limits.max_input_length,
            "max_total_tokens": limits.max_total_tokens, "validation_workers": st.api.workers,
            "max_client_batch_size": 1, "router": ROUTER, "version": VERSION, "sha": None, "docker_label": None}
    return Response(orjson.dumps(body), content_type=JSON)


@bp.post("/tokenize")
def tokenize() -> Response:
    """A generate request's prompt as TGI tokenizes it: `[{"id", "text", "start", "stop"}]`, offsets in
    characters of `inputs`, after `truncate`."""
    raw = parse_request(request.get_data(cache=False), request.headers.get("Content-Type"))
    tokens = _tokens(state().models.default.tokenizer, raw.inputs, add_special_tokens=True)
    truncate = raw.parameters.truncate
    if truncate is not None and 0 < truncate < len(tokens):
        tokens = tokens[len(tokens) - truncate:]
    return Response(orjson.dumps(tokens), content_type=JSON)


@bp.post("/chat_tokenize")
def chat_tokenize() -> Response:
    """A chat request's templated text and its tokens (no special tokens added: the template writes them)."""
    st = state()
    req = chat_request(load_body(request.get_data(cache=False)), st.api.max_n)
    model: ServedModel = st.models.route(req.model)
    text = render_chat(model, req.messages or [], req.tools)
    body = {"tokenize_response": _tokens(model.tokenizer, text, add_special_tokens=False), "templated_text": text}
    return Response(orjson.dumps(body), content_type=JSON)


def _tokens(tokenizer: Tokenizer, text: str, *, add_special_tokens: bool) -> list[dict[str, Any]]:
    encoding = tokenizer.encode(text, add_special_tokens=add_special_tokens)
    return [{"id": i, "text": text[start:stop], "start": start, "stop": stop}
            for i, (start, stop) in zip(encoding.ids, encoding.offsets)]

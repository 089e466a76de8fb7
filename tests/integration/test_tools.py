"""Tool calls on /v1/chat/completions through a real stack (tiny random model with SmolLM2's tokenizer and
chat template, which has no tool support: tgq's generic tool prompt and call format), with the `openai`
SDK assembling streams, and every shape checked against OpenAI's published schemas."""
from __future__ import annotations

import json

import jsonschema
import pytest
import requests

from tests.support.openai_schema import problems

from .conftest import MODEL_ID

pytestmark = pytest.mark.integration

CITY = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                         "days": {"type": "integer", "minimum": 1, "maximum": 7}},
        "required": ["city", "days"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Forecast", "parameters": CITY}},
         {"type": "function", "function": {"name": "get_time", "parameters": {
             "type": "object", "properties": {}, "additionalProperties": False}}}]
PARAMETERS = {"get_weather": CITY, "get_time": TOOLS[1]["function"]["parameters"]}
ASK = [{"role": "user", "content": "Weather in Paris for 3 days?"}]


def chat(url, **fields):
    return requests.post(url + "/v1/chat/completions", timeout=60,
                         json={"messages": ASK, "max_tokens": 80, "tools": TOOLS, **fields})


def check_calls(calls, allowed=("get_weather", "get_time")):
    for call in calls:
        assert call["id"].startswith("call_") and call["type"] == "function"
        assert call["function"]["name"] in allowed
        jsonschema.validate(json.loads(call["function"]["arguments"]), PARAMETERS[call["function"]["name"]])


@pytest.mark.parametrize("tool_choice, allowed", [
    ("required", ("get_weather", "get_time")),
    ({"type": "function", "function": {"name": "get_weather"}}, ("get_weather",)),
])
def test_required_and_a_named_function_always_give_a_well_formed_call(stack, tool_choice, allowed):
    for seed in range(3):  # one call each: the random model could make a list of calls longer than max_tokens
        body = chat(stack.url, tool_choice=tool_choice, temperature=1.0, seed=seed, parallel_tool_calls=False).json()
        assert problems("CreateChatCompletionResponse", body) == []
        choice = body["choices"][0]
        assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
        check_calls(choice["message"]["tool_calls"], allowed)
        if isinstance(tool_choice, dict):
            assert len(choice["message"]["tool_calls"]) == 1


def test_parallel_tool_calls_false_gives_one_call(stack):
    for seed in range(3):
        body = chat(stack.url, tool_choice="required", parallel_tool_calls=False, temperature=1.0, seed=seed).json()
        assert len(body["choices"][0]["message"]["tool_calls"]) == 1


def test_auto_answers_in_the_right_fields(stack):
    for seed in range(6):
        choice = chat(stack.url, temperature=1.0, seed=seed, parallel_tool_calls=False).json()["choices"][0]
        if choice["finish_reason"] == "tool_calls":
            check_calls(choice["message"]["tool_calls"])
            assert choice["message"]["content"] is None
        else:
            assert "tool_calls" not in choice["message"] and not choice["message"]["content"].startswith("{")


def test_the_openai_sdk_assembles_streamed_calls(stack):
    from openai import OpenAI

    client = OpenAI(base_url=stack.url + "/v1", api_key="-", max_retries=0)
    stream = client.chat.completions.create(model=MODEL_ID, messages=ASK, tools=TOOLS, max_tokens=80, stream=True,
                                            tool_choice={"type": "function", "function": {"name": "get_weather"}})
    calls: dict[int, dict] = {}
    reasons = []
    raw = []
    for chunk in stream:
        raw.append(chunk.model_dump(exclude_unset=True))
        delta = chunk.choices[0].delta
        reasons.append(chunk.choices[0].finish_reason)
        for part in delta.tool_calls or []:
            call = calls.setdefault(part.index, {"id": None, "name": "", "arguments": ""})
            call["id"] = part.id or call["id"]
            call["name"] += part.function.name or ""
            call["arguments"] += part.function.arguments or ""
    assert reasons[-1] == "tool_calls" and set(reasons[:-1]) == {None}
    assert len(calls) == 1 and calls[0]["name"] == "get_weather" and calls[0]["id"].startswith("call_")
    jsonschema.validate(json.loads(calls[0]["arguments"]), CITY)
    assert all(problems("CreateChatCompletionStreamResponse", c) == [] for c in raw)


def test_a_second_turn_carries_the_tool_result(stack):
    # one call, greedy: the random model could otherwise list calls past max_tokens
    first = chat(stack.url, tool_choice="required", parallel_tool_calls=False,
                 temperature=0).json()["choices"][0]["message"]
    turn = ASK + [{"role": "assistant", "content": None, "tool_calls": first["tool_calls"]},
                  {"role": "tool", "tool_call_id": first["tool_calls"][0]["id"], "content": "18 C and sunny"}]
    resp = requests.post(stack.url + "/v1/chat/completions", timeout=60,
                         json={"messages": turn, "tools": TOOLS, "tool_choice": "none", "max_tokens": 10})
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["message"]["content"] is not None
    shown = requests.post(stack.url + "/chat_tokenize", timeout=10,
                          json={"messages": turn, "tools": TOOLS}).json()["templated_text"]
    assert "You can call functions" in shown and '"name": "get_weather"' in shown
    written = json.dumps({"tool_calls": [{"name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"])}
                                         for c in first["tool_calls"]]})
    assert f"<|im_start|>assistant\n{written}<|im_end|>" in shown, shown
    assert "18 C and sunny" in shown


@pytest.mark.parametrize("fields, param", [
    ({"tool_choice": {"type": "function", "function": {"name": "get_news"}}}, "tool_choice"),
    ({"tool_choice": "always"}, "tool_choice"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 7}}}]}, "tools"),
])
def test_tool_requests_that_cannot_be_honoured_are_400(stack, fields, param):
    resp = chat(stack.url, **fields)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == param


def test_a_stop_sequence_is_cut_from_v1_answers_but_kept_on_tgis_routes(stack):
    body = {"messages": ASK, "max_tokens": 40, "temperature": 0}
    full = requests.post(stack.url + "/v1/chat/completions", json=body, timeout=60).json()["choices"][0]["message"]
    stop = full["content"][5:8]
    cut = requests.post(stack.url + "/v1/chat/completions", json={**body, "stop": [stop]}, timeout=60).json()
    choice = cut["choices"][0]
    assert choice["finish_reason"] == "stop" and stop not in choice["message"]["content"]
    assert full["content"].startswith(choice["message"]["content"])
    streamed = requests.post(stack.url + "/v1/chat/completions", json={**body, "stop": [stop], "stream": True},
                             stream=True, timeout=60)
    text = "".join((json.loads(line[6:])["choices"][0]["delta"].get("content") or "")
                   for line in streamed.iter_lines() if line.startswith(b"data: {"))
    assert text == choice["message"]["content"]


def test_huggingface_hub_parses_a_streamed_call(stack):
    from huggingface_hub import InferenceClient

    client = InferenceClient(stack.url)
    name, arguments, reasons = "", "", []
    for chunk in client.chat_completion(ASK, tools=TOOLS, tool_choice="required", max_tokens=80, stream=True,
                                        extra_body={"parallel_tool_calls": False}):
        reasons.append(chunk.choices[0].finish_reason)
        for call in chunk.choices[0].delta.tool_calls or []:
            name += call.function.name or ""
            arguments += call.function.arguments or ""
    assert reasons[-1] == "tool_calls" and name in PARAMETERS
    jsonschema.validate(json.loads(arguments), PARAMETERS[name])

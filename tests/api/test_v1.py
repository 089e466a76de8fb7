"""The /v1 routes and TGI 3's extra routes through the Flask app, a real Redis and RQ, with the
test acting as the worker (real protocol events): request mapping, formats, errors, routing."""
from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path
from typing import Any

import orjson
import pytest
from rq import Queue
from rq.serializers import JSONSerializer

from common import protocol
from common.schemas import ErrorEvent, FinishReason, GenerationJob, Token, TokenEvent
from common.settings import LimitSettings

from .conftest import LIMITS, Harness, error_for, final_for, script_tokens, tok

CHATML = ("{% for m in messages %}<s>{{ m['role'] }} {{ m['content'] }}</s>{% endfor %}"
          "{% if add_generation_prompt %}<s>assistant{% endif %}")
USER = [{"role": "user", "content": "hello world"}]


@pytest.fixture(scope="session")
def chat_dir(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny tokenizer with a chat template in chat_template.jinja."""
    path = tmp_path_factory.mktemp("chat-model")
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(model_dir / name, path / name)
    (path / "chat_template.jinja").write_text(CHATML)
    return path


@pytest.fixture
def chat(make_harness: Any, chat_dir: Path) -> Harness:
    return make_harness(models=(str(chat_dir),), model_ids=("chat",))


def post(h: Harness, path: str, body: dict[str, Any], **headers: str) -> Any:
    return h.client.post(path, data=json.dumps(body), content_type="application/json", headers=headers)


def events(data: bytes) -> list[Any]:
    """The SSE events of an OpenAI stream: parsed JSON, or the string "[DONE]"."""
    out: list[Any] = []
    for block in data.decode().split("\n\n"):
        if not block:
            continue
        assert block.startswith("data: "), block
        payload = block[len("data: "):]
        out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


TOKENS = [tok(5, " hello"), tok(6, " world"), tok(2, "</s>", special=True)]


def eos_script(job: GenerationJob) -> list[Any]:
    return script_tokens(TOKENS, " hello world", reason=FinishReason.EOS_TOKEN)(job)


def recording(jobs: list[GenerationJob]) -> Any:
    """A worker script that keeps each job it takes and answers " hello world" then EOS."""
    def record(job: GenerationJob) -> list[Any]:
        jobs.append(job)
        return eos_script(job)
    return record


# --- chat -------------------------------------------------------------------------------------

def test_chat_renders_the_template_and_maps_parameters(chat: Harness) -> None:
    worker = chat.serve(eos_script)
    resp = post(chat, "/v1/chat/completions", {
        "model": "chat", "messages": USER, "temperature": 0, "max_tokens": 7, "stop": "x",
        "frequency_penalty": 0.5, "presence_penalty": -0.25, "seed": 3})
    worker.join(5)
    assert resp.status_code == 200, resp.data
    body = resp.get_json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-") and body["model"] == "chat"
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": " hello world", "refusal": None},
                                "logprobs": None, "finish_reason": "stop"}]
    # "<s>user hello world</s><s>assistant": 7 tokens with no BOS added (the template writes its own)
    assert body["usage"] == {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}


def test_chat_job_fields(chat: Harness) -> None:
    jobs: list[GenerationJob] = []
    worker = chat.serve(recording(jobs), jobs=3)
    resp = post(chat, "/v1/chat/completions", {
        "messages": USER, "temperature": 0, "max_tokens": 7, "stop": ["x", "y"], "top_p": 1.0,
        "frequency_penalty": 0.5, "presence_penalty": -0.25, "seed": 2**64 - 2, "n": 3,
        "logprobs": True, "top_logprobs": 4})
    worker.join(5)
    assert resp.status_code == 200, resp.data
    assert [c["index"] for c in resp.get_json()["choices"]] == [0, 1, 2]
    assert len(jobs) == 3
    job = jobs[0]
    assert job.input_ids == (1, 0, 3, 4, 2, 1, 0)  # <s> user hello world </s> <s> assistant: no BOS added
    assert not job.sampling.sampling  # temperature 0: greedy; top_p 1.0: off
    assert job.stopping.max_new_tokens == 7 and job.stopping.stop == ("x", "y")
    assert (job.sampling.frequency_penalty, job.sampling.presence_penalty) == (0.5, -0.25)
    assert job.sampling.top_n_tokens == 4 and job.want_tokens
    assert sorted(j.sampling.seed for j in jobs) == [0, 2**64 - 2, 2**64 - 1]  # seed + i, wrapping at 2**64


def test_default_temperature_samples_and_max_tokens_fills_the_total(chat: Harness) -> None:
    jobs: list[GenerationJob] = []
    worker = chat.serve(recording(jobs))
    resp = post(chat, "/v1/chat/completions", {"messages": USER})
    worker.join(5)
    assert resp.status_code == 200
    assert jobs[0].sampling.sampling and jobs[0].sampling.temperature == 1.0  # OpenAI's default samples
    assert jobs[0].stopping.max_new_tokens == LIMITS.max_total_tokens - 7
    assert not jobs[0].want_tokens and jobs[0].sampling.top_n_tokens == 0


def test_chat_stream_framing(chat: Harness) -> None:
    worker = chat.serve(eos_script)
    resp = post(chat, "/v1/chat/completions", {"messages": USER, "temperature": 0, "stream": True,
                                               "stream_options": {"include_usage": True}})
    data = resp.get_data()
    worker.join(5)
    assert resp.status_code == 200 and resp.content_type == "text/event-stream"
    got = events(data)
    assert got[-1] == "[DONE]"
    chunks = got[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    deltas = [c["choices"][0]["delta"]["content"] for c in chunks[1:-1]]
    assert "".join(deltas) == " hello world"  # the EOS token adds nothing
    assert [c["choices"][0]["finish_reason"] for c in chunks[1:-1]] == [None, None, "stop"]
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == {
        "prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}


def test_chat_logprobs(chat: Harness) -> None:
    alts = (Token(6, " world", -0.1, False), Token(7, " the", -2.5, False))
    tokens = [Token(6, " world", -0.1, False, top=alts), Token(2, "</s>", float("-inf"), True, top=alts)]
    worker = chat.serve(script_tokens(tokens, " world", reason=FinishReason.EOS_TOKEN))
    resp = post(chat, "/v1/chat/completions", {"messages": USER, "logprobs": True, "top_logprobs": 2})
    worker.join(5)
    content = resp.get_json()["choices"][0]["logprobs"]["content"]
    assert content == [{"token": " world", "logprob": -0.1, "bytes": list(b" world"), "top_logprobs": [
        {"token": " world", "logprob": -0.1, "bytes": list(b" world")},
        {"token": " the", "logprob": -2.5, "bytes": list(b" the")}]}]  # the special EOS is not content


def test_chat_continues_a_final_assistant_message(chat: Harness) -> None:
    resp = post(chat, "/chat_tokenize", {"messages": [*USER, {"role": "assistant", "content": "hello"}]})
    assert resp.status_code == 200
    body = resp.get_json()
    assert body["templated_text"] == "<s>user hello world</s><s>assistant hello"
    assert [t["text"] for t in body["tokenize_response"]][-2:] == ["assistant", "hello"]


def test_content_parts_are_joined(chat: Harness) -> None:
    parts = [{"role": "user", "content": [{"type": "text", "text": "hello "}, {"type": "text", "text": "world"}]}]
    resp = post(chat, "/chat_tokenize", {"messages": parts})
    assert resp.get_json()["templated_text"] == "<s>user hello world</s><s>assistant"


# --- completions ------------------------------------------------------------------------------

def test_completions_one_choice_per_prompt(chat: Harness) -> None:
    prompts: list[tuple[int, ...]] = []

    def record(job: GenerationJob) -> list[Any]:
        prompts.append(job.input_ids)
        n = len(job.input_ids)
        return script_tokens([tok(5, f" p{n}")], f" p{n}")(job)

    worker = chat.serve(record, jobs=2)
    resp = post(chat, "/v1/completions", {"prompt": ["hello", "hello world ."], "max_tokens": 1, "temperature": 0})
    worker.join(5)
    body = resp.get_json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    # special tokens added as /generate does (BOS): 2 and 4 tokens
    assert [(c["index"], c["text"], c["finish_reason"]) for c in body["choices"]] == [
        (0, " p2", "length"), (1, " p4", "length")]
    assert sorted(prompts) == [(1, 3), (1, 3, 4, 13)]
    assert body["usage"] == {"prompt_tokens": 6, "completion_tokens": 2, "total_tokens": 8}


def test_completions_stream(chat: Harness) -> None:
    worker = chat.serve(eos_script)
    resp = post(chat, "/v1/completions", {"prompt": "hello", "stream": True, "logprobs": 0})
    got = events(resp.get_data())
    worker.join(5)
    assert got[-1] == "[DONE]"
    assert all(c["object"] == "text_completion" for c in got[:-1])
    assert "".join(c["choices"][0]["text"] for c in got[:-1]) == " hello world"
    assert [c["choices"][0]["logprobs"]["text_offset"] for c in got[:2]] == [[0], [6]]


# --- errors -----------------------------------------------------------------------------------

def error_of(resp: Any) -> dict[str, Any]:
    body = resp.get_json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]  # type: ignore[no-any-return]


@pytest.mark.parametrize("body, param", [
    ({"messages": USER, "temperature": 2.5}, "temperature"),
    ({"messages": USER, "temperature": "hot"}, "temperature"),
    ({"messages": USER, "top_p": 1.5}, "top_p"),
    ({"messages": USER, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"messages": USER, "top_logprobs": 2}, "top_logprobs"),
    ({"messages": USER, "n": 9}, "n"),
    ({"messages": USER, "n": True}, "n"),
    ({"messages": USER, "max_tokens": 0}, "max_tokens"),
    ({"messages": USER, "seed": -1}, "seed"),
    ({"messages": USER, "frequency_penalty": 3}, "frequency_penalty"),
    ({"messages": USER, "stop": [1]}, "stop"),
    ({"messages": USER, "stream_options": {"include_usage": True}}, "stream_options"),
    ({"messages": []}, "messages"),
    ({"messages": [{"content": "x"}]}, "messages[0]"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content"),
])
def test_invalid_chat_requests_are_400(chat: Harness, body: dict[str, Any], param: str) -> None:
    resp = post(chat, "/v1/chat/completions", body)
    assert resp.status_code == 400
    err = error_of(resp)
    assert err["type"] == "invalid_request_error" and err["param"] == param
    assert chat.queue.count == 0


def test_generate_rules_apply_with_tgi_messages(chat: Harness) -> None:
    resp = post(chat, "/v1/chat/completions", {"messages": USER, "max_tokens": LIMITS.max_total_tokens})
    assert resp.status_code == 400
    assert error_of(resp)["param"] == "max_tokens"
    assert error_of(resp)["message"] == (
        f"Input validation error: `inputs` tokens + `max_new_tokens` must be <= {LIMITS.max_total_tokens}. "
        f"Given: 7 `inputs` tokens and {LIMITS.max_total_tokens} `max_new_tokens`")
    resp = post(chat, "/v1/chat/completions", {"messages": USER, "stop": ["a", "b", "c", "d", "e"]})
    assert error_of(resp)["message"] == "Input validation error: `stop` supports up to 4 stop sequences. Given: 5"
    assert error_of(resp)["param"] == "stop"
    resp = post(chat, "/v1/completions", {"prompt": "", "max_tokens": 2})
    assert error_of(resp)["message"] == "Input validation error: `inputs` cannot be empty"
    assert error_of(resp)["param"] == "prompt"


def test_malformed_bodies_are_400_in_openai_shape(chat: Harness) -> None:
    for data in (b"{", b"[1]", b'"x"'):
        resp = chat.client.post("/v1/chat/completions", data=data, content_type="application/json")
        assert resp.status_code == 400 and error_of(resp)["type"] == "invalid_request_error"


def test_no_template_is_400(harness: Harness) -> None:
    resp = post(harness, "/v1/chat/completions", {"messages": USER})
    assert resp.status_code == 400
    assert error_of(resp)["message"].startswith("Template error: ")


def test_a_template_that_raises_is_400(make_harness: Any, chat_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "strict"
    shutil.copytree(chat_dir, path)
    (path / "chat_template.jinja").write_text("{{ raise_exception('roles must alternate') }}")
    h = make_harness(models=(str(path),))
    resp = post(h, "/v1/chat/completions", {"messages": USER})
    assert resp.status_code == 400 and error_of(resp)["message"] == "Template error: roles must alternate"


def test_overloaded_is_429(make_harness: Any, chat_dir: Path) -> None:
    h = make_harness(limits=LimitSettings(max_input_length=32, max_total_tokens=64, max_queue_length=1),
                     models=(str(chat_dir),))
    h.queue.enqueue_call(func=protocol.JOB_FUNC, args=[{}], job_id="waiting")
    resp = post(h, "/v1/chat/completions", {"messages": USER, "max_tokens": 2})
    assert resp.status_code == 429 and error_of(resp)["code"] == "rate_limit_exceeded"


def test_worker_failure_is_500_server_error(chat: Harness) -> None:
    worker = chat.serve(lambda job: [error_for(job, "Server error: boom")])
    resp = post(chat, "/v1/chat/completions", {"messages": USER, "max_tokens": 2})
    worker.join(5)
    assert resp.status_code == 500
    err = error_of(resp)
    assert err["type"] == "server_error" and "boom" in err["message"]


def test_error_after_the_stream_started_is_an_error_event_then_done(chat: Harness) -> None:
    def script(job: GenerationJob) -> list[Any]:
        return [TokenEvent(job.request_id, 0, 0, tok(5, " hello")), ErrorEvent(job.request_id, 0, "boom", "generation")]

    worker = chat.serve(script)
    resp = post(chat, "/v1/chat/completions", {"messages": USER, "stream": True, "max_tokens": 4})
    got = events(resp.get_data())
    worker.join(5)
    assert got[-1] == "[DONE]"
    assert got[-2]["error"]["type"] == "server_error" and "boom" in got[-2]["error"]["message"]
    assert got[1]["choices"][0]["delta"]["content"] == " hello"


def test_incomplete_generation_is_500(make_harness: Any, chat_dir: Path) -> None:
    h = make_harness(models=(str(chat_dir),), request_timeout=0.5)
    resp = post(h, "/v1/chat/completions", {"messages": USER, "max_tokens": 2})
    assert resp.status_code == 500 and error_of(resp)["message"] == "Incomplete generation"


def test_api_key_401_and_413_in_openai_shape(make_harness: Any, chat_dir: Path) -> None:
    h = make_harness(models=(str(chat_dir),), api_key="sekrit", max_body_bytes=200)
    for path in ("/v1/chat/completions", "/v1/completions"):
        resp = post(h, path, {"messages": USER, "prompt": "x"})
        assert resp.status_code == 401 and error_of(resp)["type"] == "authentication_error"
    assert h.client.get("/v1/models").status_code == 401
    assert h.client.get("/v1/models", headers={"Authorization": "Bearer sekrit"}).status_code == 200
    assert h.client.get("/info").status_code == 200  # TGI's info stays open
    resp = post(h, "/v1/chat/completions", {"messages": USER, "pad": "x" * 300}, Authorization="Bearer sekrit")
    assert resp.status_code == 413 and error_of(resp)["code"] == "request_too_large"
    resp = post(h, "/generate", {"inputs": "x" * 300})
    assert resp.status_code == 401 and resp.get_json()["error_type"] == "unauthorized"  # TGI's shape


def test_redis_down_is_503(make_harness: Any, chat_dir: Path) -> None:
    h = make_harness(models=(str(chat_dir),), redis_url_override="redis://127.0.0.1:1/0")
    resp = post(h, "/v1/chat/completions", {"messages": USER, "max_tokens": 2})
    assert resp.status_code == 503 and error_of(resp)["code"] == "service_unavailable"


# --- several models -----------------------------------------------------------------------------

@pytest.fixture
def two(make_harness: Any, chat_dir: Path) -> Harness:
    return make_harness(models=(str(chat_dir), str(chat_dir)), model_ids=("first", "second"))


def answer_from(h: Harness, model_id: str, text: str) -> threading.Thread:
    queue = Queue(protocol.queue_name(model_id), connection=h.redis, serializer=JSONSerializer)

    def run() -> None:
        found = Queue.dequeue_any([queue], timeout=5, connection=h.redis, serializer=JSONSerializer)
        assert found is not None
        job = GenerationJob.from_dict(found[0].args[0])
        h.publish(job, final_for(job, [tok(5, text)], text))
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("name, served", [
    ("second", "second"), ("first", "first"), (None, "first"), ("tgi", "first"), ("dummy", "first")])
def test_requests_route_by_model(two: Harness, name: str | None, served: str) -> None:
    worker = answer_from(two, served, f" from {served}")
    body: dict[str, Any] = {"messages": USER, "max_tokens": 1}
    if name is not None:
        body["model"] = name
    resp = post(two, "/v1/chat/completions", body)
    worker.join(5)
    assert resp.status_code == 200, resp.data
    assert resp.get_json()["model"] == served
    assert resp.get_json()["choices"][0]["message"]["content"] == f" from {served}"


def test_unknown_model_is_404_listing_the_served(two: Harness) -> None:
    resp = post(two, "/v1/chat/completions", {"model": "nope", "messages": USER})
    assert resp.status_code == 404
    err = error_of(resp)
    assert err["code"] == "model_not_found" and "first" in err["message"] and "second" in err["message"]


def test_one_model_takes_any_name(chat: Harness) -> None:
    worker = chat.serve(eos_script)
    resp = post(chat, "/v1/chat/completions", {"model": "gpt-4o", "messages": USER, "max_tokens": 3})
    worker.join(5)
    assert resp.status_code == 200 and resp.get_json()["model"] == "chat"


def test_models_list_and_metrics(two: Harness) -> None:
    resp = two.client.get("/v1/models")
    body = resp.get_json()
    assert body["object"] == "list"
    assert [(m["id"], m["object"], m["owned_by"], m["workers"]) for m in body["data"]] == [
        ("first", "model", "tgq", 0), ("second", "model", "tgq", 0)]
    queue = Queue(protocol.queue_name("second"), connection=two.redis, serializer=JSONSerializer)
    queue.enqueue_call(func=protocol.JOB_FUNC, args=[{}], job_id="waiting-second")
    text = two.client.get("/metrics").get_data(as_text=True)
    assert "tgi_queue_size 0\n" in text
    assert 'tgq_model_queue_size{model="first"} 0\n' in text and 'tgq_model_queue_size{model="second"} 1\n' in text


# --- TGI 3's routes ------------------------------------------------------------------------------

def test_info(chat: Harness) -> None:
    body = chat.client.get("/info").get_json()
    assert body["model_id"] == "chat" and body["max_total_tokens"] == LIMITS.max_total_tokens
    assert body["max_input_tokens"] == LIMITS.max_input_length and body["max_best_of"] == LIMITS.max_best_of
    assert {"model_sha", "model_pipeline_tag", "max_concurrent_requests", "max_stop_sequences",
            "validation_workers", "max_client_batch_size", "router", "version", "sha", "docker_label"} <= set(body)


def test_tokenize(chat: Harness) -> None:
    resp = post(chat, "/tokenize", {"inputs": "hello world!"})
    assert resp.status_code == 200
    assert orjson.loads(resp.get_data()) == [
        {"id": 1, "text": "", "start": 0, "stop": 0}, {"id": 3, "text": "hello", "start": 0, "stop": 5},
        {"id": 4, "text": "world", "start": 6, "stop": 11}, {"id": 15, "text": "!", "start": 11, "stop": 12}]
    resp = post(chat, "/tokenize", {"inputs": "hello world!", "parameters": {"truncate": 2}})
    assert [t["text"] for t in resp.get_json()] == ["world", "!"]
    assert post(chat, "/tokenize", {"nope": 1}).status_code == 422  # TGI's body rules


def test_temperature_zero_is_greedy_whatever_top_p(chat: Harness) -> None:
    jobs: list[GenerationJob] = []
    worker = chat.serve(recording(jobs))
    resp = post(chat, "/v1/completions", {"prompt": "hello", "temperature": 0, "top_p": 0.5, "max_tokens": 3})
    worker.join(5)
    assert resp.status_code == 200
    assert not jobs[0].sampling.sampling and jobs[0].sampling.top_p == 1.0


def test_more_choices_than_the_queue_holds_is_400_not_429(chat: Harness) -> None:
    resp = post(chat, "/v1/completions", {"prompt": ["hello"] * 2, "n": 2, "max_tokens": 1})  # 4 > 3 waiting jobs
    assert resp.status_code == 400 and error_of(resp)["param"] == "prompt"
    assert chat.queue.count == 0


def test_a_prompt_that_leaves_no_room_names_the_prompt(chat: Harness) -> None:
    resp = post(chat, "/v1/completions", {"prompt": "hello " * LIMITS.max_total_tokens})
    assert resp.status_code == 400
    err = error_of(resp)
    assert err["param"] == "prompt" and err["message"] == (
        f"Input validation error: `inputs` must have less than {LIMITS.max_input_length} tokens. "
        f"Given: {LIMITS.max_total_tokens + 1}")


def test_a_template_that_recurses_is_400(make_harness: Any, chat_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "tojson"
    shutil.copytree(chat_dir, path)
    (path / "chat_template.jinja").write_text("{% for m in messages %}{{ m.tool_calls | tojson }}{% endfor %}")
    nested = "[" * 1000 + "]" * 1000  # as deep as the JSON parser takes; too deep for the template's tojson
    h = make_harness(models=(str(path),))
    body = '{"messages": [{"role": "user", "content": "x", "tool_calls": %s}]}' % nested
    resp = h.client.post("/chat_tokenize", data=body, content_type="application/json")
    assert resp.status_code == 400 and resp.get_json()["error"].startswith("Template error")


def test_two_models_with_one_id_are_refused(make_harness: Any, chat_dir: Path) -> None:
    from common.settings import SettingsError

    with pytest.raises(SettingsError, match="give each its own --model-id"):
        make_harness(models=(str(chat_dir), str(chat_dir)))


def test_a_stream_read_to_its_end_counts_one_success_and_no_drop(chat: Harness) -> None:
    worker = chat.serve(eos_script)
    resp = post(chat, "/v1/chat/completions", {"messages": USER, "stream": True, "max_tokens": 3})
    body = iter(resp.response)
    for chunk in body:
        if b'"finish_reason":"stop"' in chunk:
            break
    resp.close()  # the client leaves right after the last content chunk, before [DONE]
    worker.join(5)
    text = chat.client.get("/metrics").get_data(as_text=True)
    assert "tgi_request_success 1\n" in text
    assert 'err="dropped"' not in text

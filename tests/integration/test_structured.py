"""Output constraints through real stacks (HTTP -> API -> Redis -> worker), tiny random model: TGI 3's
`grammar` on TGI's routes, `response_format` and `structured_outputs` on /v1, bad constraints refused
with each dialect's status, and a constrained job re-run after its worker is SIGKILLed."""
from __future__ import annotations

import concurrent.futures as cf
import json
import re
import signal
import time

import jsonschema
import pytest
import requests

from rq.job import Job
from rq.registry import FinishedJobRegistry


from .conftest import make_fragile_stack
from .faults import rq_queue
from .sse import stream_events

pytestmark = pytest.mark.integration

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}


def generate(url, grammar, **params):
    return requests.post(url + "/generate", timeout=60, json={
        "inputs": "Describe a person", "parameters": {"max_new_tokens": 60, "grammar": grammar, **params}})


@pytest.mark.parametrize("grammar", [
    {"type": "json", "value": PERSON},
    {"type": "json_object", "value": PERSON},
    {"type": "json", "value": json.dumps(PERSON)},  # the schema as JSON text, as TGI 3 accepts it
    {"type": "json_schema", "value": {"name": "person", "schema": PERSON}},
])
def test_generate_follows_tgi3s_json_grammars(stack, grammar):
    resp = generate(stack.url, grammar, details=True)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    jsonschema.validate(json.loads(body["generated_text"]), PERSON)
    assert body["details"]["finish_reason"] == "eos_token"


def test_the_stream_and_the_compat_route_follow_a_regex(stack):
    grammar = {"type": "regex", "value": "[A-Z][a-z]{2,6} [0-9]{3}"}
    _, events, _ = stream_events(stack.url + "/generate_stream", {
        "inputs": "code", "parameters": {"max_new_tokens": 30, "grammar": grammar, "do_sample": True, "seed": 5}}, 60)
    final = events[-1]
    assert re.fullmatch(grammar["value"], final["generated_text"])
    assert "".join(e["token"]["text"] for e in events if not e["token"]["special"]) == final["generated_text"]
    compat = requests.post(stack.url + "/", json={"inputs": "x", "parameters": {"grammar": grammar}}, timeout=60)
    assert compat.status_code == 200 and re.fullmatch(grammar["value"], compat.json()[0]["generated_text"][1:])


def test_tgqs_lark_and_choice_grammars_on_tgis_route(stack):
    lark = generate(stack.url, {"type": "lark", "value": 'start: "yes" | "no" | "maybe " /[0-9]/'})
    assert re.fullmatch(r"yes|no|maybe [0-9]", lark.json()["generated_text"]), lark.text
    choice = generate(stack.url, {"type": "choice", "value": ["alpha", "beta"]}, do_sample=True)
    assert choice.json()["generated_text"] in ("alpha", "beta")


def test_sampling_best_of_and_stop_sequences_still_work_under_a_grammar(stack):
    resp = generate(stack.url, {"type": "json", "value": PERSON}, best_of=2, do_sample=True, details=True)
    assert resp.status_code == 200, resp.text
    details = resp.json()["details"]
    assert len(details["best_of_sequences"]) == 1
    for text in (resp.json()["generated_text"], details["best_of_sequences"][0]["generated_text"]):
        jsonschema.validate(json.loads(text), PERSON)
    stopped = generate(stack.url, {"type": "json", "value": PERSON}, stop=["age"], details=True)
    assert stopped.json()["details"]["finish_reason"] == "stop_sequence"
    assert stopped.json()["generated_text"].endswith("age")


def test_the_official_clients_send_their_grammar_unchanged(stack):
    from huggingface_hub import InferenceClient
    from text_generation import Client
    from text_generation.types import Grammar, GrammarType

    client = Client(stack.url, timeout=60)
    out = client.generate("Describe a person", max_new_tokens=60, grammar=Grammar(type=GrammarType.Json, value=PERSON))
    jsonschema.validate(json.loads(out.generated_text), PERSON)
    regex = Grammar(type=GrammarType.Regex, value="[0-9]{4}")
    text = "".join(r.token.text for r in client.generate_stream("year", max_new_tokens=10, grammar=regex)
                   if not r.token.special)
    assert re.fullmatch("[0-9]{4}", text)
    hub = InferenceClient(stack.url)
    # huggingface_hub posts to `POST /`, where TGI's return_full_text defaults to true
    got = hub.text_generation("Describe a person", max_new_tokens=60, return_full_text=False,
                              grammar={"type": "json", "value": PERSON})
    jsonschema.validate(json.loads(got), PERSON)


@pytest.mark.parametrize("grammar, fragment", [
    ({"type": "json", "value": {"type": "nonsense"}}, "grammar is not valid: invalid JSON schema"),
    ({"type": "json", "value": "{not json"}, "grammar is not valid: the JSON schema is not valid JSON"),
    ({"type": "regex", "value": "[a-"}, "grammar is not valid: invalid regex constraint"),
    ({"type": "json_schema", "value": {"name": "x"}}, "must be an object with a `schema`"),
    ({"type": "choice", "value": []}, "`choice` must be a list of 1 to"),
    ({"type": "regex", "value": "a" * 70_000}, "at most 65536 are accepted"),
])
def test_tgi_routes_refuse_bad_grammars_with_422_in_tgis_shape(stack, grammar, fragment):
    resp = generate(stack.url, grammar)
    assert resp.status_code == 422, resp.text
    body = resp.json()
    assert body["error_type"] == "validation" and body["error"].startswith("Input validation error: ")
    assert fragment in body["error"]


def test_an_unknown_grammar_type_is_serdes_plain_text_422(stack):
    resp = generate(stack.url, {"type": "xml", "value": "<a/>"})
    assert resp.status_code == 422 and resp.headers["Content-Type"].startswith("text/plain")
    assert resp.text.startswith("Failed to deserialize the JSON body into the target type: parameters.grammar.type: "
                                "unknown variant `xml`, expected one of `json`, `json_object`, `regex`")


def chat(url, **fields):
    return requests.post(url + "/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": "A person, please"}], "max_tokens": 60, **fields})


@pytest.mark.parametrize("response_format, check", [
    ({"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}},
     lambda text: jsonschema.validate(json.loads(text), PERSON)),
    ({"type": "json", "value": PERSON}, lambda text: jsonschema.validate(json.loads(text), PERSON)),
    ({"type": "regex", "value": "[a-z]{5}"}, lambda text: re.fullmatch("[a-z]{5}", text) or pytest.fail(text)),
    ({"type": "text"}, lambda text: None),
])
def test_chat_follows_each_response_format(stack, response_format, check):
    resp = chat(stack.url, response_format=response_format)
    assert resp.status_code == 200, resp.text
    choice = resp.json()["choices"][0]
    check(choice["message"]["content"])
    if response_format["type"] != "text":
        assert choice["finish_reason"] == "stop"


def test_completions_and_structured_outputs(stack):
    resp = requests.post(stack.url + "/v1/completions", timeout=60, json={
        "prompt": ["a", "b"], "n": 2, "max_tokens": 20, "temperature": 1.0, "seed": 3,
        "structured_outputs": {"choice": ["left", "right"]}})
    assert resp.status_code == 200, resp.text
    assert {c["text"] for c in resp.json()["choices"]} <= {"left", "right"} and len(resp.json()["choices"]) == 4
    streamed, _ = _v1_stream(stack.url + "/v1/completions", {
        "prompt": "x", "max_tokens": 20, "stream": True, "structured_outputs": {"regex": "[0-9]{3}-[0-9]{2}"}})
    assert re.fullmatch("[0-9]{3}-[0-9]{2}", streamed)


def _v1_stream(url, body):
    resp = requests.post(url, json=body, stream=True, timeout=60)
    text, reasons = "", []
    for line in resp.iter_lines():
        if line.startswith(b"data: ") and line != b"data: [DONE]":
            chunk = json.loads(line[6:])
            for c in chunk["choices"]:
                text += c.get("text") or (c.get("delta") or {}).get("content") or ""
                reasons.append(c.get("finish_reason"))
    return text, reasons


@pytest.mark.parametrize("fields, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "bad name!", "schema": PERSON}}},
     "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": 3}}}},
     "response_format"),
    ({"response_format": {"type": "yaml"}}, "response_format"),
    ({"response_format": "json"}, "response_format"),
    ({"response_format": {"type": "regex", "value": "("}}, "response_format"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
    ({"structured_outputs": {"grammar": "start: missing"}}, "structured_outputs"),
    ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}}, "response_format"),
])
def test_v1_refuses_bad_constraints_with_400_naming_the_field(stack, fields, param):
    resp = chat(stack.url, **fields)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]


@pytest.fixture
def fragile_stack(redis_server, tiny_model_dir):
    stack = make_fragile_stack(redis_server.url, tiny_model_dir, max_batch_size=4)
    yield stack
    stack.stop()


def test_a_constrained_job_rerun_after_its_worker_dies_follows_its_grammar_from_the_start(fragile_stack):
    """Greedy, so the re-run gives the same tokens: the streams go on without a repeat or a hole."""
    schema = {"type": "array", "items": {"type": "integer", "minimum": 100, "maximum": 999},
              "minItems": 150, "maxItems": 150}
    params = {"max_new_tokens": 1200, "grammar": {"type": "json", "value": schema}}
    with cf.ThreadPoolExecutor(8) as pool:
        plain = [pool.submit(requests.post, fragile_stack.url + "/generate", timeout=120,
                             json={"inputs": f"numbers {i}", "parameters": params}) for i in range(4)]
        streams = [pool.submit(stream_events, fragile_stack.url + "/generate_stream",
                               {"inputs": f"numbers {i}", "parameters": {**params, "details": True}}, 120)
                   for i in range(4)]
        time.sleep(1.0)
        fragile_stack.workers[0].kill_group(signal.SIGKILL)
        results = [f.result() for f in plain]
        streamed = [f.result()[1] for f in streams]
    for resp in results:
        assert resp.status_code == 200, resp.text
        jsonschema.validate(json.loads(resp.json()["generated_text"]), schema)
    for events in streamed:
        final = events[-1]
        assert "error" not in final, final
        assert final["details"]["generated_tokens"] == len(events)  # each token once, across the re-run
        jsonschema.validate(json.loads("".join(e["token"]["text"] for e in events if not e["token"]["special"])),
                            schema)
    client = fragile_stack.redis
    queue = rq_queue(client)
    rerun = [Job.fetch(rid, connection=client, serializer=queue.serializer).meta.get("attempt", 0)
             for rid in FinishedJobRegistry(queue=queue).get_job_ids()]
    assert len(rerun) == 8 and max(rerun) >= 1, rerun  # some of them really were re-run


def test_the_per_step_mask_time_reaches_the_apis_metrics(stack):
    assert generate(stack.url, {"type": "regex", "value": "[0-9]{6}"}).status_code == 200
    deadline = time.monotonic() + 10  # the worker adds its figures to Redis about once a second
    while True:
        text = requests.get(stack.url + "/metrics", timeout=10).text
        count = re.search(r"^tgq_grammar_mask_duration_count (\S+)$", text, re.MULTILINE)
        if (count and float(count.group(1)) >= 6) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert count and float(count.group(1)) >= 6, text  # one per step of the six-digit answer at least
    assert "# TYPE tgq_grammar_mask_duration histogram" in text


def test_a_constraint_that_fails_in_the_worker_is_the_clients_error_and_the_worker_goes_on(stack):
    """A choice SmolLM2's vocabulary cannot spell (U+40000): compiled by the worker, broken at its first
    byte; TGI's routes answer 424 (a failed generation), /v1 400, and the next request is served."""
    tgi = generate(stack.url, {"type": "choice", "value": ["\U00040000x"]})
    assert tgi.status_code == 424 and "the output constraint failed" in tgi.json()["error"], tgi.text
    v1 = requests.post(stack.url + "/v1/completions", timeout=60, json={
        "prompt": "x", "max_tokens": 5, "structured_outputs": {"choice": ["\U00040000x"]}})
    assert v1.status_code == 400 and v1.json()["error"]["code"] == "invalid_constraint", v1.text
    assert generate(stack.url, {"type": "regex", "value": "ok"}).json()["generated_text"] == "ok"

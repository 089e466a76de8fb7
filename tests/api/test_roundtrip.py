"""Full request round trips: the Flask app against real Redis, with the test playing the worker."""
from __future__ import annotations

import dataclasses
import json
import time

import orjson
import pytest
from rq.job import Job
from rq.serializers import JSONSerializer

from common import protocol
from common.schemas import FinishReason, PrefillToken, TokenEvent

from .conftest import Harness, error_for, final_for, script_tokens, tok

TOKENS = [tok(5, " hello", -0.25), tok(6, " world", -1.8267672061920166), tok(2, "</s>", -0.125, True)]


def sse_chunks(resp) -> list[bytes]:
    return [chunk for chunk in resp.response if chunk]


def chunks(resp):
    """The body's non-empty chunks, one at a time (the stream starts with an empty one)."""
    return (chunk for chunk in resp.response if chunk)


def test_generate_json_and_headers(harness: Harness) -> None:
    def script(job):
        time.sleep(0.06)  # "inference" takes a while after the job joined a batch
        return script_tokens(TOKENS, " hello world", reason=FinishReason.EOS_TOKEN,
                             started_at=job.enqueued_at + 0.02)(job)
    worker = harness.serve(script)
    resp = harness.client.post("/generate", json={"inputs": "hello", "parameters": {"max_new_tokens": 3}})
    worker.join(5)
    assert resp.status_code == 200
    assert resp.headers["content-type"] == "application/json"
    assert resp.data == b'{"generated_text":" hello world"}'
    h = resp.headers
    assert h["x-compute-type"] == "gpu+optimized"
    assert h["x-compute-characters"] == "5"
    for name in ("x-compute-time", "x-total-time", "x-validation-time", "x-queue-time", "x-inference-time",
                 "x-time-per-token"):
        assert h[name].isdigit(), name
    assert h["x-compute-time"] == h["x-total-time"]
    assert int(h["x-queue-time"]) in range(19, 40)  # the job joined a batch 20 ms after enqueue
    assert int(h["x-inference-time"]) >= 35
    assert int(h["x-time-per-token"]) == int(h["x-inference-time"]) // 3 or \
        abs(int(h["x-time-per-token"]) - int(h["x-inference-time"]) / 3) < 1


def test_generate_details_field_order_and_numbers(harness: Harness) -> None:
    big_seed = 2**64 - 5
    prefill = (PrefillToken(1, "<s>", None), PrefillToken(3, "hello", -11.894989013671875))
    worker = harness.serve(script_tokens(TOKENS, " hello world", reason=FinishReason.EOS_TOKEN, seed=big_seed,
                                         prefill=prefill))
    resp = harness.client.post("/generate", json={"inputs": "hello", "parameters": {"details": True,
                                                                                  "do_sample": True}})
    worker.join(5)
    assert resp.status_code == 200, resp.data
    assert resp.data == (
        b'{"generated_text":" hello world","details":{"finish_reason":"eos_token","generated_tokens":3,'
        b'"seed":18446744073709551611,"prefill":[{"id":1,"text":"<s>","logprob":null},'
        b'{"id":3,"text":"hello","logprob":-11.894989}],"tokens":[{"id":5,"text":" hello","logprob":-0.25,'
        b'"special":false},{"id":6,"text":" world","logprob":-1.8267672,"special":false},'
        b'{"id":2,"text":"</s>","logprob":-0.125,"special":true}]}}')


def test_job_payload(harness: Harness) -> None:
    """What the worker receives: truncated input ids, f32 params, an API-drawn seed, flags."""
    worker = harness.serve(script_tokens(TOKENS, "x"))
    resp = harness.client.post("/generate", json={"inputs": "a b c hello", "parameters": {
        "truncate": 2, "temperature": 0.5, "details": True, "stop": ["x"]}})
    worker.join(5)
    assert resp.status_code == 200
    # The job hash is kept for result_ttl: read it back through RQ.
    job_ids = harness.redis.keys("rq:job:*")
    assert len(job_ids) == 1
    job = Job.fetch(job_ids[0].decode().split(":", 2)[2], connection=harness.redis, serializer=JSONSerializer)
    payload = job.args[0]
    assert payload["input_ids"] == [8, 3]  # "c hello": the last 2 of <s> a b c hello
    assert payload["sampling"]["temperature"] == 0.5
    assert 0 <= payload["sampling"]["seed"] < 2**64
    assert payload["stopping"] == {"max_new_tokens": 20, "stop": ["x"]}
    assert payload["want_tokens"] is True and payload["want_prefill"] is True
    assert payload["reply_to"].startswith("tgq:reply:")
    assert job.func_name == protocol.JOB_FUNC


def test_compat_returns_list_with_full_text_by_default(harness: Harness) -> None:
    worker = harness.serve(script_tokens(TOKENS, " world"), jobs=2)
    resp = harness.client.post("/", json={"inputs": "hello", "parameters": {}, "stream": False})
    assert resp.status_code == 200
    assert resp.data == b'[{"generated_text":"hello world"}]'
    resp = harness.client.post("/invocations", json={"inputs": "hello", "parameters": {"return_full_text": False}})
    worker.join(5)
    assert resp.data == b'[{"generated_text":" world"}]'


def test_generate_return_full_text(harness: Harness) -> None:
    worker = harness.serve(script_tokens(TOKENS, " world"))
    resp = harness.client.post("/generate", json={"inputs": "hello", "parameters": {"return_full_text": True}})
    worker.join(5)
    assert resp.data == b'{"generated_text":"hello world"}'


def test_stream_sse_bytes(harness: Harness) -> None:
    resp = harness.client.post("/generate_stream", json={"inputs": "hello", "parameters": {"details": True}},
                               buffered=False)
    assert resp.status_code == 200
    assert resp.headers["content-type"] == "text/event-stream"
    assert resp.headers["cache-control"] == "no-cache"
    assert resp.headers["x-compute-type"] == "gpu+optimized"
    assert resp.headers["x-compute-characters"] == "5"
    assert resp.headers["x-accel-buffering"] == "no"
    assert "x-total-time" not in resp.headers
    job = harness.pop_job()
    # a stream's final event carries every token (it fills what pub/sub may lose); no prompt logprobs
    assert job.want_tokens is True and job.want_prefill is False
    for event in script_tokens(TOKENS, " hello world", reason=FinishReason.EOS_TOKEN, seed=None)(job):
        harness.publish(job, event)
    body = b"".join(sse_chunks(resp))
    assert body == (
        b'data:{"token":{"id":5,"text":" hello","logprob":-0.25,"special":false},"generated_text":null,'
        b'"details":null}\n\n'
        b'data:{"token":{"id":6,"text":" world","logprob":-1.8267672,"special":false},"generated_text":null,'
        b'"details":null}\n\n'
        b'data:{"token":{"id":2,"text":"</s>","logprob":-0.125,"special":true},"generated_text":" hello world",'
        b'"details":{"finish_reason":"eos_token","generated_tokens":3,"seed":null}}\n\n')


def test_stream_compat_full_text_only_on_final_event(harness: Harness) -> None:
    resp = harness.client.post("/", json={"inputs": "hi", "stream": True}, buffered=False)
    job = harness.pop_job()
    for event in script_tokens(TOKENS[:2], " hello world")(job):
        harness.publish(job, event)
    events = [json.loads(c[len(b"data:"):]) for c in sse_chunks(resp)]
    assert [e["generated_text"] for e in events] == [None, "hi hello world"]
    assert events[-1]["details"] is None


def test_stream_rerun_is_deduplicated(harness: Harness) -> None:
    resp = harness.client.post("/generate_stream", json={"inputs": "hello"}, buffered=False)
    job = harness.pop_job()
    it = chunks(resp)
    harness.publish(job, TokenEvent(job.request_id, 0, 0, TOKENS[0]))
    harness.publish(job, TokenEvent(job.request_id, 0, 1, TOKENS[1]))
    first = [next(it), next(it)]
    # The worker died; the job runs again as attempt 1 and repeats indexes 0 and 1.
    harness.publish(job, TokenEvent(job.request_id, 1, 0, TOKENS[0]))
    harness.publish(job, TokenEvent(job.request_id, 0, 1, TOKENS[1]))  # stale attempt
    harness.publish(job, TokenEvent(job.request_id, 1, 1, TOKENS[1]))
    harness.publish(job, final_for(job, TOKENS, " hello world", attempt=1))
    rest = list(it)
    texts = [json.loads(c[5:])["token"]["text"] for c in first + rest]
    assert texts == [" hello", " world", "</s>"]


def test_stream_rerun_that_diverges_ends_with_error(harness: Harness) -> None:
    resp = harness.client.post("/generate_stream", json={"inputs": "hello"}, buffered=False)
    job = harness.pop_job()
    it = chunks(resp)
    harness.publish(job, TokenEvent(job.request_id, 0, 0, TOKENS[0]))
    assert next(it).startswith(b'data:{"token"')
    harness.publish(job, TokenEvent(job.request_id, 1, 0, TOKENS[1]))
    last = list(it)
    assert len(last) == 1 and json.loads(last[0][5:])["error_type"] == "generation"
    assert harness.redis.exists(protocol.cancel_key(job.request_id))


def test_stream_error_event(harness: Harness) -> None:
    resp = harness.client.post("/generate_stream", json={"inputs": "hello"}, buffered=False)
    job = harness.pop_job()
    harness.publish(job, TokenEvent(job.request_id, 0, 0, TOKENS[0]))
    harness.publish(job, error_for(job, "Server error: CUDA out of memory"))
    chunks = sse_chunks(resp)
    assert chunks[-1] == (b'data:{"error":"Request failed during generation: Server error: CUDA out of memory",'
                          b'"error_type":"generation"}\n\n')
    assert len(chunks) == 2


def test_stream_validation_error_is_an_event(harness: Harness) -> None:
    resp = harness.client.post("/generate_stream", json={"inputs": "hello", "parameters": {"temperature": 0}})
    assert resp.status_code == 200
    assert resp.data == (b'data:{"error":"Input validation error: `temperature` must be strictly positive",'
                         b'"error_type":"validation"}\n\n')
    resp = harness.client.post("/generate_stream", json={"inputs": "hello", "parameters": {"best_of": 0}})
    assert resp.data == (b'data:{"error":"Input validation error: `best_of` != 1 is not supported when streaming '
                         b'tokens","error_type":"validation"}\n\n')


def test_stream_keepalive_comment(make_harness) -> None:
    h = make_harness(keepalive_s=0.2)
    resp = h.client.post("/generate_stream", json={"inputs": "hello"}, buffered=False)
    job = h.pop_job()
    it = chunks(resp)
    assert next(it) == b":\n\n"  # nothing happened for 0.2 s
    h.publish(job, final_for(job, [tok(5, "a")], "a"))
    assert next(it).startswith(b'data:{"token":{"id":5')
    assert list(it) == []


def test_stream_request_timeout_is_an_error_event(make_harness) -> None:
    h = make_harness(request_timeout=0.3)
    resp = h.client.post("/generate_stream", json={"inputs": "hello"}, buffered=False)
    assert list(chunks(resp)) == [b'data:{"error":"Incomplete generation","error_type":"incomplete_generation"}\n\n']
    assert h.redis.exists(protocol.cancel_key(h.pop_job().request_id))


def test_stream_disconnect_sets_cancel_key(harness: Harness) -> None:
    resp = harness.client.post("/generate_stream", json={"inputs": "hello"}, buffered=False)
    job = harness.pop_job()
    it = chunks(resp)
    harness.publish(job, TokenEvent(job.request_id, 0, 0, TOKENS[0]))
    next(it)
    resp.close()  # the WSGI server closes the body iterator when the client goes away
    assert harness.redis.get(protocol.cancel_key(job.request_id)) is not None
    assert 0 < harness.redis.ttl(protocol.cancel_key(job.request_id)) <= protocol.CANCEL_TTL_S
    metrics = harness.client.get("/metrics").data.decode()
    assert 'tgi_request_failure{err="dropped"} 1' in metrics


def test_best_of_picks_highest_mean_logprob(harness: Harness) -> None:
    runs = iter([
        ([tok(5, "a", -2.0), tok(6, "b", -2.0)], "ab", 11),
        ([tok(7, "c", -0.5), tok(8, "d", -1.5)], "cd", 22),  # mean -1.0: the winner
    ])

    def script(job):
        tokens, text, _ = next(runs)
        return [final_for(job, tokens, text, seed=job.sampling.seed)]

    worker = harness.serve(script, jobs=2)
    resp = harness.client.post("/generate", json={"inputs": "hello", "parameters": {
        "best_of": 2, "do_sample": True, "details": True, "return_full_text": True}})
    worker.join(5)
    assert resp.status_code == 200, resp.data
    body = orjson.loads(resp.data)
    assert body["generated_text"] == "hellocd"
    seqs = body["details"]["best_of_sequences"]
    assert [s["generated_text"] for s in seqs] == ["helloab"]
    assert list(seqs[0]) == ["generated_text", "finish_reason", "generated_tokens", "seed", "prefill", "tokens"]
    assert body["details"]["seed"] != seqs[0]["seed"]  # each copy drew its own seed


def test_best_of_without_details_has_no_details(harness: Harness) -> None:
    worker = harness.serve(lambda job: [final_for(job, [tok(5, "a", -1.0)], "a")], jobs=2)
    resp = harness.client.post("/generate", json={"inputs": "hello", "parameters": {"best_of": 2,
                                                                                    "temperature": 0.7}})
    worker.join(5)
    assert resp.data == b'{"generated_text":"a"}'


def test_worker_error_maps_to_424(harness: Harness) -> None:
    worker = harness.serve(lambda job: [error_for(job, "Server error: boom")])
    resp = harness.client.post("/generate", json={"inputs": "hello"})
    worker.join(5)
    assert resp.status_code == 424
    assert resp.data == b'{"error":"Request failed during generation: Server error: boom","error_type":"generation"}'


def test_stored_result_is_used_when_messages_were_missed(harness: Harness) -> None:
    def script(job):
        harness.store(final_for(job, TOKENS, " stored"))
        return []  # nothing published: the reader must find the stored result
    worker = harness.serve(script)
    t0 = time.monotonic()
    resp = harness.client.post("/generate", json={"inputs": "hello"})
    worker.join(5)
    assert resp.data == b'{"generated_text":" stored"}'
    assert time.monotonic() - t0 < 4.5


def test_no_result_within_request_timeout_is_500(make_harness) -> None:
    h = make_harness(request_timeout=0.5)
    resp = h.client.post("/generate", json={"inputs": "hello"})
    assert resp.status_code == 500
    assert resp.data == b'{"error":"Incomplete generation","error_type":"incomplete_generation"}'
    job = h.pop_job()
    assert h.redis.exists(protocol.cancel_key(job.request_id))


def test_health_goes_through_the_queue(harness: Harness) -> None:
    jobs = []

    def script(job):
        jobs.append(job)
        return [final_for(job, [tok(5, "a")], "a")]
    worker = harness.serve(script, jobs=3)
    for path in ("/health", "/", "/ping"):
        resp = harness.client.get(path)
        assert resp.status_code == 200 and resp.data == b""
    worker.join(5)
    assert [j.stopping.max_new_tokens for j in jobs] == [1, 1, 1]
    assert jobs[0].input_ids == (1, 9)  # "<s> liveness"
    assert "tgi_request_count" not in harness.client.get("/metrics").data.decode()


@pytest.mark.parametrize("path", ["/generate", "/"])
def test_best_of_handler_errors(harness: Harness, path: str) -> None:
    resp = harness.client.post(path, json={"inputs": "hello", "parameters": {"best_of": 3, "do_sample": True}})
    assert resp.status_code == 422
    assert resp.data == (b'{"error":"Input validation error: `best_of` must be > 0 and <= 2. Given: 3",'
                         b'"error_type":"validation"}')


def test_stream_lost_tokens_are_filled_from_the_final_event(harness: Harness) -> None:
    resp = harness.client.post("/generate_stream", json={"inputs": "hello"}, buffered=False)
    job = harness.pop_job()
    harness.publish(job, TokenEvent(job.request_id, 0, 0, TOKENS[0]))
    # index 1 never arrives; the final event carries every token (a worker may always include them)
    final = final_for(job, TOKENS, " hello world")
    harness.publish(job, dataclasses.replace(final, tokens=tuple(TOKENS)))
    texts = [json.loads(c[5:])["token"]["text"] for c in sse_chunks(resp)]
    assert texts == [" hello", " world", "</s>"]


MORE = [tok(5, " hello"), tok(6, " world"), tok(7, " the"), tok(8, " a"), tok(2, "</s>", special=True)]


def test_stream_never_shows_a_hole(harness: Harness) -> None:
    """Index 1 is dropped on purpose: the tokens after it wait, and the final event fills the gap."""
    resp = harness.client.post("/generate_stream", json={"inputs": "hello"}, buffered=False)
    job = harness.pop_job()
    for index in (0, 2, 3):  # 1 is lost in transit
        harness.publish(job, TokenEvent(job.request_id, 0, index, MORE[index]))
    harness.publish(job, final_for(job, MORE, " hello world the a"))
    events = [json.loads(c[5:]) for c in sse_chunks(resp)]
    assert [e["token"]["id"] for e in events] == [5, 6, 7, 8, 2]
    assert events[-1]["generated_text"] == " hello world the a"


def test_a_hole_the_final_event_cannot_fill_ends_the_stream_with_an_error(harness: Harness) -> None:
    resp = harness.client.post("/generate_stream", json={"inputs": "hello"}, buffered=False)
    job = harness.pop_job()
    for index in (0, 2):
        harness.publish(job, TokenEvent(job.request_id, 0, index, MORE[index]))
    harness.publish(job, dataclasses.replace(final_for(job, MORE, " hello world the a"), tokens=()))
    events = [json.loads(c[5:]) for c in sse_chunks(resp)]
    assert [e.get("token", {}).get("id") for e in events] == [5, None]  # nothing after the gap is shown
    assert events[-1] == {"error": "Incomplete generation", "error_type": "incomplete_generation"}


def test_a_rerun_fills_a_gap_in_order(harness: Harness) -> None:
    resp = harness.client.post("/generate_stream", json={"inputs": "hello"}, buffered=False)
    job = harness.pop_job()
    for index in (0, 2):  # attempt 0 loses index 1, then its worker dies
        harness.publish(job, TokenEvent(job.request_id, 0, index, MORE[index]))
    for index in range(4):
        harness.publish(job, TokenEvent(job.request_id, 1, index, MORE[index]))
    harness.publish(job, dataclasses.replace(final_for(job, MORE, " hello world the a"), attempt=1))
    assert [json.loads(c[5:])["token"]["id"] for c in sse_chunks(resp)] == [5, 6, 7, 8, 2]

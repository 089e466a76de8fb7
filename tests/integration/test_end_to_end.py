"""The whole path with real processes: HTTP -> API -> Redis/RQ -> worker -> pub/sub -> HTTP."""
from __future__ import annotations

import concurrent.futures as cf
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from rq import Queue
from rq.registry import FinishedJobRegistry
from rq.serializers import JSONSerializer

from common import protocol

from .conftest import MODEL_ID
from .sse import stream_events

pytestmark = pytest.mark.integration

PROMPTS = ["Hello there", "The capital of France is", "One two three four five six seven",
           "A much longer prompt that keeps going so that it has a different length from the others"]


def generate(stack, inputs: str, **params) -> requests.Response:
    return requests.post(stack.url + "/generate", json={"inputs": inputs, "parameters": params}, timeout=60)


def test_generate_with_details(stack):
    resp = generate(stack, "Hello world", max_new_tokens=8, details=True)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    details = body["details"]
    assert details["finish_reason"] in ("length", "eos_token")
    assert details["generated_tokens"] == len(details["tokens"]) <= 8
    assert details["seed"] is None  # greedy
    assert details["prefill"][0]["logprob"] is None
    assert all(p["logprob"] is not None for p in details["prefill"][1:])
    assert all(t["logprob"] <= 0 for t in details["tokens"])
    for header in ("x-compute-type", "x-compute-time", "x-compute-characters", "x-total-time",
                   "x-validation-time", "x-queue-time", "x-inference-time", "x-time-per-token"):
        assert header in resp.headers
    assert resp.headers["x-compute-characters"] == str(len("Hello world"))


def test_stream_texts_concatenate_to_generated_text(stack):
    resp, events, _ = stream_events(stack.url + "/generate_stream",
                                    {"inputs": "Hello world", "parameters": {"max_new_tokens": 12, "details": True}})
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/event-stream")
    assert all(e["generated_text"] is None and e["details"] is None for e in events[:-1])
    final = events[-1]
    assert final["details"]["generated_tokens"] == len(events)
    text = "".join(e["token"]["text"] for e in events if not e["token"]["special"])
    assert text == final["generated_text"]
    whole = generate(stack, "Hello world", max_new_tokens=12).json()["generated_text"]
    assert whole == final["generated_text"]


def test_greedy_is_the_same_alone_and_in_a_batch(stack):
    """fp32: a greedy request's tokens do not depend on its batch companions."""
    lengths = [5, 17, 9, 30]
    alone = [generate(stack, p, max_new_tokens=n, details=True).json() for p, n in zip(PROMPTS, lengths)]
    with cf.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(generate, stack, p, max_new_tokens=n, details=True)
                   for p, n in zip(PROMPTS * 2, lengths * 2)]
        together = [f.result().json() for f in futures]
    for i, got in enumerate(together):
        want = alone[i % len(PROMPTS)]
        assert [t["id"] for t in got["details"]["tokens"]] == [t["id"] for t in want["details"]["tokens"]]


def test_seeded_sampling_repeats(stack):
    params = dict(max_new_tokens=10, do_sample=True, temperature=0.8, top_k=50, seed=1234, details=True)
    first = generate(stack, "Once upon a time", **params).json()
    second = generate(stack, "Once upon a time", **params).json()
    assert first["details"]["seed"] == 1234
    assert first["generated_text"] == second["generated_text"]


def test_official_client_generate_and_stream(stack):
    from text_generation import Client

    client = Client(stack.url, timeout=60)
    response = client.generate("Hello world", max_new_tokens=6)
    assert response.details.generated_tokens >= 1
    streamed = list(client.generate_stream("Hello world", max_new_tokens=6))
    assert streamed[-1].generated_text == response.generated_text
    assert [t.token.id for t in streamed] == [t.id for t in response.details.tokens]


def test_jobs_show_in_rq_registries_and_rq_info(stack):
    resp, events, _ = stream_events(stack.url + "/generate_stream", {"inputs": "registry", "parameters": {"max_new_tokens": 3}})
    assert "generated_text" in events[-1]
    queue = Queue(protocol.queue_name(MODEL_ID), connection=stack.redis, serializer=JSONSerializer)
    finished = FinishedJobRegistry(queue=queue)
    assert finished.count >= 1
    rq = Path(sys.executable).with_name("rq")
    out = subprocess.run([str(rq), "info", "--url", stack.redis_url, "--serializer", "rq.serializers.JSONSerializer"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert protocol.queue_name(MODEL_ID) in out.stdout
    assert "1 workers" in out.stdout or "1 worker" in out.stdout


def test_metrics_show_tgi_families(stack):
    generate(stack, "metrics please", max_new_tokens=3)
    text = requests.get(stack.url + "/metrics", timeout=10).text
    for family, kind in [("tgi_request_count", "counter"), ("tgi_request_success", "counter"),
                         ("tgi_request_duration", "histogram"), ("tgi_request_generated_tokens", "histogram"),
                         ("tgi_queue_size", "gauge"), ("tgi_batch_current_size", "gauge"),
                         ("tgi_batch_inference_count", "counter"), ("tgi_batch_inference_duration", "histogram")]:
        assert f"# TYPE {family} {kind}" in text, family
    assert 'tgi_batch_inference_count_total{method="decode"}' in text or \
        'tgi_batch_inference_count{method="decode"}' in text

"""/metrics: TGI 0.5.0 names, types, labels and bucket text; cluster families read from Redis."""
from __future__ import annotations

import re

from common import metrics_spec, protocol
from common.schemas import TokenEvent

from .conftest import Harness, final_for, script_tokens, tok


def families(text: str) -> dict[str, str]:
    return dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))


def samples(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_families_after_requests(harness: Harness) -> None:
    assert families(harness.client.get("/metrics").data.decode()) == {
        "tgi_queue_size": "gauge", "tgi_batch_current_size": "gauge"}  # nothing observed yet
    worker = harness.serve(script_tokens([tok(5, "a"), tok(6, "b")], "ab"))
    assert harness.client.post("/generate", json={"inputs": "hello world"}).status_code == 200
    worker.join(5)
    harness.client.post("/generate", json={"inputs": "hello", "parameters": {"temperature": -1}})
    resp = harness.client.post("/generate_stream", json={"inputs": "hello"}, buffered=False)
    job = harness.pop_job()
    harness.publish(job, TokenEvent(job.request_id, 0, 0, tok(5, "a")))
    harness.publish(job, final_for(job, [tok(5, "a"), tok(6, "b")], "ab"))
    assert b"".join(resp.response).endswith(b'"details":null}\n\n')

    resp = harness.client.get("/metrics")
    assert resp.headers["content-type"] == "text/plain; charset=utf-8"
    text = resp.data.decode()
    assert families(text) == {
        "tgi_request_count": "counter", "tgi_request_success": "counter", "tgi_request_failure": "counter",
        "tgi_request_duration": "histogram", "tgi_request_validation_duration": "histogram",
        "tgi_request_queue_duration": "histogram", "tgi_request_inference_duration": "histogram",
        "tgi_request_mean_time_per_token_duration": "histogram", "tgi_request_generated_tokens": "histogram",
        "tgi_request_input_length": "histogram", "tgi_request_max_new_tokens": "histogram",
        "tgi_queue_size": "gauge", "tgi_batch_current_size": "gauge"}
    s = samples(text)
    assert s["tgi_request_count"] == 3
    assert s["tgi_request_success"] == 2
    assert s['tgi_request_failure{err="validation"}'] == 1
    assert s["tgi_request_generated_tokens_count"] == 2 and s["tgi_request_generated_tokens_sum"] == 4
    assert s["tgi_request_input_length_count"] == 2 and s["tgi_request_input_length_sum"] == 5  # 3 + 2 tokens
    assert s["tgi_queue_size"] == 0
    # bucket text as metrics-exporter-prometheus writes it
    assert 'tgi_request_duration_bucket{le="0.00015000000000000001"}' in text
    assert 'tgi_request_duration_bucket{le="145.61096060497135"}' in text
    assert 'tgi_request_input_length_bucket{le="0.32"}' in text  # max_input_length 32 < 100
    assert 'tgi_request_max_new_tokens_bucket{le="64"}' in text and 'le="64.0"' not in text
    assert "_total" not in text and "_created" not in text
    buckets = [line for line in text.splitlines() if line.startswith("tgi_request_duration_bucket")]
    assert len(buckets) == 36 and buckets[-1].startswith('tgi_request_duration_bucket{le="+Inf"}')
    order = [line.split("{")[0].split(" ")[0] for line in text.splitlines()
             if line.startswith("tgi_request_duration")]
    assert order[-2:] == ["tgi_request_duration_sum", "tgi_request_duration_count"]


def test_cluster_families_from_redis(harness: Harness) -> None:
    r = harness.redis
    mid = harness.model_id
    r.set(protocol.worker_batch_key(mid, "w1"), 3, ex=30)
    r.set(protocol.worker_batch_key(mid, "w2"), 4, ex=30)
    r.rpush(harness.queue.key, "a", "b")
    durations = metrics_spec.duration_buckets()
    i = metrics_spec.bucket_index(durations, 0.02)
    r.hset(protocol.batch_metrics_key(mid), mapping={
        "inference_count:prefill": 2, "inference_success:prefill": 2, "inference_failure:prefill": 0,
        "inference_count:decode": 10, "inference_success:decode": 9, "inference_failure:decode": 1,
        f"inference_duration_bucket:decode:{i}": 10, "inference_duration_sum:decode": 0.2,
        "next_size_bucket:0": 1, "next_size_bucket:2": 1, "next_size_sum": 4, "next_size_count": 2,
    })
    text = harness.client.get("/metrics").data.decode()
    s = samples(text)
    assert families(text) == {"tgi_queue_size": "gauge", "tgi_batch_current_size": "gauge",
                              "tgi_batch_next_size": "histogram", "tgi_batch_inference_count": "counter",
                              "tgi_batch_inference_success": "counter", "tgi_batch_inference_failure": "counter",
                              "tgi_batch_inference_duration": "histogram"}
    assert s["tgi_queue_size"] == 2 and s["tgi_batch_current_size"] == 7
    assert s['tgi_batch_inference_count{method="decode"}'] == 10
    assert s['tgi_batch_inference_failure{method="decode"}'] == 1
    assert s['tgi_batch_next_size_bucket{le="1"}'] == 1
    assert s['tgi_batch_next_size_bucket{le="2"}'] == 1
    assert s['tgi_batch_next_size_bucket{le="3"}'] == 2
    assert s['tgi_batch_next_size_bucket{le="32"}'] == 2
    assert s['tgi_batch_next_size_bucket{le="+Inf"}'] == 2 and s["tgi_batch_next_size_sum"] == 4
    le = "0.029192926025390625"
    assert s[f'tgi_batch_inference_duration_bucket{{method="decode",le="{le}"}}'] == 10
    assert s['tgi_batch_inference_duration_bucket{method="decode",le="0.01946195068359375"}'] == 0
    assert s['tgi_batch_inference_duration_count{method="decode"}'] == 10
    assert 'tgi_batch_inference_duration_count{method="prefill"}' not in s


def test_rejected_bodies_are_not_counted(harness: Harness) -> None:
    """TGI's handler (and tgi_request_count) only runs once the JSON extractor accepted the body."""
    harness.client.post("/generate", data=b"{", content_type="application/json")
    harness.client.post("/generate", data=b'{"inputs":"x"}')
    harness.client.post("/", json={"inputs": 1})
    assert "tgi_request_count" not in harness.client.get("/metrics").data.decode()

"""HTTP surface: routing, docs, CORS, API key, body limits, 429, Redis outages, the RQ payload."""
from __future__ import annotations

import json
import zlib

import pytest

from common import protocol
from tests.support.redis_server import free_port

from .conftest import Harness, script_tokens, tok


def test_unknown_path_404_empty(harness: Harness) -> None:
    resp = harness.client.get("/nope")
    assert resp.status_code == 404 and resp.data == b""
    assert harness.client.get("/openapi.json").status_code == 404  # v0.5.0 serves /api-doc/openapi.json
    assert harness.client.get("/info/extra").status_code == 404  # /info itself is TGI 3's (api.tgi.tgi3)


@pytest.mark.parametrize("method, path", [("get", "/generate"), ("get", "/generate_stream"), ("put", "/"),
                                          ("post", "/health"), ("post", "/metrics"), ("get", "/invocations")])
def test_wrong_method_405(harness: Harness, method: str, path: str) -> None:
    resp = getattr(harness.client, method)(path)
    assert resp.status_code == 405 and resp.data == b""


def test_openapi_document(harness: Harness) -> None:
    resp = harness.client.get("/api-doc/openapi.json")
    assert resp.status_code == 200 and resp.headers["content-type"] == "application/json"
    doc = json.loads(resp.data)
    assert doc["openapi"].startswith("3.0") and doc["info"]["version"] == "0.5.0"
    assert set(doc["paths"]) >= {"/", "/generate", "/generate_stream", "/invocations", "/health", "/ping",
                                 "/metrics", "/docs", "/api-doc/openapi.json"}
    params = doc["components"]["schemas"]["GenerateParameters"]["properties"]
    assert params["details"]["default"] is False
    assert set(params) == {"best_of", "temperature", "repetition_penalty", "top_k", "top_p", "typical_p",
                           "do_sample", "max_new_tokens", "return_full_text", "stop", "truncate", "watermark",
                           "details", "seed"}
    assert set(doc["paths"]["/generate"]["post"]["responses"]) >= {"200", "422", "424", "429", "500", "503"}
    # every $ref resolves
    refs = {r.split("/")[-1] for r in _refs(doc)}
    assert refs <= set(doc["components"]["schemas"])


def _refs(node):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "$ref":
                yield v
            else:
                yield from _refs(v)
    elif isinstance(node, list):
        for v in node:
            yield from _refs(v)


def test_swagger_ui_offline(harness: Harness) -> None:
    page = harness.client.get("/docs")
    assert page.status_code == 200 and b"SwaggerUIBundle" in page.data
    assert b"/api-doc/openapi.json" in page.data
    js = harness.client.get("/docs/swagger-ui-bundle.js")
    assert js.status_code == 200 and len(js.data) > 100_000
    js.close()
    assert harness.client.get("/docs/../app.py").status_code == 404


def test_cors_any_origin(harness: Harness) -> None:
    resp = harness.client.get("/nope", headers={"Origin": "https://example.com"})
    assert resp.headers["Access-Control-Allow-Origin"] == "*"
    pre = harness.client.options("/generate", headers={"Origin": "https://example.com",
                                                       "Access-Control-Request-Method": "POST"})
    assert pre.status_code == 200 and pre.data == b""
    assert pre.headers["Access-Control-Allow-Origin"] == "*"
    assert pre.headers["Access-Control-Allow-Methods"] == "GET,POST"
    assert pre.headers["Access-Control-Allow-Headers"] == "content-type"


def test_cors_allow_list(make_harness) -> None:
    h = make_harness(cors_allow_origin="https://a.example, https://b.example")
    ok = h.client.options("/generate", headers={"Origin": "https://b.example"})
    assert ok.headers["Access-Control-Allow-Origin"] == "https://b.example"
    denied = h.client.options("/generate", headers={"Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in denied.headers


def test_api_key(make_harness) -> None:
    h = make_harness(api_key="s3cret")
    for path in ("/generate", "/generate_stream", "/", "/invocations"):
        resp = h.client.post(path, json={"inputs": "hello"})
        assert resp.status_code == 401, path
        assert resp.data == (b'{"error":"Unauthorized: a valid `Authorization: Bearer <api key>` header is required",'
                             b'"error_type":"unauthorized"}')
    wrong = h.client.post("/generate", json={"inputs": "hello"}, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    worker = h.serve(script_tokens([tok(5, "a")], "a"))
    ok = h.client.post("/generate", json={"inputs": "hello"}, headers={"Authorization": "Bearer s3cret"})
    worker.join(5)
    assert ok.status_code == 200
    assert h.client.get("/metrics").status_code == 200  # not a generation route
    assert h.client.options("/generate").status_code == 200  # preflights carry no credentials


def test_body_limit_413(make_harness) -> None:
    h = make_harness(max_body_bytes=100)
    resp = h.client.post("/generate", data=json.dumps({"inputs": "x" * 200}), content_type="application/json")
    assert resp.status_code == 413
    body = json.loads(resp.data)
    assert body["error_type"] == "payload_too_large" and list(body) == ["error", "error_type"]


def test_extractor_rejections_are_plain_text(harness: Harness) -> None:
    resp = harness.client.post("/generate", data=b'{"inputs":"x"}')
    assert resp.status_code == 415
    assert resp.data == b"Expected request with `Content-Type: application/json`"
    assert resp.headers["content-type"].startswith("text/plain")
    resp = harness.client.post("/generate", data=b'{"inputs":"\xc3\x28"}', content_type="application/json")
    assert resp.status_code == 400 and resp.data.startswith(b"Failed to parse the request body as JSON: ")
    resp = harness.client.post("/generate_stream", data=b'{"inputs":"x","parameters":{"max_new_tokens":-1}}',
                               content_type="application/json")
    assert resp.status_code == 422
    assert resp.data == (b"Failed to deserialize the JSON body into the target type: parameters.max_new_tokens: "
                         b"invalid value: integer `-1`, expected u32 at line 1 column 47")


def test_validation_error_json(harness: Harness) -> None:
    resp = harness.client.post("/generate", json={"inputs": "hello", "parameters": {"top_p": 1.0}})
    assert resp.status_code == 422 and resp.headers["content-type"] == "application/json"
    assert resp.data == b'{"error":"Input validation error: `top_p` must be > 0.0 and < 1.0","error_type":"validation"}'
    assert "x-compute-type" not in resp.headers


def test_job_is_json_in_rq(harness: Harness) -> None:
    resp = harness.client.post("/generate_stream", json={"inputs": "hello", "parameters": {"seed": 2**64 - 1}},
                               buffered=False)
    assert resp.status_code == 200
    ids = harness.redis.lrange(harness.queue.key, 0, -1)
    assert len(ids) == 1
    raw = harness.redis.hget(b"rq:job:" + ids[0], "data")
    func, instance, args, kwargs = json.loads(zlib.decompress(raw))  # JSON, not pickle
    assert func == protocol.JOB_FUNC and instance is None and kwargs == {}
    assert args[0]["request_id"] == ids[0].decode()
    assert args[0]["sampling"]["seed"] == 2**64 - 1
    assert args[0]["input_ids"] == [1, 3]
    resp.close()


def test_429_exactly_at_the_queue_limit(harness: Harness) -> None:
    """max_queue_length=3: three waiting jobs fit, the fourth request is refused before validation."""
    streams = [harness.client.post("/generate_stream", json={"inputs": "hello"}, buffered=False) for _ in range(3)]
    assert harness.queue.count == 3
    resp = harness.client.post("/generate", json={"inputs": "hello", "parameters": {"temperature": 0}})
    assert resp.status_code == 429
    assert resp.data == b'{"error":"Model is overloaded","error_type":"overloaded"}'
    sse = harness.client.post("/generate_stream", json={"inputs": "hello"})
    assert sse.status_code == 200
    assert sse.data == b'data:{"error":"Model is overloaded","error_type":"overloaded"}\n\n'
    # the handler-level best_of check still comes first
    resp = harness.client.post("/generate", json={"inputs": "x", "parameters": {"best_of": 9, "do_sample": True}})
    assert resp.status_code == 422
    harness.pop_job()
    assert harness.queue.count == 2
    # best_of=2 needs two free places
    resp = harness.client.post("/generate", json={"inputs": "x", "parameters": {"best_of": 2, "do_sample": True}})
    assert resp.status_code == 429
    for s in streams:
        s.close()
    metrics = harness.client.get("/metrics").data.decode()
    assert 'tgi_request_failure{err="overloaded"} 3' in metrics


def test_redis_down_is_503(make_harness) -> None:
    h = make_harness(redis_url_override=f"redis://127.0.0.1:{free_port()}/0")
    expected = (b'{"error":"Service unavailable: the job queue (Redis) cannot be reached",'
                b'"error_type":"unavailable"}')
    for method, path, body in [("post", "/generate", {"inputs": "x"}), ("post", "/generate_stream", {"inputs": "x"}),
                               ("post", "/", {"inputs": "x", "stream": True}), ("get", "/health", None)]:
        resp = getattr(h.client, method)(path, json=body)
        assert resp.status_code == 503, path
        assert resp.data == expected
    # body rejections come before the queue check, so they need no Redis; validation comes after it
    assert h.client.post("/generate", json={"inputs": 1}).status_code == 422
    assert h.client.post("/generate", json={"inputs": ""}).status_code == 503
    metrics = h.client.get("/metrics")
    assert metrics.status_code == 200
    text = metrics.data.decode()
    assert 'tgi_request_failure{err="unavailable"} 5' in text and "tgi_queue_size" not in text

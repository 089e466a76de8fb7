"""Hostile and malformed bodies against real gunicorn + a real worker: each gets the right answer
(TGI 0.5.0's status and body style), quickly. The time bound is a hang guard, not a benchmark."""
from __future__ import annotations

import time

import pytest
import requests

pytestmark = pytest.mark.integration

HANG_GUARD_S = 5.0
JSON_CT = {"Content-Type": "application/json"}
OK = {"inputs": "hi", "parameters": {"max_new_tokens": 2}}


def body(**params: object) -> dict:
    return {"inputs": "hi", "parameters": {"max_new_tokens": 2, **params}}


def raw(data: bytes, content_type: str | None = "application/json") -> tuple[bytes, dict]:
    return data, ({"Content-Type": content_type} if content_type else {})


# (id, path, payload: dict (sent as JSON) or (bytes, headers), status, error_type or text prefix)
CASES = [
    ("malformed json", "/generate", raw(b'{"inputs": "x",'), 400, "Failed to parse the request body as JSON"),
    ("not json at all", "/generate", raw(b"hello"), 400, "Failed to parse the request body as JSON"),
    ("empty body", "/generate", raw(b""), 400, "Failed to parse the request body as JSON"),
    ("text/plain", "/generate", raw(b'{"inputs": "x"}', "text/plain"), 415,
     "Expected request with `Content-Type: application/json`"),
    ("no content type", "/generate", raw(b'{"inputs": "x"}', None), 415,
     "Expected request with `Content-Type: application/json`"),
    ("form encoded", "/generate_stream", raw(b"inputs=x", "application/x-www-form-urlencoded"), 415,
     "Expected request with `Content-Type: application/json`"),
    ("over --max-body-bytes", "/generate", raw(b'{"inputs": "' + b"a" * 2_100_000 + b'"}'), 413,
     "payload_too_large"),
    ("non-UTF-8 bytes", "/generate", raw(b'{"inputs": "\xff\xfe\xfd"}'), 400,
     "Failed to parse the request body as JSON"),
    ("lone surrogate escape", "/generate", raw(b'{"inputs": "\\ud800"}'), 400,
     "Failed to parse the request body as JSON"),
    ("inputs null", "/generate", {"inputs": None}, 422, "Failed to deserialize the JSON body"),
    ("inputs missing", "/generate", {"parameters": {}}, 422, "Failed to deserialize the JSON body"),
    ("inputs a number", "/generate", {"inputs": 5}, 422, "Failed to deserialize the JSON body"),
    ("body an array", "/generate", [1, 2], 422, "Failed to deserialize the JSON body"),
    ("max_new_tokens negative", "/generate", body(max_new_tokens=-1), 422, "Failed to deserialize the JSON body"),
    ("max_new_tokens 2**64", "/generate", body(max_new_tokens=2**64), 422, "Failed to deserialize the JSON body"),
    ("max_new_tokens 1e30", "/generate", body(max_new_tokens=1e30), 422, "Failed to deserialize the JSON body"),
    ("max_new_tokens over the limit", "/generate", body(max_new_tokens=10**9), 422, "validation"),
    ("seed 2**64", "/generate", body(seed=2**64), 422, "Failed to deserialize the JSON body"),
    ("seed negative", "/generate", body(seed=-1), 422, "Failed to deserialize the JSON body"),
    ("top_k 2**40", "/generate", body(top_k=2**40), 422, "Failed to deserialize the JSON body"),
    ("temperature negative", "/generate", body(temperature=-1.0), 422, "validation"),
    ("top_p 0", "/generate", body(top_p=0.0), 422, "validation"),
    ("best_of huge", "/generate", body(best_of=10**12), 422, "validation"),
    ("truncate huge", "/generate", body(truncate=2**40), 422, "validation"),  # usize: fits, then too big
    ("stop null", "/generate", body(stop=None), 422, "Failed to deserialize the JSON body"),  # a Vec in TGI
    ("10,000 stop strings", "/generate", body(stop=["x"] * 10_000), 422, "validation"),
    ("10,000 stop strings (stream)", "/generate_stream", body(stop=["x"] * 10_000), 200, "validation"),
    ("one-million-character prompt", "/generate", {"inputs": "word " * 200_000}, 422, "validation"),
    ("deep nesting", "/generate", raw(b'{"inputs": "x", "parameters": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
     400, "Failed to parse the request body as JSON"),
    # accepted as TGI accepts them (serde ignores unknown fields; null parameters take defaults)
    ("unknown fields", "/generate", {**OK, "bogus": {"a": [1]}, "parameters": {"max_new_tokens": 2, "x": 1}},
     200, None),
    ("null optional parameters", "/generate", body(seed=None, top_k=None, temperature=None, best_of=None,
                                                   truncate=None), 200, None),
    ("huge temperature is clamped", "/generate", body(temperature=1e39), 200, None),
]


@pytest.mark.parametrize("name,path,payload,status,expect", CASES, ids=[c[0] for c in CASES])
def test_bad_input(stack, name, path, payload, status, expect):
    started = time.monotonic()
    if isinstance(payload, tuple):
        data, headers = payload
        resp = requests.post(stack.url + path, data=data, headers=headers, timeout=30)
    else:
        resp = requests.post(stack.url + path, json=payload, timeout=30)
    elapsed = time.monotonic() - started
    assert resp.status_code == status, resp.text[:500]
    assert elapsed < HANG_GUARD_S, elapsed
    if expect is None:
        assert resp.json()["generated_text"] is not None
    elif resp.headers["content-type"].startswith("application/json"):
        assert resp.json()["error_type"] == expect, resp.text[:500]
    elif resp.headers["content-type"].startswith("text/event-stream"):
        assert resp.text.startswith('data:{"error":') and f'"error_type":"{expect}"' in resp.text
    else:
        assert resp.headers["content-type"].startswith("text/plain") and resp.text.startswith(expect), resp.text[:500]
    # the server is still healthy afterwards
    assert requests.post(stack.url + "/generate", json=OK, timeout=30).status_code == 200

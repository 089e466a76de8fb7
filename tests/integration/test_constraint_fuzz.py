"""Random JSON schemas, regexes, Lark grammars and choice lists against a live stack (gunicorn API and a
tiny-model worker), through TGI's `grammar` and /v1's `response_format` and `structured_outputs`:
whatever the constraint, the answer is a clear 2xx or 4xx, never a 5xx or a hang, and the worker
keeps serving. CONSTRAINT_FUZZ_EXAMPLES (env) sets the examples per strategy.

Some constraints pass the API's checks and fail only in the worker: a choice of characters SmolLM2's
byte-level vocabulary cannot spell (some astral-plane characters) is one. Those jobs fail with a
clear error, 424 on TGI's routes and 400 on /v1 (common.errors.ConstraintFailed), and the worker
goes on."""
from __future__ import annotations

import json
import os
from collections import Counter

import pytest
import redis
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .conftest import make_stack

pytestmark = pytest.mark.integration

EXAMPLES = int(os.environ.get("CONSTRAINT_FUZZ_EXAMPLES", "80"))
HANG_GUARD_S = 10.0
LIMITS = ("--max-input-length", "16", "--max-total-tokens", "40")
KEYWORDS = ["type", "properties", "items", "enum", "const", "minimum", "maximum", "pattern", "anyOf", "oneOf",
            "allOf", "required", "minItems", "maxItems", "minLength", "maxLength", "additionalProperties", "$ref",
            "format", "not", "multipleOf", "exclusiveMinimum", "$defs", "prefixItems", "if", "then", "x-guidance"]
TYPES = ["object", "array", "string", "integer", "number", "boolean", "null", "nonsense"]

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=False, allow_infinity=False),
                    st.text(max_size=12), st.sampled_from(TYPES), st.just("#/$defs/a"), st.just("[a-z]+"))
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.one_of(st.sampled_from(KEYWORDS), st.text(max_size=6)), inner,
                                                 max_size=5)), max_leaves=20)
schemas = st.one_of(json_values, st.dictionaries(st.sampled_from(KEYWORDS), json_values, min_size=1, max_size=6))
REGEX_PIECES = list("ab01.*+?|()[]{}^$\\-,") + ["\\d", "\\w", "[a-z]", "{2,3}", "(?:", "(?P<x>", "\\p{L}", "é"]
regexes = st.lists(st.sampled_from(REGEX_PIECES), max_size=14).map("".join)
LARK_PIECES = ["start", ":", " ", '"a"', '"b"', "|", "x", "\n", "x:", "/[0-9]+/", "%json", "{}", "(", ")", "*", "?",
               "%ignore", "NUMBER", "@", "<[2]>", "%import common.WS"]
larks = st.lists(st.sampled_from(LARK_PIECES), max_size=14).map("".join)
choices = st.one_of(st.lists(st.text(max_size=8), max_size=5), json_values)


@pytest.fixture(scope="module")
def fuzz_stack(redis_server, tiny_model_dir):
    redis.Redis.from_url(redis_server.url).flushall()
    stack = make_stack(redis_server.url, tiny_model_dir, workers=0,
                       api_args=LIMITS + ("--request-timeout", str(HANG_GUARD_S)))
    stack.add_worker(*LIMITS)
    yield stack
    stack.stop()


def fuzz(strategy, send):
    seen: Counter[int] = Counter()

    @given(value=strategy)
    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def case(value) -> None:
        resp = send(value)
        seen[resp.status_code] += 1
        assert resp.status_code < 500, (json.dumps(value)[:300], resp.status_code, resp.text[:300])
        assert resp.elapsed.total_seconds() < HANG_GUARD_S + 1

    case()
    return seen


def tgi(url, kind):
    return lambda value: requests.post(url + "/generate", timeout=HANG_GUARD_S + 5, json={
        "inputs": "x", "parameters": {"max_new_tokens": 6, "grammar": {"type": kind, "value": value}}})


def v1(url, field):
    """/v1/completions: its prompt stays inside the stack's small input limit (a chat template's would not)."""
    return lambda value: requests.post(url + "/v1/completions", timeout=HANG_GUARD_S + 5, json={
        "prompt": "x", "max_tokens": 6, **field(value)})


@pytest.mark.parametrize("name", ["tgi json", "tgi regex", "tgi lark", "tgi choice", "v1 json_schema",
                                  "v1 regex", "v1 grammar", "v1 choice"])
def test_random_constraints_never_get_a_5xx(fuzz_stack, name):
    url = fuzz_stack.url
    send, strategy = {
        "tgi json": (tgi(url, "json"), schemas), "tgi regex": (tgi(url, "regex"), regexes),
        "tgi lark": (tgi(url, "lark"), larks), "tgi choice": (tgi(url, "choice"), choices),
        "v1 json_schema": (v1(url, lambda s: {"response_format": {
            "type": "json_schema", "json_schema": {"name": "fuzz", "schema": s}}}), schemas),
        "v1 regex": (v1(url, lambda r: {"structured_outputs": {"regex": r}}), regexes),
        "v1 grammar": (v1(url, lambda g: {"structured_outputs": {"grammar": g}}), larks),
        "v1 choice": (v1(url, lambda c: {"structured_outputs": {"choice": c}}), choices),
    }[name]
    seen = fuzz(strategy, send)
    assert sum(seen.values()) == EXAMPLES and set(seen) <= {200, 400, 422, 424}, seen
    assert fuzz_stack.api.alive() and all(w.alive() for w in fuzz_stack.workers)
    ok = requests.post(url + "/generate", json={"inputs": "x", "parameters": {"max_new_tokens": 2}}, timeout=30)
    assert ok.status_code == 200

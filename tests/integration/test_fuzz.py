"""Schemathesis against the OpenAPI document the server itself serves (`/api-doc/openapi.json`),
on a real stack (gunicorn API + tiny-model worker): whatever it sends (valid and invalid
bodies, odd headers), no 5xx and no hang. FUZZ_EXAMPLES (env) sets the examples per operation."""
from __future__ import annotations

import os

import pytest
import redis
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.generation.modes import GenerationMode

from .conftest import make_stack

pytestmark = pytest.mark.integration

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "20"))
HANG_GUARD_S = 10.0
# Short generations so every valid request finishes fast; the deadline is the hang guard.
LIMITS = ("--max-input-length", "16", "--max-total-tokens", "32")


@pytest.fixture(scope="module")
def fuzz_stack(redis_server, tiny_model_dir):
    redis.Redis.from_url(redis_server.url).flushall()
    stack = make_stack(redis_server.url, tiny_model_dir, workers=0,
                       api_args=LIMITS + ("--request-timeout", str(HANG_GUARD_S), "--max-body-bytes", "100000"))
    stack.add_worker(*LIMITS)
    yield stack
    stack.stop()


def operations(url: str) -> list:
    served = schemathesis.openapi.from_url(url + "/api-doc/openapi.json")
    return [result.ok() for result in served.get_all_operations()]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_server_errors_and_no_hangs(fuzz_stack, mode):
    ops = operations(fuzz_stack.url)
    assert {op.path for op in ops} >= {"/", "/generate", "/generate_stream", "/invocations", "/health"}
    for op in ops:
        if mode is GenerationMode.NEGATIVE and op.method.lower() == "get":
            continue  # no parameters or body: nothing to get wrong
        @given(case=op.as_strategy(generation_mode=mode))
        @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def call(case) -> None:
            response = case.call(base_url=fuzz_stack.url, timeout=HANG_GUARD_S + 5)
            case.validate_response(response, checks=[not_a_server_error])
            assert response.elapsed < HANG_GUARD_S + 1, case.as_curl_command()

        call()
    assert fuzz_stack.api.alive() and all(w.alive() for w in fuzz_stack.workers)

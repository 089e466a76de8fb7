"""A real worker with the paged KV cache and its prefix cache: repeated prompts reuse their blocks, the
answers do not change, and the hit and miss token counts reach the API's /metrics."""
from __future__ import annotations

import pytest
import redis
import requests

from tests.integration.conftest import MODEL_ID, Stack
from tests.support.metrics import sample
from tests.support.processes import start_api, wait_http

pytestmark = pytest.mark.integration

PROMPT = "You are a helpful assistant who answers in one short sentence. " * 4 + "What is the capital of France?"


@pytest.fixture
def paged_stack(redis_server, tiny_model_dir):
    redis.Redis.from_url(redis_server.url).flushall()
    api, url = start_api(redis_server.url, tiny_model_dir, "--model-id", MODEL_ID)
    stack = Stack(redis_server.url, tiny_model_dir, url, api)
    try:
        stack.add_worker("--kv-cache", "paged", "--kv-block-size", "4")
        wait_http(url, [api])
        yield stack
    finally:
        stack.stop()


def test_a_repeated_prompt_hits_the_prefix_cache_with_the_same_answer(paged_stack):
    # With details, TGI 0.5.0 returns the prompt's logprobs: that request computes its whole prompt (and
    # registers its blocks); the same prompt without details then reuses them.
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 8, "details": True}}
    first = requests.post(f"{paged_stack.url}/generate", json=body, timeout=60)
    assert first.status_code == 200, first.text
    metrics = requests.get(f"{paged_stack.url}/metrics", timeout=10).text
    prompt_tokens = sample(metrics, "tgq_prefix_cache_miss_tokens_total")
    assert prompt_tokens > 20 and sample(metrics, "tgq_prefix_cache_hit_tokens_total") == 0
    assert len(first.json()["details"]["prefill"]) == prompt_tokens
    body["parameters"]["details"] = False
    second = requests.post(f"{paged_stack.url}/generate", json=body, timeout=60)
    assert second.status_code == 200, second.text
    assert second.json()["generated_text"] == first.json()["generated_text"]
    metrics = requests.get(f"{paged_stack.url}/metrics", timeout=10).text
    hit = sample(metrics, "tgq_prefix_cache_hit_tokens_total")
    # Every full block but the one holding the last prompt token (always computed) came from the cache.
    assert hit == (prompt_tokens - 1) // 4 * 4
    assert sample(metrics, "tgq_prefix_cache_miss_tokens_total") == prompt_tokens + (prompt_tokens - hit)

"""Requests at the edges of the prompt's size, through real stacks (HTTP -> API -> Redis -> worker).

A one-token prompt has no prompt logprob to compute (its prefill group can be one column wide),
a prompt of exactly --max-input-length tokens fills the input limit (and, with the most new tokens
allowed, the total), and `truncate` equal to the prompt's length must keep the whole prompt.
"""
from __future__ import annotations

import math

import pytest
import requests

from tests.support.redis_server import RedisServer

from .conftest import make_stack

pytestmark = pytest.mark.integration

MAX_INPUT = 8
MAX_TOTAL = 16
LIMITS = ("--max-input-length", str(MAX_INPUT), "--max-total-tokens", str(MAX_TOTAL))
FULL_PROMPT = "a b c d e f g h"  # 8 tokens with SmolLM2's tokenizer (no BOS)


@pytest.fixture(scope="module")
def small_stack(tiny_model_dir):
    """API and worker with small limits, on a redis-server of their own (no other stack's worker shares the queue)."""
    server = RedisServer().start()
    stack = make_stack(server.url, tiny_model_dir, workers=0, api_args=LIMITS)
    try:
        stack.add_worker(*LIMITS)
        yield stack
    finally:
        stack.stop()
        server.cleanup()


def generate(url: str, inputs: str, **params) -> requests.Response:
    return requests.post(url + "/generate", json={"inputs": inputs, "parameters": params}, timeout=60)


def prompt_ids(tiny_model_dir, text: str) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir))(text)["input_ids"]


def check_sequence(seq: dict, prompt: list[int], max_new_tokens: int) -> None:
    """TGI's details of one sequence: the whole prompt in prefill (first logprob null), every token listed."""
    assert [p["id"] for p in seq["prefill"]] == prompt
    assert seq["prefill"][0]["logprob"] is None
    assert all(p["logprob"] is not None and p["logprob"] <= 0 for p in seq["prefill"][1:])
    assert seq["generated_tokens"] == len(seq["tokens"])
    if seq["finish_reason"] == "length":
        assert seq["generated_tokens"] == max_new_tokens
    else:
        assert seq["finish_reason"] == "eos_token" and seq["generated_tokens"] <= max_new_tokens
    assert all(math.isfinite(t["logprob"]) and t["logprob"] <= 0 for t in seq["tokens"])


def test_a_one_token_prompt_alone_with_details(stack, tiny_model_dir):
    """The reported 424 (`torch.cat(): expected a non-empty list of Tensors`): "Hello" is one token."""
    prompt = prompt_ids(tiny_model_dir, "Hello")
    assert len(prompt) == 1
    resp = generate(stack.url, "Hello", details=True, max_new_tokens=3)
    assert resp.status_code == 200, resp.text
    details = resp.json()["details"]
    assert details["prefill"] == [{"id": prompt[0], "text": "Hello", "logprob": None}]
    check_sequence(details, prompt, 3)


def test_a_prompt_of_exactly_max_input_length_tokens(small_stack, tiny_model_dir):
    prompt = prompt_ids(tiny_model_dir, FULL_PROMPT)
    assert len(prompt) == MAX_INPUT
    resp = generate(small_stack.url, FULL_PROMPT, details=True, max_new_tokens=MAX_TOTAL - MAX_INPUT)
    assert resp.status_code == 200, resp.text
    check_sequence(resp.json()["details"], prompt, MAX_TOTAL - MAX_INPUT)
    assert generate(small_stack.url, FULL_PROMPT + " i", max_new_tokens=1).status_code == 422


def test_truncate_equal_to_the_prompt_length_keeps_the_whole_prompt(small_stack, tiny_model_dir):
    prompt = prompt_ids(tiny_model_dir, FULL_PROMPT)
    plain = generate(small_stack.url, FULL_PROMPT, details=True, max_new_tokens=4)
    truncated = generate(small_stack.url, FULL_PROMPT, details=True, max_new_tokens=4, truncate=len(prompt))
    assert truncated.status_code == 200, truncated.text
    check_sequence(truncated.json()["details"], prompt, 4)
    assert truncated.json() == plain.json()  # greedy: the same prompt gives the same answer


def test_best_of_two_with_a_one_token_prompt_and_details(small_stack, tiny_model_dir):
    """Both copies are one-token prompts prefilled together: one group, one column wide."""
    prompt = prompt_ids(tiny_model_dir, "Hello")
    resp = generate(small_stack.url, "Hello", details=True, max_new_tokens=5, best_of=2, do_sample=True)
    assert resp.status_code == 200, resp.text
    details = resp.json()["details"]
    check_sequence(details, prompt, 5)
    assert len(details["best_of_sequences"]) == 1
    other = details["best_of_sequences"][0]
    check_sequence(other, prompt, 5)
    assert other["seed"] != details["seed"]

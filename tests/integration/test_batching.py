"""Continuous batching through the real stack: results do not depend on companions; budgets never wedge."""
from __future__ import annotations

import concurrent.futures as cf

import pytest
import redis
import requests

from tests.support.redis_server import free_port

from .conftest import make_stack

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def small_budget_stack(redis_server, tiny_model_dir):
    """A worker whose prefill budget (32 tokens) is smaller than some prompts."""
    redis.Redis.from_url(redis_server.url).flushall()
    s = make_stack(redis_server.url, tiny_model_dir, workers=0)
    s.metrics_port = free_port()
    s.add_worker("--max-batch-prefill-tokens", "32", "--max-batch-size", "8", "--metrics-port", str(s.metrics_port))
    yield s
    s.stop()


def post(stack, inputs, **params):
    resp = requests.post(stack.url + "/generate", json={"inputs": inputs, "parameters": params}, timeout=120)
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_seeded_sampling_is_the_same_alone_and_with_companions(small_budget_stack):
    """fp32: a row's draws come from its own seeded generator, so companions do not change them."""
    stack = small_budget_stack
    params = dict(max_new_tokens=24, do_sample=True, temperature=0.9, top_p=0.95, seed=42, details=True)
    alone = post(stack, "Tell me a story", **params)
    with cf.ThreadPoolExecutor(8) as pool:
        companions = [pool.submit(post, stack, f"Other prompt number {i} " * (i + 1), max_new_tokens=30,
                                  do_sample=True, seed=i) for i in range(6)]
        together = pool.submit(post, stack, "Tell me a story", **params)
        [c.result() for c in companions]
        got = together.result()
    assert [t["id"] for t in got["details"]["tokens"]] == [t["id"] for t in alone["details"]["tokens"]]


def test_prompt_larger_than_the_prefill_budget_is_served_and_does_not_wedge(small_budget_stack):
    stack = small_budget_stack
    long_prompt = "word " * 200  # ~200 tokens > 32-token prefill budget
    with cf.ThreadPoolExecutor(8) as pool:
        before = [pool.submit(post, stack, f"short {i}", max_new_tokens=8) for i in range(3)]
        big = pool.submit(post, stack, long_prompt, max_new_tokens=8, details=True)
        after = [pool.submit(post, stack, f"later {i}", max_new_tokens=8) for i in range(3)]
        results = [f.result() for f in before + after]
        assert len(big.result()["details"]["prefill"]) >= 200
    assert all(r["generated_text"] is not None for r in results)


def _counts(stack) -> tuple[float, float]:
    text = requests.get(stack.url + "/metrics", timeout=10).text

    def value(method: str) -> float:
        prefix = f'tgi_batch_inference_count{{method="{method}"}}'
        return float(next((line.split()[-1] for line in text.splitlines() if line.startswith(prefix)), 0))

    return value("prefill"), value("decode")


def test_a_newcomer_joins_the_running_batch_without_restarting_it(small_budget_stack):
    """A streams 60 tokens; B arrives mid-way. One prefill each and no extra decode steps for B:
    B decoded inside A's steps, and A was never re-prefilled."""
    stack = small_budget_stack
    p0, d0 = _counts(stack)
    resp = requests.post(stack.url + "/generate_stream", json={"inputs": "long runner", "parameters": {
        "max_new_tokens": 60}}, stream=True, timeout=120)
    lines = resp.iter_lines()
    seen = 0
    for line in lines:
        if line.startswith(b"data:"):
            seen += 1
            if seen == 10:
                break
    joined = post(stack, "newcomer", max_new_tokens=10, details=True)
    rest = [line for line in lines if line.startswith(b"data:")]
    assert seen + len(rest) == 60 and b"generated_text\":null" not in rest[-1]
    assert joined["details"]["generated_tokens"] == 10
    p1, d1 = _counts(stack)
    assert p1 - p0 == 2
    assert d1 - d0 <= 60  # A alone needs 59 decode steps; B's 9 were shared with them


def test_the_worker_serves_its_own_metrics(small_budget_stack):
    post(small_budget_stack, "count me", max_new_tokens=4)
    text = requests.get(f"http://127.0.0.1:{small_budget_stack.metrics_port}/metrics", timeout=10).text
    assert "# TYPE tgi_batch_current_size gauge" in text
    assert 'tgi_batch_inference_count{method="decode"}' in text


def _worker_metric(stack, prefix: str) -> float:
    text = requests.get(f"http://127.0.0.1:{stack.metrics_port}/metrics", timeout=10).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(prefix))


def test_worker_round_trips_per_step_do_not_grow_with_the_batch(small_budget_stack):
    """The worker counts its Redis round trips (/metrics); 8 jobs joining and leaving together cost
    a few per step, not a dozen per job as RQ's own per-job bookkeeping would."""
    stack = small_budget_stack

    def per_step(n: int) -> float:
        trips0 = _worker_metric(stack, "tgq_worker_redis_round_trips_total")
        steps0 = _worker_metric(stack, "tgi_batch_inference_count")
        with cf.ThreadPoolExecutor(n) as pool:
            [f.result() for f in [pool.submit(post, stack, f"round trip {i}", max_new_tokens=12) for i in range(n)]]
        trips = _worker_metric(stack, "tgq_worker_redis_round_trips_total") - trips0
        return trips / (_worker_metric(stack, "tgi_batch_inference_count") - steps0)

    assert _worker_metric(stack, "tgq_worker_redis_round_trips_total") > 0
    alone, eight = per_step(1), per_step(8)
    print(f"round trips per step: 1 job {alone:.2f}, 8 jobs {eight:.2f}")
    assert eight < 3.0, (alone, eight)

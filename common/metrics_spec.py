"""TGI 0.5.0's metric names and bucket layouts, and how workers report batch metrics via Redis.

Workers add their batch figures to one Redis hash per model (`protocol.batch_metrics_key`) in the
same pipeline as each step's events, so any API replica can export cluster-wide `tgi_batch_*`
families at scrape time. Hash fields (all cumulative, non-negative):
  inference_count:<method>, inference_success:<method>, inference_failure:<method>
  inference_duration_sum:<method>, inference_duration_bucket:<method>:<i>   (method: prefill|decode)
  next_size_sum, next_size_count, next_size_bucket:<i>
  prefix_cache_hit_tokens, prefix_cache_miss_tokens   (paged KV cache with --prefix-cache)
  grammar_mask_duration_sum, grammar_mask_duration_bucket:<i>   (steps with constrained rows)
Bucket fields hold plain (non-cumulative) counts for bucket i of the layout below; i == len(layout)
is the +Inf bucket. The API makes them cumulative when it renders.
"""
from __future__ import annotations

import bisect


def duration_buckets() -> list[float]:
    """35 geometric buckets: start at 0.0001 and multiply by 1.5 before each push (TGI server.rs)."""
    out: list[float] = []
    value = 0.0001
    for _ in range(35):
        value *= 1.5
        out.append(value)
    return out


def input_length_buckets(max_input_length: int) -> list[float]:
    return [float((max_input_length // 100) * (i + 1)) if max_input_length >= 100
            else (max_input_length / 100) * (i + 1) for i in range(100)]


def total_tokens_buckets(max_total_tokens: int) -> list[float]:
    """Buckets of tgi_request_generated_tokens and tgi_request_max_new_tokens (f64 division)."""
    return [(max_total_tokens / 100) * (i + 1) for i in range(100)]


def batch_size_buckets(max_batch_size: int) -> list[float]:
    return [float(i) for i in range(1, max_batch_size + 1)]


def bucket_index(layout: list[float], value: float) -> int:
    """Index of the first bucket whose upper bound is >= value (len(layout) for +Inf)."""
    return bisect.bisect_left(layout, value)

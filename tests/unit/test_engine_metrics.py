from __future__ import annotations

from prometheus_client import generate_latest

from common.metrics_spec import duration_buckets
from worker.metrics import EngineMetrics


def test_families_use_tgi_names_and_bounds():
    m = EngineMetrics(max_batch_size=3)
    m.set_current_size(2)
    m.observe_next_size(2)
    m.observe_inference("decode", 0.01, True)
    m.observe_inference("prefill", 0.5, False)
    text = generate_latest(m.registry).decode()
    assert "tgi_batch_current_size 2.0" in text
    assert 'tgi_batch_next_size_bucket{le="2"} 1.0' in text
    assert 'tgi_batch_next_size_bucket{le="+Inf"} 1.0' in text
    assert 'tgi_batch_inference_count{method="decode"} 1.0' in text
    assert 'tgi_batch_inference_failure{method="prefill"} 1.0' in text
    assert "_total" not in text
    assert 'le="0.00015000000000000001",method="decode"' in text


def test_redis_increments_follow_metrics_spec():
    m = EngineMetrics(max_batch_size=4)
    m.observe_next_size(3)
    m.observe_inference("decode", 0.01, True)
    m.observe_inference("decode", 0.02, False)
    inc = m.take_increments()
    i = next(k for k, b in enumerate(duration_buckets()) if b >= 0.01)
    assert inc == {"next_size_sum": 3.0, "next_size_count": 1.0, "next_size_bucket:2": 1.0,
                   "inference_count:decode": 2.0, "inference_success:decode": 1.0,
                   "inference_failure:decode": 1.0, "inference_duration_sum:decode": 0.01,
                   f"inference_duration_bucket:decode:{i}": 1.0}
    assert m.take_increments() == {}

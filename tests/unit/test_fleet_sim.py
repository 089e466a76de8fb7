"""The fleet simulation's pure parts: the probe it runs per size, and the figures it takes from it."""
from __future__ import annotations

import argparse

import pytest

from bench import cost_probe, fleet_sim


def sim_args(**kw) -> argparse.Namespace:
    base = dict(rows=32, api_workers=4, new_tokens=512, duration=30.0, rate=20.0, redis_cpu=0, max_clients=512)
    return argparse.Namespace(**{**base, **kw})


def test_each_size_probes_load_test_workers_with_redis_pinned():
    probe = cost_probe.parse_args(fleet_sim.probe_argv(sim_args(), 16))
    assert probe.workers == 16 and probe.clients == 16 * 32 and probe.max_batch_size == 32
    assert probe.load_test_tokens_per_s == 20.0 and probe.pin_redis == 0
    assert probe.short_tokens == 0 and probe.rounds == 1
    assert probe.max_queue_length >= probe.clients  # every client's request fits in the queue at once
    assert cost_probe.worker_mode(probe) == "load-test (20 tokens/s per row)"
    assert cost_probe.worker_mode(cost_probe.parse_args([])) == "real"
    assert cost_probe.parse_args(fleet_sim.probe_argv(sim_args(), 64)).clients == 512  # the clients' ceiling here


def probe_result(main_us: float, load_main_cpu_us: float, seconds: float) -> dict:
    return {"summary": {"tokens_per_s": 9000.0, "per_token": {"redis_main_cpu_us": main_us, "redis_cpu_us": main_us + 0.1,
                                                              "commands": 0.2, "api_cpu_us": 30.0}},
            "rounds": [{"main_load": {"redis_main_cpu_us": load_main_cpu_us, "seconds": seconds}}], "errors": []}


def test_size_row_measures_then_projects_where_one_redis_core_saturates():
    row = fleet_sim.size_row(16, 20.0, 32, probe_result(main_us=0.8, load_main_cpu_us=3e6, seconds=10.0))
    assert row["offered_tokps"] == 16 * 32 * 20.0
    assert row["redis_core_busy_share"] == pytest.approx(0.3)
    assert row["projected_tokps_one_redis_core"] == pytest.approx(1e6 / 0.8)
    assert row["projected_workers_one_redis_core"] == pytest.approx(1e6 / 0.8 / 640)


def test_size_row_and_table_say_n_a_where_the_probe_failed():
    row = fleet_sim.size_row(64, 20.0, 32, {"errors": ["stack: timed out"], "rounds": []})
    assert row["projected_tokps_one_redis_core"] is None and row["errors"] == ["stack: timed out"]
    table = fleet_sim.format_table([row], 20.0, 32)
    assert "PROJECTED" in table and "| 64 | 40,960 | n/a |" in table

"""The cost probe's pure parts: INFO parsing, window deltas, net of idle, the per-request fit."""
from __future__ import annotations

import pytest

from bench import cost_probe as cp

INFO_BEFORE = """# CPU\r
used_cpu_sys:1.500000\r
used_cpu_user:2.250000\r
used_cpu_sys_children:0.000000\r
used_cpu_user_children:0.000000\r
used_cpu_sys_main_thread:1.400000\r
used_cpu_user_main_thread:2.100000\r
\r
# Commandstats\r
cmdstat_publish:calls=100,usec=500,usec_per_call=5.00,rejected_calls=0,failed_calls=0\r
cmdstat_evalsha:calls=4,usec=800,usec_per_call=200.00,rejected_calls=0,failed_calls=0\r
cmdstat_client|setname:calls=3,usec=3,usec_per_call=1.00,rejected_calls=0,failed_calls=0\r
\r
# Stats\r
total_commands_processed:107\r
"""

INFO_AFTER = """# CPU
used_cpu_sys:1.600000
used_cpu_user:2.400000
used_cpu_sys_main_thread:1.450000
used_cpu_user_main_thread:2.200000

# Commandstats
cmdstat_publish:calls=164,usec=820,usec_per_call=5.00,rejected_calls=0,failed_calls=0
cmdstat_evalsha:calls=6,usec=1200,usec_per_call=200.00,rejected_calls=0,failed_calls=0
cmdstat_client|setname:calls=3,usec=3,usec_per_call=1.00,rejected_calls=0,failed_calls=0
cmdstat_info:calls=1,usec=40,usec_per_call=40.00,rejected_calls=0,failed_calls=0

# Stats
total_commands_processed:174
"""


def test_parse_info_skips_headers_and_keeps_values_as_text():
    info = cp.parse_info(INFO_BEFORE)
    assert info["used_cpu_sys"] == "1.500000"
    assert info["total_commands_processed"] == "107"
    assert not any(k.startswith("#") for k in info)


def test_parse_commandstats_reads_calls_and_usec_with_subcommand_names():
    cmd = cp.parse_commandstats(cp.parse_info(INFO_BEFORE))
    assert cmd == {"publish": {"calls": 100, "usec": 500}, "evalsha": {"calls": 4, "usec": 800},
                   "client|setname": {"calls": 3, "usec": 3}}


def test_parse_cpu_sums_sys_and_user_and_the_main_thread_when_present():
    process, main = cp.parse_cpu(cp.parse_info(INFO_BEFORE))
    assert process == pytest.approx(3.75)
    assert main == pytest.approx(3.5)
    process, main = cp.parse_cpu({"used_cpu_sys": "1", "used_cpu_user": "2"})  # Redis before 7
    assert (process, main) == (3.0, None)
    with pytest.raises(ValueError):
        cp.parse_cpu({"used_cpu_sys": "1"})


def _reading(text: str, t: float, api: float = 0.0, worker: float = 0.0) -> cp.Reading:
    return cp.reading(text, t, api_cpu_s=api, api_master_cpu_s=0.0, worker_cpu_s=worker)


def test_window_is_the_difference_of_two_readings_in_microseconds():
    w = cp.window(_reading(INFO_BEFORE, 10.0, api=1.0, worker=5.0), _reading(INFO_AFTER, 40.0, api=1.5, worker=9.0),
                  tokens=64, requests=2)
    assert w["seconds"] == 30.0
    assert w["by_command"] == {"publish": 64, "evalsha": 2, "info": 1}
    assert w["commands"] == 67 == w["total_commands_processed"]
    assert w["usec_by_command"] == {"publish": 320, "evalsha": 400, "info": 40}
    assert w["redis_cpu_us"] == pytest.approx(250_000)
    assert w["redis_main_cpu_us"] == pytest.approx(150_000)
    assert w["api_cpu_us"] == pytest.approx(500_000)
    assert w["worker_cpu_us"] == pytest.approx(4_000_000)
    assert (w["tokens"], w["requests"]) == (64, 2)


def _win(seconds: float, tokens: int, requests: int, commands: float, cpu_us: float,
         by_command: dict[str, int] | None = None) -> dict:
    return {"seconds": seconds, "tokens": tokens, "requests": requests, "commands": commands,
            "redis_cpu_us": cpu_us, "redis_main_cpu_us": cpu_us, "api_cpu_us": 2 * cpu_us, "worker_cpu_us": None,
            "by_command": by_command or {}, "usec_by_command": {}}


def test_net_of_idle_scales_the_idle_window_to_the_load_windows_length():
    load = _win(60.0, 1000, 10, 3000, 20_000.0, {"publish": 1000, "info": 1})
    idle = _win(30.0, 0, 0, 200, 4_000.0, {"info": 1, "zadd": 199})
    net = cp.net_of_idle(load, idle)
    assert net["idle_scale"] == 2.0
    assert net["commands"] == 3000 - 400
    assert net["redis_cpu_us"] == 20_000 - 8_000
    assert net["worker_cpu_us"] is None  # missing on either side stays missing
    assert net["by_command"] == {"info": -1.0, "publish": 1000.0, "zadd": -398.0}
    with pytest.raises(ValueError):
        cp.net_of_idle(load, _win(0.0, 0, 0, 0, 0.0))


def test_split_fixed_recovers_a_per_token_and_a_per_request_cost():
    a, b = 2.5, 40.0  # commands per token, per request
    main = _win(60, 16384, 32, a * 16384 + b * 32, 12 * 16384 + 300 * 32)
    short = _win(60, 8192, 128, a * 8192 + b * 128, 12 * 8192 + 300 * 128)
    fit = cp.split_fixed(main, short)
    assert fit["commands"]["per_token"] == pytest.approx(a)
    assert fit["commands"]["per_request"] == pytest.approx(b)
    assert fit["redis_cpu_us"]["per_token"] == pytest.approx(12)
    assert fit["redis_cpu_us"]["per_request"] == pytest.approx(300)
    assert fit["worker_cpu_us"] == {"per_token": None, "per_request": None}


def test_split_fixed_gives_none_when_both_windows_have_the_same_tokens_per_request():
    main = _win(60, 1000, 10, 3000, 1.0)
    same_shape = _win(30, 500, 5, 1500, 1.0)
    assert cp.split_fixed(main, same_shape)["commands"] == {"per_token": None, "per_request": None}


def test_projected_tokps_is_a_million_over_the_microseconds_per_token():
    assert cp.projected_tokps(12.0) == pytest.approx(83_333.33, rel=1e-6)
    assert cp.projected_tokps(0.0) is None
    assert cp.projected_tokps(-1.0) is None
    assert cp.projected_tokps(None) is None


def test_figures_and_their_median_over_rounds():
    # 2.6 commands and 12 µs per token, 40 commands and 0 µs per request, 7 commands and 500 µs per idle second
    main_load = _win(60.0, 16416, 32, 2.6 * 16416 + 40 * 32 + 420, 12 * 16416 + 30_000, {"publish": 16416, "info": 1})
    main_idle = _win(60.0, 0, 0, 420, 30_000.0, {"info": 1})
    short_load = _win(30.0, 4096, 64, 2.6 * 4096 + 40 * 64 + 210, 12 * 4096 + 15_000, {"publish": 4096})
    short_idle = _win(30.0, 0, 0, 210, 15_000.0)
    f = cp.figures(main_load, main_idle, short_load, short_idle)
    assert f["per_token"]["commands"] == pytest.approx(2.6 + 40 * 32 / 16416)
    assert f["per_token"]["redis_cpu_us"] == pytest.approx(12)
    assert f["per_request"]["commands"] == pytest.approx(2.6 * 16416 / 32 + 40)
    assert f["per_second_idle"]["commands"] == pytest.approx(7.0)
    assert f["per_second_idle"]["redis_cpu_us"] == pytest.approx(500)
    assert f["gross_per_token"]["api_cpu_us"] == pytest.approx(2 * main_load["redis_cpu_us"] / 16416)
    assert f["projected_tokps_one_redis_core"] == pytest.approx(1e6 / 12)
    assert f["commands_per_token_by_command"] == {"publish": pytest.approx(1.0)}
    assert f["fit"]["commands"]["per_token"] == pytest.approx(2.6)
    assert f["fit"]["commands"]["per_request"] == pytest.approx(40)
    assert f["fit"]["redis_cpu_us"]["per_request"] == pytest.approx(0, abs=1e-6)
    m = cp.median_figures([f, f, {**f, "per_token": {**f["per_token"], "redis_cpu_us": 100.0}}])
    assert m["rounds"] == 3
    assert m["per_token"]["redis_cpu_us"] == pytest.approx(12)
    assert m["fit"]["commands"]["per_token"] == pytest.approx(2.6)
    assert m["projected_tokps_one_redis_core"] == pytest.approx(1e6 / 12)
    table = cp.format_table(m, 512, 64)
    assert "| Redis commands | 2.68 |" in table
    assert "83,333" in table

"""`python -m bench.fleet_sim`: a fleet of load-test workers on loopback, 1 to 64 of them, one Redis core.

LOAD-TEST WORKERS: every worker runs `tgq worker --load-test-tokens-per-s R` (worker/loadtest.py), which
loads no model and emits placeholder tokens through the real protocol (queues, leases, fenced step
messages, cancellation, metrics). The API processes and the streaming clients are the real ones.

For each fleet size the cost probe (bench/cost_probe.py) runs one round: redis-server pinned alone to
one CPU (`--pin-redis`), everything else on the other CPUs, `rows` streaming clients per worker, a load
window and an idle window of the same length. Per size it reports the tokens the clients received per
second, Redis's main-thread CPU per token (net of idle), commands per token, and the busy share of the
Redis core. On a 2-core machine the clients, APIs and workers share one core and saturate long before
Redis does, so where Redis would saturate is PROJECTED: 1e6 / (Redis main-thread µs per token) tok/s,
and that figure over the per-worker token rate for the worker count. Projected figures are labelled so.

Results: bench/results/<date>-fleet-sim.json, a Markdown table on stdout, and a PNG chart.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from . import cost_probe
from .stacks import ROOT


def _say(msg: str) -> None:
    print(f"[fleet-sim {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def probe_argv(args: argparse.Namespace, workers: int) -> list[str]:
    clients = min(args.rows * workers, args.max_clients)
    return ["--workers", str(workers), "--max-batch-size", str(args.rows), "--api-workers", str(args.api_workers),
            "--clients", str(clients),
            "--new-tokens", str(args.new_tokens), "--short-tokens", "0", "--duration", str(args.duration),
            "--rounds", "1", "--load-test-tokens-per-s", str(args.rate), "--pin-redis", str(args.redis_cpu),
            "--max-queue-length", str(max(1024, 4 * clients)), "--settle", "3"]


def size_row(workers: int, rate: float, rows: int, res: dict[str, Any]) -> dict[str, Any]:
    """One fleet size's figures from the probe's result (measured, then projected)."""
    s = res.get("summary") or {}
    per_token = s.get("per_token") or {}
    rnd = res["rounds"][0] if res.get("rounds") else None
    main_us = per_token.get("redis_main_cpu_us")
    busy = None
    if rnd is not None and rnd["main_load"].get("redis_main_cpu_us") is not None:
        busy = rnd["main_load"]["redis_main_cpu_us"] / (1e6 * rnd["main_load"]["seconds"])
    capacity = cost_probe.projected_tokps(main_us)
    per_worker = rate * rows
    rows_per_step = (rnd.get("figures") or {}).get("decode_rows_mean") if rnd is not None else None
    return {"workers": workers, "offered_tokps": per_worker * workers, "tokens_per_s": s.get("tokens_per_s"),
            "rows_per_step": rows_per_step,
            "redis_main_cpu_us_per_token": main_us, "redis_cpu_us_per_token": per_token.get("redis_cpu_us"),
            "commands_per_token": per_token.get("commands"), "api_cpu_us_per_token": per_token.get("api_cpu_us"),
            "redis_core_busy_share": busy, "projected_tokps_one_redis_core": capacity,
            "projected_workers_one_redis_core": None if capacity is None else capacity / per_worker,
            "errors": res.get("errors", [])}


def _f(x: float | None, fmt: str = "{:,.0f}") -> str:
    return "n/a" if x is None else fmt.format(x)


def format_table(rows: list[dict[str, Any]], rate: float, per_row_workers: int) -> str:
    lines = [f"| workers | offered tok/s | received tok/s | rows per step | Redis µs/token (main thread) | "
             f"commands/token | Redis core busy | PROJECTED tok/s at one Redis core | PROJECTED workers "
             f"({per_row_workers} rows x {rate:g} tok/s) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['workers']} | {_f(r['offered_tokps'])} | {_f(r['tokens_per_s'])} | "
                     f"{_f(r.get('rows_per_step'), '{:.1f}')} | "
                     f"{_f(r['redis_main_cpu_us_per_token'], '{:.2f}')} | {_f(r['commands_per_token'], '{:.3f}')} | "
                     f"{_f(None if r['redis_core_busy_share'] is None else 100 * r['redis_core_busy_share'], '{:.1f}%')}"
                     f" | {_f(r['projected_tokps_one_redis_core'])} | "
                     f"{_f(r['projected_workers_one_redis_core'])} |")
    return "\n".join(lines)


def chart(rows: list[dict[str, Any]], title: str, path: Path) -> None:
    """Received tok/s and Redis core busy share against the worker count; the projected ceiling dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r["workers"] for r in rows]
    fig, left = plt.subplots(figsize=(8, 5.4), dpi=110)
    left.set_xscale("log", base=2)
    left.set_yscale("log")
    left.plot(xs, [r["offered_tokps"] for r in rows], ":", color="grey", label="offered tok/s (workers x rows x rate)")
    left.plot(xs, [r["tokens_per_s"] for r in rows], "o-", color="tab:blue", label="received tok/s (measured)")
    proj = [r["projected_tokps_one_redis_core"] for r in rows]
    left.plot(xs, proj, "s--", color="tab:red", label="one Redis core saturates at (PROJECTED)")
    left.set_xticks(xs, [str(x) for x in xs])
    left.set_xlabel("load-test worker processes")
    left.set_ylabel("tokens per second")
    right = left.twinx()
    right.plot(xs, [r["redis_main_cpu_us_per_token"] for r in rows], "^-", color="tab:green",
               label="Redis µs per token, main thread (measured)")
    right.set_ylabel("Redis CPU µs per token")
    right.set_ylim(0, max([1.0] + [r["redis_main_cpu_us_per_token"] or 0 for r in rows]) * 1.6)
    handles = left.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    labels = left.get_legend_handles_labels()[1] + right.get_legend_handles_labels()[1]
    left.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, fontsize=8)
    left.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.fleet_sim", description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="1,4,16,64", help="worker counts")
    p.add_argument("--rate", type=float, default=20.0, help="load-test tokens per second per row")
    p.add_argument("--rows", type=int, default=32, help="rows per worker (clients = rows x workers)")
    p.add_argument("--api-workers", type=int, default=4, help="gunicorn worker processes of the API")
    p.add_argument("--max-clients", type=int, default=512,
                   help="most streaming clients (on 2 cores, 2048 streams starve the API processes past "
                        "gunicorn's 30 s worker timeout); past it the workers' batches are not full")
    p.add_argument("--new-tokens", type=int, default=512)
    p.add_argument("--duration", type=float, default=30.0, help="seconds of issuing requests per size")
    p.add_argument("--redis-cpu", type=int, default=0, help="the CPU redis-server gets to itself")
    p.add_argument("--out", type=Path, default=None, help="the JSON (default bench/results/<date>-fleet-sim.json)")
    p.add_argument("--chart", type=Path, default=None, help="the PNG (default beside the JSON)")
    p.add_argument("--logs", type=Path, default=ROOT / "bench-results")
    p.add_argument("--render", type=Path, default=None, metavar="JSON",
                   help="no run: recompute the table and the chart from a saved run's probes")
    return p


def render(path: Path, chart_path: Path | None) -> int:
    out = json.loads(path.read_text())
    c = out["config"]
    out["sizes"] = [size_row(res["config"]["workers"], c["rate"], c["rows"], res) for res in out["probes"]]
    return finish(out, path, chart_path or path.with_suffix(".png"))


def finish(out: dict[str, Any], out_json: Path, out_png: Path) -> int:
    c = out["config"]
    out["table"] = format_table(out["sizes"], c["rate"], c["rows"])
    out_json.write_text(json.dumps(out, indent=1))
    chart(out["sizes"], f"tgq fleet simulation, LOAD-TEST workers ({c['rows']} rows x {c['rate']:g} tok/s each), "
                        f"{c['api_workers']} API processes, Redis pinned to one core\n{c['cpu_model']} x {c['cpus']}, "
                        f"{c['started'][:10]}", out_png)
    print(f"{out['table']}\n\nresults: {out_json}\nchart: {out_png}")
    return 0 if all(not r["errors"] for r in out["sizes"]) else 1


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.render is not None:
        return render(args.render, args.chart)
    sizes = [int(x) for x in args.sizes.split(",") if x.strip()]
    if not sizes or min(sizes) < 1 or args.rate <= 0 or args.rows < 1:
        raise SystemExit("--sizes must be positive integers, --rate and --rows positive")
    if (os.cpu_count() or 1) < 2:
        raise SystemExit("the simulation pins Redis to one CPU and needs at least one other")
    stem = f"{time.strftime('%Y-%m-%d')}-fleet-sim"
    out_json = args.out or ROOT / "bench" / "results" / f"{stem}.json"
    out_png = args.chart or out_json.with_suffix(".png")
    out: dict[str, Any] = {"config": {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                                      "cpu_model": cost_probe.cpu_model(), "cpus": os.cpu_count(),
                                      "started": time.strftime("%Y-%m-%dT%H:%M:%S")}, "sizes": [], "probes": []}
    for n in sizes:
        _say(f"{n} load-test worker(s) x {args.rows} rows at {args.rate:g} tok/s per row")
        probe = cost_probe.parse_args(probe_argv(args, n))
        probe.out = args.logs
        res = cost_probe.run(probe)
        row = size_row(n, args.rate, args.rows, res)
        _say(f"{n} workers: {row}")
        out["sizes"].append(row)
        out["probes"].append(res)
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(out, indent=1))
    return finish(out, out_json, out_png)


if __name__ == "__main__":
    sys.exit(main())

"""`python -m bench.cost_probe`: what a generated token costs Redis and the API, at a given load.

One private stack (redis-server, `--workers` workers, `tgq api` with `--api-workers` gunicorn workers),
loaded by `bench.client`'s closed-loop streaming clients on /generate_stream (greedy, ~32-token prompts).
Defaults are the conditions of the fleet issue: 32 rows per worker (`--clients` = 32 x workers), 2 API
processes, 512 new tokens per request.

Each round measures four windows, reading Redis's INFO and the processes' CPU times at both ends of each:
  load   the clients run for --duration seconds (or --requests requests); requests in flight then finish;
  idle   the same processes, no clients, for as long as the load window took;
  load'  the same with --short-tokens new tokens per request (0: skipped);
  idle'  as long as load'.

What is counted:
- Redis commands: the sum of `calls` over `INFO commandstats`. Redis counts there every command it
  executes, those a Lua script runs with redis.call included, and the EVALSHA/EVAL that ran the script
  as one more; commands queued in MULTI count once each, plus MULTI and EXEC. It is the same count as
  `total_commands_processed` (checked in the JSON: `total_commands_processed` per window).
- Redis CPU: `used_cpu_sys + used_cpu_user` (the whole process, background threads included) and
  `used_cpu_sys_main_thread + used_cpu_user_main_thread` (the thread that executes commands; Redis 7+).
- API CPU: user + system time of the gunicorn worker processes (the API master's children, psutil);
  the master's own time is kept apart in the JSON. Worker CPU likewise (the `tgq worker` processes).
Nothing the probe itself does reaches Redis inside a window but the INFO that opens it (one `info`
call, in every window alike, so it cancels out of the net figures).

Figures:
- net of idle = load window - idle window x (load seconds / idle seconds): what the load added over what
  heartbeats, reapers and sweeps cost anyway. `per second` is the idle window's rate.
- per token / per request = the net figure / tokens the clients received, / requests completed in the
  main (--new-tokens) window: the whole cost of one request of that length, spread.
- marginal per token and fixed per request: net = a x tokens + b x requests, solved exactly from the two
  load windows (--new-tokens and --short-tokens per request): `a` is what one more token costs, `b`
  what a request costs whatever its length (enqueue, subscribe, prefill, bookkeeping). At 32 rows per
  worker a step's costs are spread over its rows and land in `a`.
- projected tok/s of one Redis core = 1e6 / (net Redis CPU µs per token), whole process and main
  thread; the main thread is the one that saturates first.
API CPU is reported gross (the gunicorn workers' CPU delta / tokens), and net of idle beside it.

Results: a table on stdout and bench/results/<date>-cost-probe-<label>.json (--out to change).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import stats
from .stacks import RESULTS, ROOT, TgqStack

COSTS = ("commands", "redis_cpu_us", "redis_main_cpu_us", "api_cpu_us", "worker_cpu_us")
LABELS = {"commands": "Redis commands", "redis_cpu_us": "Redis CPU µs (process)",
          "redis_main_cpu_us": "Redis CPU µs (main thread)", "api_cpu_us": "API CPU µs (gunicorn workers)",
          "worker_cpu_us": "worker CPU µs"}
INFO_SECTIONS = ("cpu", "commandstats", "stats")


def _say(msg: str) -> None:
    print(f"[cost-probe {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- pure: INFO text ---------------------------------------------------------------------------------

def parse_info(text: str) -> dict[str, str]:
    """`key:value` lines of an INFO reply (any sections), values as text; headers and blanks skipped."""
    out: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition(":")
        if sep:
            out[key] = value
    return out


def parse_commandstats(info: dict[str, str]) -> dict[str, dict[str, int]]:
    """{command: {"calls", "usec"}} from `cmdstat_<name>:calls=..,usec=..,...` (Redis 7 names
    subcommands `client|setname`)."""
    out: dict[str, dict[str, int]] = {}
    for key, value in info.items():
        if not key.startswith("cmdstat_"):
            continue
        fields = dict(part.partition("=")[::2] for part in value.split(","))
        try:
            out[key[len("cmdstat_"):]] = {"calls": int(fields.get("calls", 0)), "usec": int(fields.get("usec", 0))}
        except ValueError:
            continue
    return out


def parse_cpu(info: dict[str, str]) -> tuple[float, float | None]:
    """(process CPU s, main-thread CPU s or None before Redis 7) from the `# CPU` section."""
    def seconds(*keys: str) -> float | None:
        if not all(k in info for k in keys):
            return None
        return sum(float(info[k]) for k in keys)

    process = seconds("used_cpu_sys", "used_cpu_user")
    if process is None:
        raise ValueError("INFO has no used_cpu_sys/used_cpu_user (ask for the cpu section)")
    return process, seconds("used_cpu_sys_main_thread", "used_cpu_user_main_thread")


# ---- pure: readings, windows and the arithmetic ------------------------------------------------------

@dataclass(frozen=True)
class Reading:
    """Everything the probe counts, read at one instant."""
    t: float
    calls: dict[str, int]
    usec: dict[str, int]
    total_commands: int
    redis_cpu_s: float
    redis_main_cpu_s: float | None
    api_cpu_s: float
    api_master_cpu_s: float
    worker_cpu_s: float


def reading(info_text: str, t: float, api_cpu_s: float, api_master_cpu_s: float, worker_cpu_s: float) -> Reading:
    info = parse_info(info_text)
    cmd = parse_commandstats(info)
    cpu, main = parse_cpu(info)
    return Reading(t=t, calls={k: v["calls"] for k, v in cmd.items()}, usec={k: v["usec"] for k, v in cmd.items()},
                   total_commands=int(info.get("total_commands_processed", 0)), redis_cpu_s=cpu,
                   redis_main_cpu_s=main, api_cpu_s=api_cpu_s, api_master_cpu_s=api_master_cpu_s,
                   worker_cpu_s=worker_cpu_s)


def window(before: Reading, after: Reading, tokens: int = 0, requests: int = 0) -> dict[str, Any]:
    """What happened between two readings (CPU in µs)."""
    calls = stats.counter_delta(before.calls, after.calls)
    main = (None if before.redis_main_cpu_s is None or after.redis_main_cpu_s is None
            else 1e6 * (after.redis_main_cpu_s - before.redis_main_cpu_s))
    return {"seconds": after.t - before.t, "tokens": tokens, "requests": requests,
            "commands": sum(calls.values()), "total_commands_processed": after.total_commands - before.total_commands,
            "by_command": calls, "usec_by_command": stats.counter_delta(before.usec, after.usec),
            "redis_cpu_us": 1e6 * (after.redis_cpu_s - before.redis_cpu_s), "redis_main_cpu_us": main,
            "api_cpu_us": 1e6 * (after.api_cpu_s - before.api_cpu_s),
            "api_master_cpu_us": 1e6 * (after.api_master_cpu_s - before.api_master_cpu_s),
            "worker_cpu_us": 1e6 * (after.worker_cpu_s - before.worker_cpu_s)}


def _minus(a: float | None, b: float | None, scale: float) -> float | None:
    return None if a is None or b is None else a - b * scale


def net_of_idle(load: dict[str, Any], idle: dict[str, Any]) -> dict[str, Any]:
    """The load window's costs less the idle window's, the idle one scaled to the load window's length."""
    if idle["seconds"] <= 0:
        raise ValueError("the idle window has no length")
    scale = load["seconds"] / idle["seconds"]
    out: dict[str, Any] = {"seconds": load["seconds"], "tokens": load["tokens"], "requests": load["requests"],
                           "idle_scale": scale}
    for key in COSTS:
        out[key] = _minus(load[key], idle[key], scale)
    names = set(load["by_command"]) | set(idle["by_command"])
    out["by_command"] = {k: load["by_command"].get(k, 0) - idle["by_command"].get(k, 0) * scale for k in sorted(names)}
    return out


def per_unit(costs: dict[str, Any], n: float) -> dict[str, float | None]:
    """Each cost / n (None where there is no cost or no n)."""
    return {k: (None if costs.get(k) is None or not n else costs[k] / n) for k in COSTS}


def split_fixed(main: dict[str, Any], short: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """Solve net = a x tokens + b x requests over two windows whose tokens per request differ.

    {cost: {"per_token": a, "per_request": b}}; None where the two windows cannot tell them apart."""
    t1, r1, t2, r2 = main["tokens"], main["requests"], short["tokens"], short["requests"]
    det = t1 * r2 - t2 * r1
    out: dict[str, dict[str, float | None]] = {}
    for key in COSTS:
        x1, x2 = main.get(key), short.get(key)
        if x1 is None or x2 is None or abs(det) < 1e-9 * max(1.0, abs(t1 * r2)):
            out[key] = {"per_token": None, "per_request": None}
        else:
            out[key] = {"per_token": (x1 * r2 - x2 * r1) / det, "per_request": (t1 * x2 - t2 * x1) / det}
    return out


def projected_tokps(us_per_token: float | None) -> float | None:
    """Tokens per second one core carries at this CPU cost per token."""
    return None if us_per_token is None or us_per_token <= 0 else 1e6 / us_per_token


def figures(main_load: dict[str, Any], main_idle: dict[str, Any], short_load: dict[str, Any] | None = None,
            short_idle: dict[str, Any] | None = None) -> dict[str, Any]:
    """One round's figures from its windows (see the module docstring)."""
    net = net_of_idle(main_load, main_idle)
    tokens, requests = main_load["tokens"], main_load["requests"]
    out: dict[str, Any] = {
        "tokens": tokens, "requests": requests, "tokens_per_s": tokens / main_load["seconds"],
        "net": net, "per_token": per_unit(net, tokens), "per_request": per_unit(net, requests),
        "per_second_idle": per_unit(main_idle, main_idle["seconds"]),
        "gross_per_token": per_unit(main_load, tokens), "gross_per_request": per_unit(main_load, requests),
        "commands_per_token_by_command": {k: v / tokens for k, v in sorted(net["by_command"].items(),
                                                                           key=lambda kv: -kv[1]) if tokens and v},
        "usec_per_call": {k: main_load["usec_by_command"].get(k, 0) / n
                          for k, n in main_load["by_command"].items() if n > 0},
    }
    out["projected_tokps_one_redis_core"] = projected_tokps(out["per_token"]["redis_cpu_us"])
    out["projected_tokps_one_redis_core_main_thread"] = projected_tokps(out["per_token"]["redis_main_cpu_us"])
    if short_load is not None and short_idle is not None:
        short = net_of_idle(short_load, short_idle)
        out["short_net"] = short
        out["short_per_token"] = per_unit(short, short["tokens"])
        out["fit"] = split_fixed(net, short)
    return out


def median_figures(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The median over rounds of every figure the table prints."""
    def med(get: Any) -> float | None:
        return stats.median_over(rounds, get)

    out: dict[str, Any] = {"rounds": len(rounds), "tokens_per_s": med(lambda r: r["tokens_per_s"])}
    for group in ("per_token", "per_request", "per_second_idle", "gross_per_token", "gross_per_request"):
        out[group] = {k: med(lambda r, g=group, k=k: r[g][k]) for k in COSTS}
    if all("fit" in r for r in rounds) and rounds:
        out["fit"] = {k: {part: med(lambda r, k=k, p=part: r["fit"][k][p]) for part in ("per_token", "per_request")}
                      for k in COSTS}
    out["projected_tokps_one_redis_core"] = projected_tokps(out["per_token"]["redis_cpu_us"])
    out["projected_tokps_one_redis_core_main_thread"] = projected_tokps(out["per_token"]["redis_main_cpu_us"])
    return out


def _f(x: float | None, digits: int = 2) -> str:
    if x is None:
        return "n/a"
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.{digits}f}"


def format_table(summary: dict[str, Any], new_tokens: int, short_tokens: int) -> str:
    """The figures as a Markdown table, one row per cost; net of idle unless a row says gross."""
    fit = summary.get("fit")
    head = (f"| figure | per token | per request ({new_tokens} tok) | per second, idle | "
            f"marginal per token | fixed per request |")
    lines = [head, "|---|---|---|---|---|---|"]
    for key in COSTS:
        a = fit[key] if fit else {"per_token": None, "per_request": None}
        lines.append(f"| {LABELS[key]} | {_f(summary['per_token'][key])} | {_f(summary['per_request'][key], 1)} | "
                     f"{_f(summary['per_second_idle'][key], 1)} | {_f(a['per_token'])} | {_f(a['per_request'], 1)} |")
    for key in ("api_cpu_us", "worker_cpu_us"):
        lines.append(f"| {LABELS[key]}, gross | {_f(summary['gross_per_token'][key])} | "
                     f"{_f(summary['gross_per_request'][key], 1)} | | | |")
    lines.append("")
    lines.append(f"projected tok/s of one Redis core: {_f(summary['projected_tokps_one_redis_core'])} (process CPU), "
                 f"{_f(summary['projected_tokps_one_redis_core_main_thread'])} (main thread)")
    if not fit:
        lines.append("marginal/fixed columns: n/a (--short-tokens 0)")
    else:
        lines.append(f"marginal per token and fixed per request: net = a x tokens + b x requests, solved from the "
                     f"{new_tokens}- and {short_tokens}-token windows")
    return "\n".join(lines)


# ---- the stack and its processes ---------------------------------------------------------------------

def build_stack(args: argparse.Namespace) -> TgqStack:
    """Redis + `args.workers` workers + the API, not yet started: real `tgq worker`s (their model on
    `args.device`), or load-test workers (`--load-test-tokens-per-s`, no model) when that rate is set."""
    return TgqStack(args, "cost", args.workers, args.threads)


def worker_mode(args: argparse.Namespace) -> str:
    rate = getattr(args, "load_test_tokens_per_s", 0)
    return f"load-test ({rate:g} tokens/s per row)" if rate else "real"


def _cpu_s(procs: list[Any]) -> float:
    import psutil

    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system
    return total


class Processes:
    """The psutil handles of the stack's API master, its gunicorn workers and the tgq workers."""

    def __init__(self, stack: TgqStack) -> None:
        import psutil

        self.master = psutil.Process(stack.api.pid)
        self.api_workers = self.master.children(recursive=True)
        self.workers = [psutil.Process(pid) for pid in stack.worker_pids()]

    def changed(self) -> bool:
        """True when the API's set of worker processes is no longer the one the probe counts."""
        return {p.pid for p in self.master.children(recursive=True)} != {p.pid for p in self.api_workers}


def read(client: Any, procs: Processes) -> Reading:
    text = client.execute_command("INFO", *INFO_SECTIONS)
    if isinstance(text, bytes):
        text = text.decode()
    return reading(text, time.monotonic(), _cpu_s(procs.api_workers), _cpu_s([procs.master]), _cpu_s(procs.workers))


def info_client(stack: TgqStack) -> Any:
    """A connection of the probe's own whose INFO replies stay raw text (parsed here, not by redis-py)."""
    import redis

    port = stack.redis_port
    client = redis.Redis(host="127.0.0.1", port=port)
    client.set_response_callback("INFO", lambda resp, **kw: resp)
    return client


# ---- the windows -------------------------------------------------------------------------------------

def load_window(args: argparse.Namespace, stack: TgqStack, client: Any, procs: Processes, new_tokens: int,
                problems: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """One load window: (its costs, bench.client's summary)."""
    from .client import run_load

    m0 = stack.worker_samples()
    before = read(client, procs)
    res = run_load(stack.url, clients=args.clients, prompt_tokens=args.prompt_tokens, new_tokens=new_tokens,
                   requests=args.requests, duration=args.duration, hard_deadline_s=args.deadline,
                   scrape_metrics=False, progress=args.progress)
    time.sleep(args.settle)  # a request's last bookkeeping lands just after its final event
    after = read(client, procs)
    m1 = stack.worker_samples()
    w = window(before, after, tokens=res["generated_tokens"], requests=res["completed"])
    if m0 is not None and m1 is not None:
        from .suite import _worker_deltas

        w["worker_metrics"] = _worker_deltas(m0, m1)
    if res["errors"] or res["cut_at_deadline"]:
        problems.append(f"{new_tokens}-token window: {res['errors']} errors, {res['cut_at_deadline']} cut "
                        f"{res['error_messages']}")
        if res["cut_at_deadline"]:
            stack.cancel_leftovers()
    if procs.changed():
        problems.append(f"{new_tokens}-token window: the API's worker processes changed during the run")
    dead = [c.name for c in stack.workers if not c.alive()]
    if dead:
        problems.append(f"{new_tokens}-token window: worker(s) exited: {dead}")
    return w, res


def idle_window(client: Any, procs: Processes, seconds: float) -> dict[str, Any]:
    before = read(client, procs)
    time.sleep(max(0.0, seconds - 0.01))
    return window(before, read(client, procs))


def _brief(w: dict[str, Any]) -> str:
    tok = w["tokens"] or 1
    return (f"{w['seconds']:.1f} s, {w['tokens']} tokens, {w['requests']} requests, {w['commands']} commands "
            f"({w['commands'] / tok:.2f}/token gross), Redis CPU {w['redis_cpu_us'] / 1e3:.0f} ms")


def run(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"config": {
        "worker_mode": worker_mode(args), "model": args.model, "dtype": args.dtype, "device": args.device,
        "workers": args.workers, "threads": args.threads, "max_batch_size": args.max_batch_size,
        "clients": args.clients, "api_workers": args.api_workers, "new_tokens": args.new_tokens,
        "short_tokens": args.short_tokens, "prompt_tokens": args.prompt_tokens, "duration_s": args.duration,
        "requests": args.requests, "rounds": args.rounds, "settle_s": args.settle, "cpu_model": cpu_model(),
        "redis_pinned_to_cpu": getattr(args, "pin_redis", None),
        "cpus": os.cpu_count(), "loadavg_start": [round(x, 2) for x in os.getloadavg()],
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "commit": _commit(), "uncommitted": _uncommitted()},
        "rounds": [], "errors": []}
    from .client import run_load

    _say(f"CPU {out['config']['cpu_model']} x {os.cpu_count()}; starting redis + {args.workers} worker(s) "
         f"({args.device}, {args.dtype}, {args.threads} threads, {args.max_batch_size} rows) + API "
         f"({args.api_workers} gunicorn workers)")
    stack = build_stack(args)
    try:
        stack.start()
        client = info_client(stack)
        procs = Processes(stack)
        out["config"]["redis_version"] = parse_info(client.execute_command("INFO", "server").decode()).get("redis_version")
        out["config"]["api_worker_pids"] = [p.pid for p in procs.api_workers]
        if len(procs.api_workers) != args.api_workers:
            out["errors"].append(f"the API has {len(procs.api_workers)} worker processes, not {args.api_workers}")
        _say("warm-up")
        run_load(stack.url, clients=1, requests=1, new_tokens=8, scrape_metrics=False, hard_deadline_s=300)
        run_load(stack.url, clients=args.clients, requests=2 * args.clients, new_tokens=args.short_tokens or 16,
                 scrape_metrics=False, hard_deadline_s=600)  # two waves: every API process and batch shape served once
        time.sleep(args.settle)
        for k in range(args.rounds):
            rnd: dict[str, Any] = {}
            plan = [("main", args.new_tokens)] + ([("short", args.short_tokens)] if args.short_tokens else [])
            for name, new_tokens in plan:
                load, res = load_window(args, stack, client, procs, new_tokens, out["errors"])
                _say(f"round {k + 1}/{args.rounds} load {new_tokens} tokens/request: {_brief(load)}; "
                     f"{res['tokens_per_s']:.0f} tok/s")
                idle = idle_window(client, procs, load["seconds"])
                _say(f"round {k + 1}/{args.rounds} idle: {_brief(idle)}")
                rnd[f"{name}_load"], rnd[f"{name}_idle"] = load, idle
                rnd[f"{name}_client"] = {key: res[key] for key in ("tokens_per_s", "completed", "errors", "wall_s",
                                                                   "mean_tokens_per_request", "finish_reasons",
                                                                   "ttft_s", "itl_s")}
            rnd["figures"] = figures(rnd["main_load"], rnd["main_idle"], rnd.get("short_load"), rnd.get("short_idle"))
            rnd["figures"]["tokens_per_s"] = rnd["main_client"]["tokens_per_s"]  # client side, without the settle
            wm = rnd["main_load"].get("worker_metrics") or {}
            if wm.get("decode_steps"):  # a decode step yields a token per row; a request's first comes from prefill
                rnd["figures"]["decode_rows_mean"] = ((rnd["main_load"]["tokens"] - rnd["main_load"]["requests"])
                                                      / wm["decode_steps"])
            out["rounds"].append(rnd)
        out["summary"] = median_figures([r["figures"] for r in out["rounds"]])
    except RuntimeError as exc:
        out["errors"].append(f"stack: {exc}")
    finally:
        stack.stop(out["errors"])
        out["config"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    return out


def cpu_model() -> str:
    try:
        text = subprocess.run(["lscpu"], check=False, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return next((line.split(":", 1)[1].strip() for line in text.splitlines()
                 if line.strip().startswith("Model name:")), "unknown")


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], check=False, cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _uncommitted() -> list[str]:
    """Tracked files of the code under test that differ from the commit (others may be editing them)."""
    try:
        text = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "api", "worker",
                               "common"], check=False, cwd=ROOT, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line[3:] for line in text.splitlines()]


def format_report(res: dict[str, Any]) -> str:
    c = res["config"]
    load = f"{c['requests']} requests" if c["requests"] else f"{c['duration_s']:g} s"
    lines = [(f"cost probe: {c['model']} {c['dtype']} on {c['device']}, {c['workers']} {c['worker_mode']} worker(s) x "
              f"{c['max_batch_size']} rows ({c['threads']} threads), {c['api_workers']} API processes, {c['clients']} "
              f"clients x {c['new_tokens']} new tokens (and {c['short_tokens']}), {load} per load window, "
              f"{c['rounds']} round(s)"),
             (f"CPU: {c['cpu_model']} ({c['cpus']} CPUs), load average at start {c['loadavg_start']}, at end "
              f"{c.get('loadavg_end')}; Redis {c.get('redis_version')}; commit {c['commit']}"
              + (f" with uncommitted changes in {', '.join(c['uncommitted'])}" if c.get("uncommitted") else ""))]
    s = res.get("summary")
    if s:
        lines.append(f"throughput {s['tokens_per_s']:.0f} tok/s (client side, {c['new_tokens']}-token window)")
        for k, rnd in enumerate(res["rounds"]):
            wm = rnd["main_load"].get("worker_metrics") or {}
            steps = (wm.get("decode_steps") or 0) + (wm.get("prefill_steps") or 0)
            lines.append(f"round {k + 1}: {rnd['main_load']['tokens']} tokens, {rnd['main_load']['requests']} requests "
                         f"in {rnd['main_load']['seconds']:.1f} s; {steps:.0f} worker steps, mean decode batch "
                         f"{_f(rnd['figures'].get('decode_rows_mean'), 1)} rows, "
                         f"{_f(rnd['main_load']['commands'] / steps if steps else None)} commands/step (gross); "
                         f"ITL p50 {_f(1e3 * rnd['main_client']['itl_s']['p50'], 0)} ms, p99 "
                         f"{_f(1e3 * rnd['main_client']['itl_s']['p99'], 0)} ms")
        lines.append("")
        lines.append(format_table(s, c["new_tokens"], c["short_tokens"]))
        top = res["rounds"][-1]["figures"]["commands_per_token_by_command"]
        lines.append("commands per token by command (net, last round): "
                     + ", ".join(f"{k} {v:.3f}" for k, v in list(top.items())[:8]))
    for e in res["errors"]:
        lines.append(f"error: {e}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.cost_probe", description=__doc__.split("\n")[0])
    p.add_argument("--workers", type=int, default=1, help="tgq worker processes")
    p.add_argument("--max-batch-size", type=int, default=32, help="rows per worker")
    p.add_argument("--clients", type=int, default=0, help="streaming clients (default: rows per worker x workers)")
    p.add_argument("--api-workers", type=int, default=2, help="gunicorn worker processes of the API")
    p.add_argument("--new-tokens", type=int, default=512)
    p.add_argument("--short-tokens", type=int, default=64,
                   help="new tokens per request of the second load window (0: skip it and the per-request fit)")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--duration", type=float, default=60.0, help="seconds of issuing requests per load window")
    p.add_argument("--requests", type=int, default=0, help="requests per load window instead of --duration")
    p.add_argument("--rounds", type=int, default=1, help="rounds of (load, idle, load', idle'); figures are medians")
    p.add_argument("--threads", type=int, default=2, help="torch threads per worker")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--cache-dir", default="")
    p.add_argument("--settle", type=float, default=2.0, help="seconds after a load's last stream before its reading")
    p.add_argument("--deadline", type=float, default=1800.0, help="safety cut of a load window, seconds")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--load-test-tokens-per-s", type=float, default=0.0,
                   help="run load-test workers (worker/loadtest.py: no model) at this rate per row (0: real workers)")
    p.add_argument("--pin-redis", type=int, default=None, metavar="CPU",
                   help="pin redis-server to this CPU and everything else (workers, API, clients) to the others")
    p.add_argument("--max-queue-length", type=int, default=1024, help="the API's 429 limit")
    p.add_argument("--label", default="", help="the JSON's name: <date>-cost-probe-<label>.json")
    p.add_argument("--out", type=Path, default=None, help="the JSON (default bench/results/<date>-cost-probe-<label>.json)")
    p.add_argument("--logs", type=Path, default=RESULTS, help="where the servers' logs go (<logs>/logs)")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = _parser().parse_args(argv)
    if min(args.workers, args.max_batch_size, args.api_workers, args.new_tokens, args.rounds) < 1:
        raise SystemExit("--workers, --max-batch-size, --api-workers, --new-tokens and --rounds must be positive")
    if args.short_tokens == args.new_tokens:
        raise SystemExit("--short-tokens must differ from --new-tokens (or be 0)")
    if not args.requests and args.duration <= 0:
        raise SystemExit("give --duration > 0 or --requests > 0")
    args.clients = args.clients or args.max_batch_size * args.workers
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    label = args.label or (f"{args.device}-{args.workers}w-{args.clients}c-{args.new_tokens}t")
    out_json = args.out or ROOT / "bench" / "results" / f"{time.strftime('%Y-%m-%d')}-cost-probe-{label}.json"
    args.out = args.logs  # TgqStack writes its logs under args.out / "logs"
    res = run(args)
    res["report"] = format_report(res)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(res, indent=1))
    print(f"{res['report']}\n\nresults: {out_json}")
    return 0 if res.get("summary") and not res["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())

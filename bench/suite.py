"""`python -m bench.suite` (`make bench`): tgq against its yardsticks, in one run, on one machine.

With one model, dtype and thread count throughout:
  raw     the bare batched greedy loop (`worker.rawloop.raw_decode_tokps`) at B = each concurrency,
          and the Engine on the same workload without Redis (`engine_decode_tokps`), in a child process;
  tgq     private redis-server + `tgq worker` + `tgq api` on loopback, driven by `bench.client` with
          C concurrent streaming clients x --new-tokens;
  naive   the same API and Redis with `bench.naive_worker` (model.generate, one request at a time);
  memory  one tgq run at the largest concurrency with rows of 1512 tokens (the default limits), for
          the worker's peak RSS;
  scale   1 vs 2 tgq workers at --threads 1 (at the largest concurrency);
  llama   (--llamacpp) llama.cpp's server on the shipped Q4_1 GGUF and on a bf16 GGUF of the same weights
          (`bench.gguf_bf16`), driven by the same client through /v1/completions: the C++ `llama-server`
          (scripts/build_llama_server.sh; one slot per client, continuous batching) when built, else
          llama-cpp-python's server (one request at a time).
Every figure is the median over --repeats runs. Results go to stdout (a table) and bench-results/*.json.

Server processes run at normal priority, one configuration at a time; the client is one asyncio
thread. The machine may be shared: the load average at start is recorded with the results.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from . import stats
from .client import run_load
from .report import _fmt_ms, _rss_round, format_table
from .stacks import DEFAULT_LLAMA_SERVER, RESULTS, ROOT, LlamaCppServer, TgqStack, proc_status_kb



# ---- process helpers -----------------------------------------------------------------------------

def _say(msg: str) -> None:
    print(f"[suite {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _load(args: argparse.Namespace, url: str, api: str, clients: int, requests: int, deadline: float | None,
          new_tokens: int | None = None) -> dict[str, Any]:
    return run_load(url, api=api, clients=clients, prompt_tokens=args.prompt_tokens,
                    new_tokens=new_tokens or args.new_tokens, requests=requests, hard_deadline_s=deadline,
                    progress=args.progress)


def _settle(args: argparse.Namespace, url: str, api: str) -> None:
    """A one-token barrier request: both servers serve in arrival order, so once it returns, whatever the
    previous run left behind (aborted streams, cancelled jobs) is out of the way."""
    _load(args, url, api, 1, 1, 600, new_tokens=1)


def _warm_up(args: argparse.Namespace, url: str, api: str) -> None:
    _load(args, url, api, 1, 1, 120, new_tokens=8)
    top = max(args.concurrency)
    _load(args, url, api, top, top, 120, new_tokens=4)


def _measure_stack(args: argparse.Namespace, stack: TgqStack, concurrencies: list[int], rounds: int,
                   deadline: float | None) -> dict[str, Any]:
    """Repeated load runs at each concurrency; per run also Redis traffic and the workers' round trips."""
    out: dict[str, Any] = {}
    for c in concurrencies:
        out[str(c)] = _median_of([_measure_run(args, stack, c, rounds, deadline, rep) for rep in range(args.repeats)])
    return out


def _measure_paired(args: argparse.Namespace, tgq: TgqStack, naive: TgqStack) -> tuple[dict, dict, dict]:
    """tgq and the one-at-a-time baseline, alternating run by run at each concurrency.

    The machine's speed drifts (shared hosts: a third within minutes, here); paired runs meet the same
    drift, so each pair's ratio is fairer than a ratio of medians taken minutes apart. Returns the two
    stacks' results and, per concurrency, every pair's ratio and their median."""
    out_t: dict[str, Any] = {}
    out_n: dict[str, Any] = {}
    ratios: dict[str, Any] = {}
    for c in args.concurrency:
        runs_t, runs_n = [], []
        for rep in range(args.repeats):
            runs_t.append(_measure_run(args, tgq, c, args.rounds, args.deadline, rep))
            runs_n.append(_measure_run(args, naive, c, 0, args.window, rep))
        out_t[str(c)], out_n[str(c)] = _median_of(runs_t), _median_of(runs_n)
        pairs = [t["tokens_per_s"] / n["tokens_per_s"] for t, n in zip(runs_t, runs_n) if n["tokens_per_s"]]
        ratios[str(c)] = {"pairs": [round(r, 2) for r in pairs], "median": stats.median(pairs)}
        _say(f"C={c}: tgq / one-at-a-time per pair {ratios[str(c)]['pairs']}")
    return out_t, out_n, ratios


def _measure_run(args: argparse.Namespace, stack: TgqStack, c: int, rounds: int, deadline: float | None,
                 rep: int) -> dict[str, Any]:
    """One load run of `stack` at C=c, with its Redis traffic and the workers' steps and round trips."""
    before_r, before_w, before_m = stack.redis_counters(), stack.round_trips(), stack.worker_samples()
    res = _load(args, stack.url, "tgi", c, max(1, c * rounds) if rounds else max(2, c), deadline)
    after_r, after_w, after_m = stack.redis_counters(), stack.round_trips(), stack.worker_samples()
    by_cmd = stats.counter_delta(before_r["commands"], after_r["commands"])
    if before_m is not None and after_m is not None:
        res["workers"] = _worker_deltas(before_m, after_m)
    srv = res.get("server") or {}
    steps = (srv.get("decode_steps") or 0) + (srv.get("prefill_steps") or 0)
    if not steps and res.get("workers"):  # the API did not export the batch families
        steps = (res["workers"]["decode_steps"] or 0) + (res["workers"]["prefill_steps"] or 0)
    segments = None if before_w is None or after_w is None else after_w - before_w
    # Round trips as the workers count them (a command or a whole pipeline is one send); TCP
    # segments overcount: redis-py writes a large pipeline in several chunks.
    trips = (res.get("workers") or {}).get("redis_round_trips")
    res["redis"] = {
        "commands": sum(by_cmd.values()), "by_command": by_cmd, "reads": after_r["reads"] - before_r["reads"],
        "worker_round_trips": trips, "worker_tcp_segments": segments, "steps": steps,
        "worker_round_trips_per_step": (trips / steps) if trips is not None and steps else None,
        "commands_per_step": (sum(by_cmd.values()) / steps) if steps else None,
    }
    dead = [w.name for w in stack.workers if not w.alive()]
    if dead:
        res["dead_workers"] = dead
        note = f"{stack.label} c={c}: worker(s) {', '.join(dead)} exited during the run: " + \
            " | ".join(w.tail(300).strip().splitlines()[-1] for w in stack.workers if not w.alive())
        if note not in stack.problems:
            stack.problems.append(note)
    if res["cut_at_deadline"]:
        res["cancelled_leftovers"] = stack.cancel_leftovers()
        _settle(args, stack.url, "tgi")
    _say(f"{stack.label} c={c} run {rep + 1}/{args.repeats}: {res['tokens_per_s']:.1f} tok/s, "
         f"TTFT p50 {_fmt_ms(res['ttft_s']['p50'])}, ITL p50 {_fmt_ms(res['itl_s']['p50'])}, "
         f"errors {res['errors']}")
    return res


def _worker_deltas(before: list[dict], after: list[dict]) -> dict[str, Any]:
    """Steps and batch sizes from the workers' own /metrics, summed over workers."""
    def total(name: str, **labels: str) -> float | None:
        vals = [(stats.metric_value(a, name, **labels) or 0.0) - (stats.metric_value(b, name, **labels) or 0.0)
                for b, a in zip(before, after)]
        return sum(vals) if any(stats.metric_value(a, name, **labels) is not None for a in after) else None

    nxt = [stats.histogram_delta(b, a, "tgi_batch_next_size") for b, a in zip(before, after)]
    count = sum(n["count"] for n in nxt)
    dec = [stats.histogram_delta(b, a, "tgi_batch_inference_duration", method="decode") for b, a in zip(before, after)]
    dcount = sum(d["count"] for d in dec)
    return {"decode_steps": total("tgi_batch_inference_count", method="decode"),
            "prefill_steps": total("tgi_batch_inference_count", method="prefill"),
            "batch_next_size_mean": (sum(n["sum"] for n in nxt) / count) if count else None,
            "batch_next_size_max": max((n["max_le"] or 0) for n in nxt) if nxt else None,
            "decode_step_mean_s": (sum(d["sum"] for d in dec) / dcount) if dcount else None,
            "redis_round_trips": total("tgq_worker_redis_round_trips_total")}


def _measure_llama(args: argparse.Namespace, server: LlamaCppServer, concurrencies: list[int]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for c in concurrencies:
        runs = []
        for rep in range(args.repeats):
            if server.batching:  # a batching server runs the same requests as tgq, to the end
                res = _load(args, server.url, "openai", c, max(1, c * args.rounds), args.deadline)
            else:
                res = _load(args, server.url, "openai", c, max(2, c), args.window)
            if res["cut_at_deadline"]:
                _settle(args, server.url, "openai")
            runs.append(res)
            _say(f"{server.label} c={c} run {rep + 1}/{args.repeats}: {res['tokens_per_s']:.1f} tok/s, "
                 f"errors {res['errors']}")
        out[str(c)] = _median_of(runs)
    return out


def _median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The headline figures as medians over runs, plus every run's full summary."""
    def med(get: Any) -> float | None:
        return stats.median_over(runs, get)

    return {
        "tokens_per_s": med(lambda r: r["tokens_per_s"]),
        "ttft_p50_s": med(lambda r: r["ttft_s"]["p50"]), "ttft_p95_s": med(lambda r: r["ttft_s"]["p95"]),
        "itl_p50_s": med(lambda r: r["itl_s"]["p50"]), "itl_p95_s": med(lambda r: r["itl_s"]["p95"]),
        "latency_p50_s": med(lambda r: r["latency_s"]["p50"]),
        "errors": sum(r["errors"] for r in runs),
        "batch_max": med(lambda r: r["server"]["batch_current_size"]["max"]),
        "batch_mean_busy": med(lambda r: r["server"]["batch_current_size"]["mean_nonzero"]),
        "batch_next_mean": med(lambda r: r["server"]["batch_next_size"]["mean"]
                               if r["server"]["batch_next_size"]["count"] else r["workers"]["batch_next_size_mean"]),
        "decode_step_mean_s": med(lambda r: r["server"]["decode_step_mean_s"]
                                  if r["server"]["decode_step_mean_s"] is not None else r["workers"]["decode_step_mean_s"]),
        "round_trips_per_step": med(lambda r: r["redis"]["worker_round_trips_per_step"]),
        # The share of wall time the worker spent in prefill/decode steps (forward, sampling, events);
        # the rest is the loop's Redis I/O and bookkeeping, and idle waits for requests.
        "worker_busy_share": med(lambda r: (r["server"]["decode_busy_s"] + r["server"]["prefill_busy_s"])
                                 / r["wall_s"]),
        "commands_per_step": med(lambda r: r["redis"]["commands_per_step"]),
        "runs": runs,
    }


def _raw_child(args: argparse.Namespace) -> int:
    """Runs in a child process: load the model, time the bare loop and the Redis-less engine."""
    from common import model_files
    from worker.model import load_model

    source = model_files.resolve(args.model)
    loaded = load_model(source, args.cache_dir, args.device, args.dtype, args.threads)
    out: dict[str, Any] = {"raw": {}, "engine": {}, "errors": []}
    try:
        from worker.rawloop import engine_decode_tokps, raw_decode_tokps
    except ImportError as exc:
        print(json.dumps({"raw": {}, "engine": {}, "errors": [f"worker.rawloop unavailable: {exc}"]}))
        return 0
    raw_decode_tokps(loaded, 1, 4, args.prompt_tokens)  # warm-up
    for b in args.concurrency:
        out["raw"][str(b)] = [raw_decode_tokps(loaded, b, args.new_tokens, args.prompt_tokens)
                              for _ in range(args.repeats)]
        try:
            out["engine"][str(b)] = [engine_decode_tokps(loaded, b, args.new_tokens, args.prompt_tokens)
                                     for _ in range(args.repeats)]
        except Exception as exc:  # the engine yardstick is extra; keep the raw figures
            out["errors"].append(f"engine_decode_tokps B={b}: {type(exc).__name__}: {exc}")
        print(f"[raw] B={b}: raw {out['raw'][str(b)]} engine {out['engine'].get(str(b))}", file=sys.stderr, flush=True)
    out["peak_rss_mib"] = (proc_status_kb(os.getpid()) or 0) / 1024
    print(json.dumps(out))
    return 0


def _run_raw(args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "bench.suite", "--raw-child", "--model", args.model, "--dtype", args.dtype,
           "--device", args.device, "--threads", str(args.threads), "--concurrency", ",".join(map(str, args.concurrency)),
           "--new-tokens", str(args.new_tokens), "--prompt-tokens", str(args.prompt_tokens),
           "--repeats", str(args.repeats)]
    if args.cache_dir:
        cmd += ["--cache-dir", args.cache_dir]
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=sys.stderr, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"raw": {}, "engine": {}, "errors": [f"raw child exited {proc.returncode}"]}
    data = json.loads(lines[-1])
    data["raw_median"] = {b: stats.median(v) for b, v in data["raw"].items()}
    data["engine_median"] = {b: stats.median(v) for b, v in data["engine"].items()}
    return data


# ---- report --------------------------------------------------------------------------------------

def _run_stack(res: dict[str, Any], stack: TgqStack, key: str, rss_label: str,
               measure: Callable[[TgqStack], dict[str, Any]]) -> None:
    """Start `stack`, store `measure(stack)` as res[key] and its workers' peak RSS; always stop it."""
    try:
        stack.start()
        res[key] = measure(stack)
        res["peak_rss_mib"][rss_label] = _rss_round(stack.peak_rss_mib())
    except RuntimeError as exc:
        res["errors"].append(f"{key} stack: {exc}")
    finally:
        stack.stop(res["errors"])


def _run_pair(res: dict[str, Any], args: argparse.Namespace, warm_tgq: Callable[[TgqStack], Any],
              warm_naive: Callable[[TgqStack], Any]) -> None:
    """Both stacks up at once (the idle one waits on Redis, using no CPU); runs alternate between them."""
    tgq = TgqStack(args, "tgq", 1, args.threads)
    naive = TgqStack(args, "naive", 1, args.threads, naive=True)
    try:
        tgq.start()
        naive.start()
        warm_tgq(tgq)
        warm_naive(naive)
        res["tgq"], res["naive"], res["paired_naive_ratio"] = _measure_paired(args, tgq, naive)
        res["peak_rss_mib"]["tgq worker"] = _rss_round(tgq.peak_rss_mib())
        res["peak_rss_mib"]["naive worker"] = _rss_round(naive.peak_rss_mib())
    except RuntimeError as exc:
        res["errors"].append(f"tgq/naive stacks: {exc}")
    finally:
        naive.stop(res["errors"])
        tgq.stop(res["errors"])


# The memory check: rows as long as the default limits allow (max_input_length 1000, max_total_tokens
# 1512); the generated prompt of ~980 tokens is 979 tokens long, so 979 + 533 = 1512.
MEMORY_PROMPT_TOKENS = 980
MEMORY_NEW_TOKENS = 533


def _device_name(device: str) -> str:
    """What ran the model, as the report names it: the GPU's name on CUDA."""
    if device != "cuda":
        return device
    import torch

    return f"cuda ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "cuda (not available)"


def run_suite(args: argparse.Namespace) -> dict[str, Any]:
    res: dict[str, Any] = {"config": {
        "model": args.model, "dtype": args.dtype, "device": _device_name(args.device), "threads": args.threads, "concurrency": args.concurrency,
        "new_tokens": args.new_tokens, "prompt_tokens": args.prompt_tokens, "repeats": args.repeats,
        "quick": args.quick, "rounds": args.rounds, "naive_window_s": args.window, "api_workers": args.api_workers,
        "loadavg_start": [round(x, 2) for x in os.getloadavg()], "cpus": os.cpu_count(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S")}, "errors": [], "peak_rss_mib": {}}
    skip = set(args.skip)
    if "raw" not in skip:
        _say("raw loop and Redis-less engine (child process)")
        res["raw"] = _run_raw(args)
        res["errors"] += res["raw"].get("errors", [])
        if res["raw"].get("peak_rss_mib"):
            res["peak_rss_mib"]["raw loop process"] = round(res["raw"]["peak_rss_mib"], 1)
    top = [max(args.concurrency)]
    def warm_tgq(stack: TgqStack) -> None:
        _warm_up(args, stack.url, "tgi")

    def warm_naive(stack: TgqStack) -> None:
        _load(args, stack.url, "tgi", 1, 1, 120, new_tokens=8)

    def measure_tgq(stack: TgqStack) -> dict[str, Any]:
        warm_tgq(stack)
        return _measure_stack(args, stack, args.concurrency, args.rounds, args.deadline)

    def measure_naive(stack: TgqStack) -> dict[str, Any]:
        warm_naive(stack)
        return _measure_stack(args, stack, args.concurrency, 0, args.window)

    paired = "tgq" not in skip and "naive" not in skip
    if paired:
        _say(f"tgq and the naive baseline, 1 worker each, {args.threads} thread(s), runs alternating "
             f"(naive: {args.window:.0f} s window per run)")
        _run_pair(res, args, warm_tgq, warm_naive)
    elif "tgq" not in skip:
        _say(f"tgq: 1 worker, {args.threads} thread(s)")
        _run_stack(res, TgqStack(args, "tgq", 1, args.threads), "tgq", "tgq worker", measure_tgq)
    if "memory" not in skip:
        new = 32 if args.quick else MEMORY_NEW_TOKENS
        _say(f"memory: {top[0]} clients x ~{MEMORY_PROMPT_TOKENS}-token prompts + {new} new tokens, one run")

        def measure_memory(stack: TgqStack) -> dict[str, Any]:
            out = run_load(stack.url, api="tgi", clients=top[0], prompt_tokens=MEMORY_PROMPT_TOKENS, new_tokens=new,
                           requests=top[0], hard_deadline_s=max(args.deadline, 900.0), progress=args.progress)
            picked = {k: out.get(k) for k in ("completed", "errors", "error_messages", "tokens_per_s", "ttft_s",
                                              "itl_s", "new_tokens", "prompt_tokens")}
            picked["batch_max"] = ((out.get("server") or {}).get("batch_current_size") or {}).get("max")
            return picked

        _run_stack(res, TgqStack(args, "memory", 1, args.threads), "memory", "tgq worker, long rows", measure_memory)
    if "naive" not in skip and not paired:
        _say(f"naive baseline: 1 worker, {args.threads} thread(s), {args.window:.0f} s window per run")
        _run_stack(res, TgqStack(args, "naive", 1, args.threads, naive=True), "naive", "naive worker",
                   measure_naive)
    if "scale" not in skip:
        res["scaleout"] = {}
        for n in (1, 2):
            if n == 1 and args.threads == 1 and res.get("tgq"):
                d = dict(res["tgq"][str(top[0])])
                d["peak_rss_mib"] = res["peak_rss_mib"].get("tgq worker")
                res["scaleout"][f"1 worker x 1 thread, C={top[0]}"] = {k: v for k, v in d.items() if k != "runs"}
                continue
            stack = TgqStack(args, f"scale{n}", n, 1)
            try:
                _say(f"scale-out: {n} worker(s) x 1 thread at C={top[0]}")
                stack.start()
                _warm_up(args, stack.url, "tgi")
                d = _measure_stack(args, stack, top, args.rounds, args.deadline)[str(top[0])]
                d["peak_rss_mib"] = _rss_round(stack.peak_rss_mib())
                res["scaleout"][f"{n} worker(s) x 1 thread, C={top[0]}"] = d
            except RuntimeError as exc:
                res["errors"].append(f"scale-out {n}: {exc}")
            finally:
                stack.stop(res["errors"])
    if args.llamacpp:
        _run_llamacpp(args, res)
    return res


def _run_llamacpp(args: argparse.Namespace, res: dict[str, Any]) -> None:
    binary: Path | None = Path(args.llama_server) if args.llama_server else DEFAULT_LLAMA_SERVER
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        if args.llama_server:
            res["errors"].append(f"--llama-server: {binary} is not an executable")
            return
        binary = None
        try:
            import llama_cpp.server  # noqa: F401
        except ImportError as exc:
            res["errors"].append("--llamacpp: neither llama.cpp's llama-server (scripts/build_llama_server.sh) "
                                 f"nor llama-cpp-python[server] is installed ({exc})")
            return
    res["llamacpp_server"] = "llama-server (C++), continuous batching" if binary else \
        "llama-cpp-python server (one request at a time)"
    from common import model_files

    source = model_files.resolve(args.model)
    if not source.is_gguf:
        res["errors"].append("--llamacpp needs a GGUF model (smollm2 or a .gguf path)")
        return
    ggufs = {"llamacpp_q4_1": source.path}
    try:
        from .gguf_bf16 import bf16_gguf_for

        _say("writing the bf16 GGUF (once)")
        ggufs["llamacpp_bf16"] = bf16_gguf_for(source.path, model_files.cache_root(args.cache_dir) / "gguf-bf16")
    except Exception as exc:  # the Q4_1 comparison still runs
        res["errors"].append(f"bf16 GGUF: {type(exc).__name__}: {exc}")
    for key, path in ggufs.items():
        server = LlamaCppServer(args, key, path, binary, slots=max(args.concurrency))
        try:
            _say(f"{key}: llama.cpp server on {path.name}, {args.threads} thread(s)")
            server.start()
            _warm_up(args, server.url, "openai")
            res[key] = _measure_llama(args, server, args.concurrency)
            res["peak_rss_mib"][key] = None if (v := server.peak_rss_mib()) is None else round(v, 1)
        except RuntimeError as exc:
            res["errors"].append(f"{key}: {exc}")
        finally:
            server.stop()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.suite", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke check: C=1,8, 32 new tokens, 1 repeat, short windows")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                   help="where the workers and the raw loop run the model (llama.cpp stays on the CPU)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per worker (and llama.cpp threads); 1 leaves a core to the API, Redis "
                        "and the client on a 2-core machine")
    p.add_argument("--concurrency", default=None, help="comma-separated client counts (default 1,8,16,32)")
    p.add_argument("--new-tokens", type=int, default=None, help="default 128 (32 with --quick)")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=None, help="runs per figure, median reported (default 3)")
    p.add_argument("--rounds", type=int, default=None, help="requests per client per tgq run (default 2)")
    p.add_argument("--window", type=float, default=None,
                   help="seconds per naive/llama.cpp run before in-flight streams are cut (default 30)")
    p.add_argument("--deadline", type=float, default=300.0, help="safety cut of a tgq run, seconds")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--api-workers", type=int, default=1, help="gunicorn workers of the API")
    p.add_argument("--cache-dir", default="")
    p.add_argument("--llamacpp", action="store_true",
                   help="also llama.cpp's server on the Q4_1 and a bf16 GGUF: the C++ llama-server when built "
                        "(scripts/build_llama_server.sh), else llama-cpp-python's")
    p.add_argument("--llama-server", default="", help=f"path of llama-server (default {DEFAULT_LLAMA_SERVER})")
    p.add_argument("--skip", default="", help="comma-separated parts to leave out: raw,tgq,memory,naive,scale")
    p.add_argument("--progress", action="store_true", help="tqdm bars for every load run")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--raw-child", action="store_true", help=argparse.SUPPRESS)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = _parser().parse_args(argv)
    q = args.quick
    args.concurrency = [int(x) for x in (args.concurrency or ("1,8" if q else "1,8,16,32")).split(",") if x]
    if not args.concurrency or min(args.concurrency) < 1:
        raise SystemExit("--concurrency needs positive integers")
    args.new_tokens = args.new_tokens or (32 if q else 128)
    args.repeats = args.repeats or (1 if q else 3)
    args.rounds = args.rounds or (1 if q else 2)
    args.window = args.window or (10.0 if q else 30.0)
    args.skip = [s for s in args.skip.split(",") if s]
    args.max_batch_size = max(args.max_batch_size, max(args.concurrency))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.raw_child:
        return _raw_child(args)
    args.out.mkdir(parents=True, exist_ok=True)
    res = run_suite(args)
    table = format_table(res)
    print(table)
    path = args.out / f"suite-{time.strftime('%Y%m%d-%H%M%S')}.json"
    res["table"] = table
    path.write_text(json.dumps(res, indent=1))
    print(f"\nresults: {path}")
    return 0 if not res["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())

"""`python -m bench.paged`: the paged KV cache against the slot cache, and prefix caching's time to first token.

Both run `worker.engine.Engine` in-process on one loaded model (SmolLM2-135M-Instruct by default,
loaded as `tgq worker` loads it), with the worker's defaults but `--kv-cache`:

- **throughput, no shared prefix**: `--requests` greedy requests of random distinct prompt ids
  (`--min-prompt`..`--max-prompt` tokens) and `--min-tokens`..`--max-tokens` new tokens, `--rows`
  closed-loop clients (B=32): a new request is handed over when one ends. Slot cache, then paged
  cache with its prefix cache on (nothing to hit, so the figure includes the hashing), alternating
  `--pairs` times; the figure is the median of the per-pair ratios paged / slot of generated tokens
  per second of wall time.
- **TTFT with a shared system prompt**: `--rows` requests arrive together, each a `--system-tokens`
  system prompt shared by all, then a distinct 16-token question, 8 new tokens. The paged cache with
  the prefix cache on, after one warm-up request with the system prompt alone, against the prefix
  cache off; alternating `--pairs` times. Each request's TTFT is the time from the wave's hand-over
  to its first token event; the figure is the median over pairs of p50(off) / p50(on).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

from . import stats
from .cost_probe import cpu_model
from .overhead import ClosedLoop
from .stacks import engine_bench_main, engine_bench_parser


def _say(msg: str) -> None:
    print(f"[paged {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class TimedLoop(ClosedLoop):
    """ClosedLoop that notes when each request's first token event arrives."""

    def __init__(self, jobs: list[Any], clients: int) -> None:
        super().__init__(jobs, clients)
        self.t0 = time.perf_counter()
        self.first: dict[str, float] = {}

    def step_done(self, events: list[Any], running: list[Any]) -> set[str]:
        now = time.perf_counter()
        for e in events:
            self.first.setdefault(e.request_id, now - self.t0)
        return set()


def _job(rid: str, ids: list[int], new_tokens: int) -> Any:
    from common.schemas import GenerationJob, SamplingParams, StoppingParams

    return GenerationJob(request_id=rid, input_ids=tuple(ids), sampling=SamplingParams(),
                         stopping=StoppingParams(max_new_tokens=new_tokens), reply_to="", want_tokens=False,
                         enqueued_at=time.time())


def _engine(loaded: Any, settings: Any, loop: ClosedLoop) -> Any:
    from common.settings import LimitSettings
    from worker.engine import Engine

    return Engine(loaded, settings, LimitSettings(), loop, loop)


def throughput(loaded: Any, settings: Any, args: argparse.Namespace, tag: str) -> dict[str, Any]:
    rng = random.Random(args.seed)
    jobs = [_job(f"{tag}{i}", [rng.randrange(100, 40000) for _ in range(rng.randint(args.min_prompt, args.max_prompt))],
                 rng.randint(args.min_tokens, args.max_tokens)) for i in range(args.requests)]
    loop = TimedLoop(jobs, args.rows)
    engine = _engine(loaded, settings, loop)
    t0 = time.perf_counter()
    while not loop.done:
        engine.step()
    wall = time.perf_counter() - t0
    tokens = sum(f.generated_tokens for f in loop.finals)
    return {"wall_s": wall, "generated_tokens": tokens, "tokens_per_s": tokens / wall, "errors": loop.errors}


def ttft(loaded: Any, settings: Any, args: argparse.Namespace, system: list[int], tag: str) -> dict[str, Any]:
    rng = random.Random(args.seed)
    warm = TimedLoop([_job(f"{tag}w", system, 1)], 1)
    engine = _engine(loaded, settings, warm)
    while not warm.done:
        engine.step()
    wave = TimedLoop([_job(f"{tag}{i}", system + [rng.randrange(100, 40000) for _ in range(16)], 8)
                      for i in range(args.rows)], args.rows)
    engine.source = engine.sink = wave
    while not wave.done:
        engine.step()
    times = sorted(wave.first.values())
    blocks = engine.blocks
    return {"ttft_p50_s": stats.percentile(times, 50), "ttft_p90_s": stats.percentile(times, 90),
            "completed": len(wave.finals), "errors": wave.errors,
            "hit_tokens": blocks.hit_tokens if blocks else 0, "miss_tokens": blocks.miss_tokens if blocks else 0}


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from common import model_files
    from common.settings import WorkerSettings
    from worker.model import load_model

    out: dict[str, Any] = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                           "throughput": [], "ttft": []}
    out["config"].update(cpu_model=cpu_model(), cpus=os.cpu_count(), torch=torch.__version__,
                         started=time.strftime("%Y-%m-%dT%H:%M:%S"))
    _say(f"CPU {out['config']['cpu_model']} x {os.cpu_count()}; loading {args.model}")
    slot = WorkerSettings(max_batch_size=args.rows, device=args.device, dtype=args.dtype, threads=args.threads,
                          cpu_kernels=not args.no_cpu_kernels, kv_cache="slot")
    paged = dataclasses.replace(slot, kv_cache="paged")
    no_prefix = dataclasses.replace(paged, prefix_cache=False)
    loaded = load_model(model_files.resolve(args.model), args.cache_dir, args.device, args.dtype, args.threads,
                        rows_hint=args.rows, cpu_kernels=slot.cpu_kernels)
    fast = loaded.fast
    if args.device == "cuda":
        out["config"].update(gpu=torch.cuda.get_device_name(), decode_graphs=loaded.graphs is not None)
    if fast is not None and args.paged_attention != "auto":
        # As on a CPU without AVX-512 (portable), or without a compiler (torch); the other kernels stay as loaded.
        fast.kernel_attention = False
        if args.paged_attention == "torch":
            fast.paged_kernel = None
    out["config"]["compiled_attention_kernel"] = bool(fast is not None and fast.kernel_attention)
    out["config"]["paged_decode_attention"] = (
        "avx512" if fast is not None and fast.kernel_attention
        else "portable" if fast is not None and fast.paged_kernel is not None else "torch")
    if not args.skip_throughput:
        warm = argparse.Namespace(**{**vars(args), "requests": args.rows})
        throughput(loaded, slot, warm, "warm-s")
        throughput(loaded, paged, warm, "warm-p")
        for k in range(args.pairs):
            a, b = throughput(loaded, slot, args, f"s{k}-"), throughput(loaded, paged, args, f"p{k}-")
            out["throughput"].append({"slot": a, "paged": b, "ratio": b["tokens_per_s"] / a["tokens_per_s"]})
            _say(f"throughput pair {k + 1}/{args.pairs}: slot {a['tokens_per_s']:.1f} tok/s, paged "
                 f"{b['tokens_per_s']:.1f} tok/s ({a['generated_tokens']} / {b['generated_tokens']} tokens)")
    rng = random.Random(args.seed + 1)
    system = [rng.randrange(100, 40000) for _ in range(args.system_tokens)]
    for k in range(args.pairs):
        a = ttft(loaded, no_prefix, args, system, f"off{k}-")
        b = ttft(loaded, paged, args, system, f"on{k}-")
        out["ttft"].append({"off": a, "on": b, "ratio": a["ttft_p50_s"] / b["ttft_p50_s"]})
        _say(f"ttft pair {k + 1}/{args.pairs}: p50 off {a['ttft_p50_s'] * 1e3:.0f} ms, on {b['ttft_p50_s'] * 1e3:.0f} ms "
             f"(hits {b['hit_tokens']}, misses {b['miss_tokens']})")
    out["summary"] = {
        "throughput_median_ratio": stats.median(p["ratio"] for p in out["throughput"]) if out["throughput"] else None,
        "throughput_ratios": [p["ratio"] for p in out["throughput"]],
        "ttft_median_ratio": stats.median(p["ratio"] for p in out["ttft"]),
        "ttft_ratios": [p["ratio"] for p in out["ttft"]]}
    return out


def format_report(res: dict[str, Any]) -> str:
    c, s = res["config"], res["summary"]
    kernels = (f"CUDA {c['gpu']}, decode graphs {'on' if c['decode_graphs'] else 'off'}" if c.get("device") == "cuda"
               else f"paged decode attention: {c.get('paged_decode_attention', '?')}")
    lines = [f"paged KV cache: {c['model']} {c['dtype']}, {c['threads']} threads, B={c['rows']}, {kernels}; "
             f"CPU {c['cpu_model']} x {c['cpus']}"]
    if res["throughput"]:
        lines += [f"no shared prefix ({c['requests']} requests, prompts {c['min_prompt']}-{c['max_prompt']}, "
                  f"{c['min_tokens']}-{c['max_tokens']} new tokens), {len(res['throughput'])} alternating pairs:",
                  "| pair | slot tok/s | paged tok/s | paged / slot |", "|---|---|---|---|"]
        for k, p in enumerate(res["throughput"]):
            lines.append(f"| {k + 1} | {p['slot']['tokens_per_s']:.1f} | {p['paged']['tokens_per_s']:.1f} | "
                         f"{p['ratio']:.3f} |")
        lines.append(f"median paged / slot: **{s['throughput_median_ratio']:.3f}**")
    lines += [f"TTFT, {c['rows']} requests sharing a {c['system_tokens']}-token system prompt:",
              "| pair | p50 off (ms) | p50 on (ms) | off / on |", "|---|---|---|---|"]
    for k, p in enumerate(res["ttft"]):
        lines.append(f"| {k + 1} | {p['off']['ttft_p50_s'] * 1e3:.0f} | {p['on']['ttft_p50_s'] * 1e3:.0f} | "
                     f"{p['ratio']:.2f} |")
    lines.append(f"median off / on: **{s['ttft_median_ratio']:.2f}**")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = engine_bench_parser("bench.paged", __doc__, pairs=5)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--min-prompt", type=int, default=32)
    p.add_argument("--max-prompt", type=int, default=160)
    p.add_argument("--min-tokens", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--system-tokens", type=int, default=400)
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--no-cpu-kernels", action="store_true", help="torch's ops only (as on a CPU without AVX-512)")
    p.add_argument("--paged-attention", default="auto", choices=("auto", "portable", "torch"),
                   help="the paged decode attention: as loaded, the portable compiled kernel, or torch's ops with a "
                        "gather (for all but auto, the AVX-512 decode attention is off for both caches)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    return engine_bench_main(parse_args(argv), "paged", run, format_report)


if __name__ == "__main__":
    raise SystemExit(main())

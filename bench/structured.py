"""`python -m bench.structured`: what an output constraint costs the engine at B=32.

SmolLM2-135M-Instruct (the default model) is loaded the way `tgq worker` loads it, and
`worker.engine.Engine` runs in-process, with a closed loop of `--rows` callers over `2 x --rows`
requests (random 32-token prompts, `--new-tokens` new tokens each, greedy). Two sides alternate in
pairs, unconstrained first:
- **plain**: no constraint;
- **json**: every request under the same JSON schema, an array of records long enough that no row
  completes it within `--new-tokens`, so both sides run their rows to the same length.
The figure is the median of the per-pair ratios json / plain of generated tokens per second of wall
time (prefill included). Also printed: the per-step time spent computing the masks (median and p99,
from the engine's own measurement), and the time to compile a schema the worker has not seen (a fresh
matcher per schema, median of several distinct schemas) and to build the tokenizer's index once.
"""
from __future__ import annotations

import argparse
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

RECORD = {"type": "object", "properties": {
    "id": {"type": "integer", "minimum": 0, "maximum": 100000},
    "name": {"type": "string", "maxLength": 24},
    "tags": {"type": "array", "items": {"enum": ["red", "green", "blue", "alpha", "beta"]}, "maxItems": 4},
    "score": {"type": "number", "minimum": 0, "maximum": 1}},
    "required": ["id", "name", "tags", "score"], "additionalProperties": False}
SCHEMA = {"type": "array", "items": RECORD, "minItems": 200}


def _say(msg: str) -> None:
    print(f"[structured {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _jobs(args: argparse.Namespace, tag: str, grammar: str | None) -> list[Any]:
    from common.schemas import GenerationJob, SamplingParams, StoppingParams

    rng = random.Random(args.seed)
    return [GenerationJob(request_id=f"{tag}-{i}", input_ids=tuple(rng.randrange(100, 40000) for _ in range(32)),
                          sampling=SamplingParams(), stopping=StoppingParams(max_new_tokens=args.new_tokens),
                          reply_to="", enqueued_at=time.time(), grammar=grammar)
            for i in range(2 * args.rows)]


def _run(loaded: Any, args: argparse.Namespace, tag: str, grammar: str | None) -> dict[str, Any]:
    from common.settings import LimitSettings, WorkerSettings
    from worker.engine import Engine

    settings = WorkerSettings(max_batch_size=args.rows, device=args.device, dtype=args.dtype, threads=args.threads)
    loop = ClosedLoop(_jobs(args, tag, grammar), args.rows)
    engine = Engine(loaded, settings, LimitSettings(), loop, loop)
    masks: list[float] = []
    engine.chooser.on_mask = masks.append
    t0 = time.perf_counter()
    while not loop.done:
        engine.step()
    wall = time.perf_counter() - t0
    tokens = sum(f.generated_tokens for f in loop.finals)
    return {"wall_s": wall, "generated_tokens": tokens, "tokens_per_s": tokens / wall, "errors": loop.errors,
            "mask_steps": len(masks), "mask_ms_p50": _ms(stats.percentile(masks, 50)),
            "mask_ms_p99": _ms(stats.percentile(masks, 99)), "mask_s_total": sum(masks)}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def compile_times(loaded: Any, count: int) -> dict[str, Any]:
    """A fresh worker-side compiler: the tokenizer's index once, then `count` schemas never seen before."""
    from common.grammars import Constraint
    from worker.constraints import Grammars

    grammars = Grammars(loaded.tokenizer, loaded.vocab_size, loaded.eos_token_id)
    t0 = time.perf_counter()
    grammars.matcher(Constraint("json", {"type": "object"}).grammar())
    first = time.perf_counter() - t0
    texts = []
    for i in range(count):
        schema = {**SCHEMA, "items": {**RECORD, "properties": {**RECORD["properties"], f"field_{i}": {"type": "string"}}}}
        texts.append(Constraint("json", schema).grammar())
    seconds = []
    for text in texts:
        t0 = time.perf_counter()
        grammars.matcher(text)
        seconds.append(time.perf_counter() - t0)
    return {"tokenizer_and_first_ms": first * 1000, "new_schema_ms_median": _ms(stats.median(seconds)),
            "new_schema_ms": [s * 1000 for s in seconds]}


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from common import model_files
    from common.grammars import Constraint
    from worker.model import configure_threads, load_model

    configure_threads(args.threads)
    out: dict[str, Any] = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                           "pairs": []}
    out["config"].update(cpu_model=cpu_model(), cpus=os.cpu_count(), torch=torch.__version__,
                         started=time.strftime("%Y-%m-%dT%H:%M:%S"))
    _say(f"CPU {out['config']['cpu_model']} x {os.cpu_count()}; loading {args.model}")
    loaded = load_model(model_files.resolve(args.model), args.cache_dir, args.device, args.dtype, args.threads,
                        rows_hint=args.rows)
    grammar = Constraint("json", SCHEMA).grammar()
    out["compile"] = compile_times(loaded, args.schemas)
    _run(loaded, args, "warm-plain", None)
    _run(loaded, args, "warm-json", grammar)
    for k in range(args.pairs):
        plain, constrained = _run(loaded, args, f"p{k}", None), _run(loaded, args, f"j{k}", grammar)
        ratio = constrained["tokens_per_s"] / plain["tokens_per_s"]
        out["pairs"].append({"plain": plain, "json": constrained, "ratio": ratio})
        _say(f"pair {k + 1}/{args.pairs}: plain {plain['tokens_per_s']:.0f} tok/s, json "
             f"{constrained['tokens_per_s']:.0f} tok/s ({plain['generated_tokens']} / "
             f"{constrained['generated_tokens']} tokens), ratio {ratio:.3f}; mask p50 "
             f"{constrained['mask_ms_p50']:.2f} ms, p99 {constrained['mask_ms_p99']:.2f} ms")
    ratios = [p["ratio"] for p in out["pairs"]]
    out["summary"] = {
        "median_ratio": stats.median(ratios), "ratios": ratios,
        "plain_tokps_median": stats.median(p["plain"]["tokens_per_s"] for p in out["pairs"]),
        "json_tokps_median": stats.median(p["json"]["tokens_per_s"] for p in out["pairs"]),
        "mask_ms_p50_median": stats.median(p["json"]["mask_ms_p50"] for p in out["pairs"]),
        "mask_ms_p99_median": stats.median(p["json"]["mask_ms_p99"] for p in out["pairs"])}
    return out


def format_report(res: dict[str, Any]) -> str:
    c, s, comp = res["config"], res["summary"], res["compile"]
    return "\n".join([
        f"JSON-schema-constrained against unconstrained, engine in-process: {c['model']}, B={c['rows']}, "
        f"{c['new_tokens']} new tokens, {c['dtype']}, {c['threads']} threads, median of {c['pairs']} alternating "
        f"pairs; CPU {c['cpu_model']} x {c['cpus']}",
        "| plain tok/s | json tok/s | json / plain (median) | per-pair ratios | mask per step p50 | mask per step p99 |",
        "|---|---|---|---|---|---|",
        f"| {s['plain_tokps_median']:.0f} | {s['json_tokps_median']:.0f} | **{s['median_ratio']:.3f}** | "
        f"{', '.join(f'{r:.3f}' for r in s['ratios'])} | {s['mask_ms_p50_median']:.2f} ms | "
        f"{s['mask_ms_p99_median']:.2f} ms |",
        f"compile: the tokenizer's index and a first schema {comp['tokenizer_and_first_ms']:.0f} ms; a new schema "
        f"{comp['new_schema_ms_median']:.2f} ms (median of {len(comp['new_schema_ms'])})"])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = engine_bench_parser("bench.structured", __doc__, pairs=3)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--schemas", type=int, default=8, help="distinct new schemas whose compile time is measured")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    return engine_bench_main(parse_args(argv), "structured", run, format_report)


if __name__ == "__main__":
    raise SystemExit(main())

"""`python -m bench.families`: per decoder family, the engine with tgq's fused forward against transformers' forward.

For each family with a fused forward (worker/models/), a random checkpoint of a small but not trivial
size (hidden 512, 12 layers, 8 query and 2 KV heads of 64, MLP 1536, SmolLM2's 49k vocabulary; the
family's own features at their real values: Gemma 2's caps of 50 and 30 and 4096-token windows) is
loaded twice the way `tgq worker` loads it, once with `fused=True` and once with `fused=False`. Each
runs `worker.engine.Engine` in-process on the same jobs: `--rows` greedy requests at once (B=32 by
default) with `--prompt-tokens` prompt ids and `--new-tokens` new tokens each. The two alternate
(`--pairs` times, fused first) and the figure is the median of the per-pair ratios of generated
tokens per second of wall time (prefill included).
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from . import stats
from .cost_probe import cpu_model
from .overhead import ClosedLoop
from .stacks import engine_bench_main, engine_bench_parser

SIZE: dict[str, Any] = dict(vocab_size=49152, hidden_size=512, intermediate_size=1536, num_hidden_layers=12,
                            num_attention_heads=8, num_key_value_heads=2, head_dim=64, max_position_embeddings=4096,
                            tie_word_embeddings=True)


def _say(msg: str) -> None:
    print(f"[families {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def bench_configs() -> dict[str, Any]:
    from transformers import (Gemma2Config, GemmaConfig, LlamaConfig, MistralConfig, Phi3Config, Qwen2Config,
                              Qwen3Config)

    return {"llama": LlamaConfig(**SIZE), "mistral": MistralConfig(**SIZE, sliding_window=4096),
            "qwen2": Qwen2Config(**SIZE), "qwen3": Qwen3Config(**SIZE), "gemma": GemmaConfig(**SIZE),
            "gemma2": Gemma2Config(**SIZE, query_pre_attn_scalar=64, sliding_window=4096,
                                   attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
            "phi3": Phi3Config(**SIZE, pad_token_id=0)}


def _jobs(args: argparse.Namespace, tag: str) -> list[Any]:
    from common.schemas import GenerationJob, SamplingParams, StoppingParams

    rng = random.Random(args.seed)
    return [GenerationJob(request_id=f"{tag}-{i}", input_ids=tuple(rng.randrange(100, 40000) for _ in range(args.prompt_tokens)),
                          sampling=SamplingParams(), stopping=StoppingParams(max_new_tokens=args.new_tokens),
                          reply_to="", want_tokens=False, enqueued_at=time.time())
            for i in range(args.rows)]


def _run(loaded: Any, args: argparse.Namespace, tag: str) -> dict[str, Any]:
    from common.settings import LimitSettings, WorkerSettings
    from worker.engine import Engine

    settings = WorkerSettings(max_batch_size=args.rows, device=args.device, dtype=args.dtype, threads=args.threads)
    loop = ClosedLoop(_jobs(args, tag), args.rows)
    engine = Engine(loaded, settings, LimitSettings(), loop, loop)
    t0 = time.perf_counter()
    while not loop.done:
        engine.step()
    wall = time.perf_counter() - t0
    tokens = sum(f.generated_tokens for f in loop.finals)
    return {"wall_s": wall, "generated_tokens": tokens, "tokens_per_s": tokens / wall, "errors": loop.errors}


def bench_family(kind: str, config: Any, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    from common.model_files import resolve
    from tests.support.tiny_families import save_random_model
    from worker.model import load_model

    path = save_random_model(config, root / kind, args.cache_dir)
    fused = load_model(resolve(str(path)), args.cache_dir, args.device, args.dtype, args.threads, rows_hint=args.rows)
    plain = load_model(resolve(str(path)), args.cache_dir, args.device, args.dtype, args.threads, rows_hint=args.rows,
                       fused=False)
    out: dict[str, Any] = {"fused_in_use": type(fused.fast).__name__ if fused.fast is not None else None,
                           "decode_graphs": fused.graphs is not None, "pairs": []}
    _run(fused, args, "warm")
    _run(plain, args, "warm")
    for k in range(args.pairs):
        a, b = _run(fused, args, f"f{k}"), _run(plain, args, f"t{k}")
        out["pairs"].append({"fused": a, "transformers": b, "ratio": a["tokens_per_s"] / b["tokens_per_s"]})
        _say(f"{kind} pair {k + 1}/{args.pairs}: fused {a['tokens_per_s']:.0f} tok/s, transformers "
             f"{b['tokens_per_s']:.0f} tok/s ({a['generated_tokens']} / {b['generated_tokens']} tokens)")
    ratios = [p["ratio"] for p in out["pairs"]]
    out["summary"] = {"median_ratio": stats.median(ratios), "ratios": ratios,
                      "fused_tokps_median": stats.median(p["fused"]["tokens_per_s"] for p in out["pairs"]),
                      "transformers_tokps_median": stats.median(p["transformers"]["tokens_per_s"] for p in out["pairs"])}
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from worker.model import configure_threads

    configure_threads(args.threads)
    out: dict[str, Any] = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                           "size": SIZE, "families": {}}
    out["config"].update(cpu_model=cpu_model(), cpus=os.cpu_count(), torch=torch.__version__,
                         started=time.strftime("%Y-%m-%dT%H:%M:%S"))
    if args.device == "cuda":
        out["config"]["gpu"] = torch.cuda.get_device_name()
    configs = bench_configs()
    kinds = args.families.split(",") if args.families else sorted(configs)
    _say(f"CPU {out['config']['cpu_model']} x {os.cpu_count()}; families {', '.join(kinds)}")
    with tempfile.TemporaryDirectory(prefix="tgq-families-") as tmp:
        for kind in kinds:
            out["families"][kind] = bench_family(kind, configs[kind], args, Path(tmp))
    return out


def format_report(res: dict[str, Any]) -> str:
    c = res["config"]
    where = (f"CUDA {c['gpu']}, " if c.get("device") == "cuda" else "") + f"CPU {c['cpu_model']} x {c['cpus']}"
    lines = [f"fused forward vs transformers' forward: B={c['rows']}, {c['prompt_tokens']}-token prompts, "
             f"{c['new_tokens']} new tokens, {c['dtype']}, {c['threads']} threads, median of {c['pairs']} "
             f"alternating pairs; {where}",
             "| family | fused tok/s | transformers tok/s | fused / transformers (median) | per-pair ratios |",
             "|---|---|---|---|---|"]
    for kind, f in res["families"].items():
        s = f["summary"]
        lines.append(f"| {kind} | {s['fused_tokps_median']:.0f} | {s['transformers_tokps_median']:.0f} | "
                     f"**{s['median_ratio']:.2f}** | {', '.join(f'{r:.2f}' for r in s['ratios'])} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = engine_bench_parser("bench.families", __doc__, pairs=3)
    p.add_argument("--families", default="", help="comma-separated model types (default: all)")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    return engine_bench_main(parse_args(argv), "families", run, format_report)


if __name__ == "__main__":
    raise SystemExit(main())

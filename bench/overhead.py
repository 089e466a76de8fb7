"""`python -m bench.overhead`: served tok/s against the engine driven in-process by the same request stream.

The stream is a fixed list of TGI requests (greedy), half chat-formatted questions that the model answers
and ends with EOS, half story prompts that run to their `max_new_tokens`; lengths are drawn from a seeded
range, so prefills keep arriving while the batch decodes and rows leave at every step.

- **in-process**: this process loads the model the way `tgq worker` does and runs `worker.engine.Engine`
  on jobs built by the API's own validator from the same bodies. A closed loop of `--clients` callers:
  a new job is handed over only when one of the in-flight jobs ends. No Redis, no HTTP.
- **served**: redis-server + one `tgq worker` + `tgq api` (`--api-workers` gunicorn workers), and
  `--clients` closed-loop streaming clients (bench.client) sending the same bodies in the same order.

The two alternate (`--pairs` times, in-process first) in one run, and the figure is the median of the
per-pair ratios served / in-process of generated tokens per second of wall time (the engine's own token
counts on both sides: `details.generated_tokens` and the FinalEvents). Both runs generate the same tokens
when batching does not change greedy choices; the token totals and finish reasons are printed beside it.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from . import stats
from .client import make_prompt, run_load
from .cost_probe import cpu_model
from .stacks import RESULTS, ROOT, TgqStack

QUESTIONS = ("What is the capital of France?", "Name a primary colour.", "What is 2 + 2?",
             "Say hello in Spanish.", "Which planet is closest to the sun?", "What do bees make?",
             "Give one word that rhymes with cat.", "What is the opposite of hot?")


def _say(msg: str) -> None:
    print(f"[overhead {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def request_stream(n: int, seed: int, chat_prompt: Any, prompt_tokens: int, low: int, high: int) -> list[dict]:
    """`n` TGI bodies: even ones a chat question (EOS exits), odd ones a story (runs to the length)."""
    rng = random.Random(seed)
    bodies = []
    for i in range(n):
        inputs = chat_prompt(QUESTIONS[(i // 2) % len(QUESTIONS)]) if i % 2 == 0 else make_prompt(i, prompt_tokens)
        bodies.append({"inputs": inputs, "parameters": {"max_new_tokens": rng.randint(low, high), "do_sample": False,
                                                         "details": True}})
    return bodies


class ClosedLoop:
    """The engine's RequestSource and EventSink: at most `clients` jobs in flight, the next one handed
    over when one ends, as `clients` callers each waiting for their answer would."""

    def __init__(self, jobs: list[Any], clients: int) -> None:
        self.jobs, self.clients = list(jobs), clients
        self.in_flight = 0
        self.finals: list[Any] = []
        self.errors: list[str] = []

    def fetch(self, max_jobs: int) -> list[Any]:
        k = max(0, min(max_jobs, self.clients - self.in_flight, len(self.jobs)))
        out, self.jobs = self.jobs[:k], self.jobs[k:]
        self.in_flight += len(out)
        return out

    def wait(self, timeout: float) -> None:
        return None

    def give_back(self, jobs: list[Any]) -> None:
        self.errors.append(f"{len(jobs)} jobs given back")

    def step_done(self, events: list[Any], running: list[Any]) -> set[str]:
        return set()

    def finished(self, leaving: list[Any]) -> None:
        from common.schemas import FinalEvent

        for _job, event in leaving:
            self.in_flight -= 1
            if isinstance(event, FinalEvent):
                self.finals.append(event)
            else:
                self.errors.append(repr(event))

    @property
    def done(self) -> bool:
        return not self.jobs and self.in_flight == 0


class InProcess:
    """The model loaded as `tgq worker` loads it, and the API's validator to turn bodies into jobs."""

    def __init__(self, args: argparse.Namespace) -> None:
        from api.core.models import load_tokenizer
        from api.core.validation import Validator
        from common import model_files
        from common.settings import LimitSettings, WorkerSettings
        from worker.model import load_model

        source = model_files.resolve(args.model)
        self.settings = WorkerSettings(max_batch_size=args.max_batch_size, dtype=args.dtype, threads=args.threads)
        self.limits = LimitSettings()
        s = self.settings
        self.loaded = load_model(source, args.cache_dir, "cpu", s.dtype, s.threads, rows_hint=s.max_batch_size,
                                 fused=s.fused_forward, cuda_graphs=s.cuda_graphs, cpu_kernels=s.cpu_kernels)
        tok_dir = model_files.ensure_tokenizer(source, args.cache_dir)
        self.validator = Validator(self.limits, load_tokenizer(Path(tok_dir) / "tokenizer.json"))

    def jobs(self, bodies: list[dict]) -> list[Any]:
        from api.tgi.parsing import parse_request
        from common.schemas import GenerationJob

        out = []
        for body in bodies:
            valid = self.validator.validate(parse_request(json.dumps(body).encode(), "application/json"))
            out.append(GenerationJob(request_id=uuid.uuid4().hex, input_ids=valid.input_ids, sampling=valid.sampling,
                                     stopping=valid.stopping, reply_to="", want_tokens=False, enqueued_at=time.time()))
        return out

    def run(self, bodies: list[dict], clients: int) -> dict[str, Any]:
        from worker.engine import Engine

        loop = ClosedLoop(self.jobs(bodies), clients)
        engine = Engine(self.loaded, self.settings, self.limits, loop, loop)
        t0 = time.perf_counter()
        while not loop.done:
            engine.step()
        wall = time.perf_counter() - t0
        tokens = sum(f.generated_tokens for f in loop.finals)
        return {"wall_s": wall, "generated_tokens": tokens, "tokens_per_s": tokens / wall,
                "completed": len(loop.finals), "errors": loop.errors,
                "finish_reasons": dict(Counter(f.finish_reason.value for f in loop.finals))}


def served_run(stack: TgqStack, bodies: list[dict], clients: int) -> dict[str, Any]:
    res = run_load(stack.url, clients=clients, requests=len(bodies), payloads=lambda i: bodies[i],
                   scrape_metrics=False, hard_deadline_s=3600)
    return {key: res[key] for key in ("wall_s", "generated_tokens", "tokens_per_s", "completed", "errors",
                                      "finish_reasons", "error_messages")}


def run(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                           "pairs": [], "errors": []}
    out["config"].update(cpu_model=cpu_model(), cpus=os.cpu_count(), started=time.strftime("%Y-%m-%dT%H:%M:%S"),
                         loadavg_start=[round(x, 2) for x in os.getloadavg()])
    _say(f"CPU {out['config']['cpu_model']} x {os.cpu_count()}; loading the model in-process")
    local = InProcess(args)
    template = local.loaded.tokenizer

    def chat_prompt(question: str) -> str:
        return template.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                            add_generation_prompt=True)

    bodies = request_stream(args.requests, args.seed, chat_prompt, args.prompt_tokens, args.min_tokens,
                            args.max_tokens)
    _say("warm-up in-process")
    local.run(bodies[: args.clients], args.clients)
    stack = TgqStack(args, "overhead", 1, args.threads)
    try:
        stack.start()
        _say("warm-up served")
        served_run(stack, bodies[: args.clients], args.clients)
        for k in range(args.pairs):
            a = local.run(bodies, args.clients)
            _say(f"pair {k + 1}/{args.pairs} in-process: {a['tokens_per_s']:.1f} tok/s ({a['generated_tokens']} tokens,"
                 f" {a['wall_s']:.1f} s, {a['finish_reasons']})")
            b = served_run(stack, bodies, args.clients)
            _say(f"pair {k + 1}/{args.pairs} served: {b['tokens_per_s']:.1f} tok/s ({b['generated_tokens']} tokens, "
                 f"{b['wall_s']:.1f} s, {b['finish_reasons']})")
            if a["errors"] or b["errors"]:
                out["errors"].append(f"pair {k + 1}: in-process {a['errors']}, served {b['errors']} "
                                     f"{b.get('error_messages')}")
            out["pairs"].append({"in_process": a, "served": b, "ratio": b["tokens_per_s"] / a["tokens_per_s"]})
    finally:
        stack.stop(out["errors"])
    ratios = [p["ratio"] for p in out["pairs"]]
    out["summary"] = {"median_ratio": stats.median(ratios), "ratios": ratios,
                      "in_process_tokps_median": stats.median(p["in_process"]["tokens_per_s"] for p in out["pairs"]),
                      "served_tokps_median": stats.median(p["served"]["tokens_per_s"] for p in out["pairs"])}
    out["config"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    return out


def format_report(res: dict[str, Any]) -> str:
    c, s = res["config"], res["summary"]
    lines = [f"serving overhead: {c['model']} {c['dtype']}, {c['threads']} threads, {c['clients']} clients, "
             f"{c['requests']} requests ({c['min_tokens']}-{c['max_tokens']} new tokens, half chat questions "
             f"ending in EOS), {c['api_workers']} API processes; CPU {c['cpu_model']} x {c['cpus']}",
             "| pair | in-process tok/s | served tok/s | served / in-process | tokens (in-process, served) |",
             "|---|---|---|---|---|"]
    for k, p in enumerate(res["pairs"]):
        a, b = p["in_process"], p["served"]
        lines.append(f"| {k + 1} | {a['tokens_per_s']:.1f} | {b['tokens_per_s']:.1f} | {p['ratio']:.3f} | "
                     f"{a['generated_tokens']}, {b['generated_tokens']} |")
    if s["median_ratio"] is not None:
        lines.append(f"median served / in-process: {s['median_ratio']:.3f} ({s['served_tokps_median']:.1f} / "
                     f"{s['in_process_tokps_median']:.1f} tok/s)")
    lines += [f"error: {e}" for e in res["errors"]]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.overhead", description=__doc__.split("\n")[0])
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--requests", type=int, default=96, help="requests in the stream")
    p.add_argument("--pairs", type=int, default=3, help="alternating (in-process, served) runs")
    p.add_argument("--min-tokens", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=160)
    p.add_argument("--prompt-tokens", type=int, default=32, help="length of the story prompts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--api-workers", type=int, default=2)
    p.add_argument("--cache-dir", default="")
    p.add_argument("--device", default="cpu", choices=("cpu",))
    p.add_argument("--out", type=Path, default=None, help="the JSON (default bench/results/<date>-overhead.json)")
    p.add_argument("--logs", type=Path, default=RESULTS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if min(args.clients, args.requests, args.pairs, args.min_tokens) < 1 or args.max_tokens < args.min_tokens:
        raise SystemExit("--clients, --requests, --pairs, --min-tokens must be positive and --max-tokens >= --min-tokens")
    out_json = args.out or ROOT / "bench" / "results" / f"{time.strftime('%Y-%m-%d')}-overhead.json"
    args.out = args.logs  # TgqStack writes its logs under args.out / "logs"
    res = run(args)
    res["report"] = format_report(res)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(res, indent=1, default=str))
    print(f"{res['report']}\n\nresults: {out_json}")
    return 0 if res["pairs"] and not res["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())

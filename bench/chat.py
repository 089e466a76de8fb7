"""`python -m bench.chat`: /v1/chat/completions streaming against /generate_stream, in one run, on one stack.

One private stack (redis-server + one `tgq worker` + `tgq api`, as `bench.suite` starts it), the same
prompts on both routes:
  chat      POST /v1/chat/completions, stream, temperature 0, max_tokens N, stream_options.include_usage;
  generate  POST /generate_stream with the chat template's rendered text (from POST /chat_tokenize),
            greedy (do_sample false), max_new_tokens N, details.
Before measuring, every prompt's token ids are checked to be the same on both routes: /chat_tokenize's
ids (the template's text, no special tokens added, as /v1/chat/completions tokenizes it) against
/tokenize's ids of that text (special tokens added, as /generate tokenizes it).

The runs alternate, generate then chat, --rounds pairs at --clients concurrent streaming clients
(`bench.client`, each client sends one request after another; --requests per run, default 2 per
client, or --duration seconds). Each pair meets the same machine speed; the figure is the median of
the pairs' ratios chat tok/s / generate tok/s. Also printed per run: TTFT/ITL p50, generated tokens per
request, and the API's and worker's CPU seconds per 1000 tokens (/proc, the API's whole process tree);
and whether both routes generated the same text for each prompt (greedy on the same tokens).

Results: stdout and bench/results/<date>-chat-vs-generate.json (--out to change).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from . import stats
from .client import WORDS, RequestResult, run_load
from .stacks import RESULTS, ROOT, TgqStack

SYSTEM = "You are a storyteller."
_CLK = os.sysconf("SC_CLK_TCK")


def _say(msg: str) -> None:
    print(f"[chat {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- prompts ---------------------------------------------------------------------------------------

def make_messages(index: int) -> list[dict[str, str]]:
    """A short chat, different for every index: a system line and one user request for a long story
    (~32 tokens once SmolLM2's template is applied; long answers, so few streams end at EOS early)."""
    n = len(WORDS)
    a, b, c = WORDS[(index * 7) % n], WORDS[(index * 13 + 5) % n], WORDS[(index * 29 + 11) % n]
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"Tell me a long story about a {a}, a {b} and a {c}."}]


def _post(url: str, body: dict[str, Any]) -> Any:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read())


def prepare_prompts(url: str, count: int) -> list[dict[str, Any]]:
    """Each prompt's messages, its rendered text (/chat_tokenize) and both routes' token ids."""
    out = []
    for i in range(count):
        messages = make_messages(i)
        chat = _post(url + "/chat_tokenize", {"messages": messages})
        text = chat["templated_text"]
        gen = _post(url + "/tokenize", {"inputs": text})
        out.append({"messages": messages, "text": text, "chat_ids": [t["id"] for t in chat["tokenize_response"]],
                    "generate_ids": [t["id"] for t in gen]})
    return out


def token_check(prompts: list[dict[str, Any]]) -> dict[str, Any]:
    same = sum(p["chat_ids"] == p["generate_ids"] for p in prompts)
    lens = [len(p["chat_ids"]) for p in prompts]
    diffs = [len(p["generate_ids"]) - len(p["chat_ids"]) for p in prompts]
    return {"prompts": len(prompts), "identical_ids": same, "chat_tokens_min": min(lens), "chat_tokens_max": max(lens),
            "chat_tokens_mean": sum(lens) / len(lens), "generate_minus_chat_tokens": sorted(set(diffs))}


# ---- CPU accounting --------------------------------------------------------------------------------

def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(entry))
    return kids


def process_tree(pid: int) -> list[int]:
    kids, out, todo = _children(), [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of the processes (their own, not their reaped children's)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / _CLK


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.strip().startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


# ---- runs ------------------------------------------------------------------------------------------

def payload_fns(prompts: list[dict[str, Any]], new_tokens: int) -> dict[str, Any]:
    def chat(i: int) -> dict[str, Any]:
        return {"messages": prompts[i % len(prompts)]["messages"], "max_tokens": new_tokens, "temperature": 0,
                "stream": True, "stream_options": {"include_usage": True}}

    def generate(i: int) -> dict[str, Any]:
        return {"inputs": prompts[i % len(prompts)]["text"],
                "parameters": {"max_new_tokens": new_tokens, "do_sample": False, "details": True}}

    return {"chat": chat, "tgi": generate}


def one_run(args: argparse.Namespace, stack: TgqStack, api: str, payloads: Any, clients: int, requests: int,
            new_tokens: int, duration: float = 0.0) -> tuple[dict[str, Any], list[RequestResult]]:
    api_pids, worker_pids = process_tree(stack.api.pid), stack.worker_pids()
    cpu_api0, cpu_w0 = cpu_seconds(api_pids), cpu_seconds(worker_pids)
    results: list[RequestResult] = []
    res = run_load(stack.url, api=api, clients=clients, prompt_tokens=args.prompt_tokens, new_tokens=new_tokens,
                   requests=requests, duration=duration or 30.0, hard_deadline_s=args.deadline, scrape_metrics=True,
                   payloads=payloads, keep_text=True, results_out=results, progress=args.progress)
    cpu_api, cpu_w = cpu_seconds(api_pids) - cpu_api0, cpu_seconds(worker_pids) - cpu_w0
    if res["cut_at_deadline"]:
        res["cancelled_leftovers"] = stack.cancel_leftovers()
    ok = [r for r in results if r.ok]
    gen = [r.generated_tokens for r in ok if r.generated_tokens is not None]
    res["per_request_tokens"] = {"received_min": min((r.tokens for r in ok), default=None),
                                 "received_max": max((r.tokens for r in ok), default=None),
                                 "received_mean": res["mean_tokens_per_request"],
                                 "server_generated_mean": (sum(gen) / len(gen)) if gen else None,
                                 "server_matches_received": all(r.generated_tokens == r.tokens for r in ok)}
    tokens = res["generated_tokens"] or 0
    res["cpu"] = {"api_s": cpu_api, "worker_s": cpu_w, "api_processes": len(api_pids),
                  "api_s_per_1k_tokens": 1000 * cpu_api / tokens if tokens else None,
                  "worker_s_per_1k_tokens": 1000 * cpu_w / tokens if tokens else None}
    return res, results


def _texts(results: list[RequestResult], n_prompts: int) -> dict[int, tuple[int, str]]:
    """prompt index -> (tokens, text without a final special token), first completed request per prompt."""
    out: dict[int, tuple[int, str]] = {}
    for r in results:
        key = r.index % n_prompts
        if not r.ok or key in out or r.text is None:
            continue
        pieces = list(r.text)
        if r.finish_reason in ("eos_token", "stop") and pieces:
            pieces = pieces[:-1]  # EOS: TGI streams its text, OpenAI's content leaves it out
        out[key] = (r.tokens, "".join(pieces))
    return out


def compare_outputs(gen: list[RequestResult], chat: list[RequestResult], n_prompts: int) -> dict[str, Any]:
    g, c = _texts(gen, n_prompts), _texts(chat, n_prompts)
    keys = sorted(set(g) & set(c))
    same_text = [k for k in keys if g[k][1] == c[k][1]]
    same_len = [k for k in keys if g[k][0] == c[k][0]]
    differ = [k for k in keys if g[k][1] != c[k][1]]
    example = None
    if differ:
        k = differ[0]
        a, b = g[k][1], c[k][1]
        at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        example = {"prompt": k, "first_difference_at_char": at, "generate": a[max(0, at - 40):at + 40],
                   "chat": b[max(0, at - 40):at + 40]}
    return {"prompts_compared": len(keys), "identical_text": len(same_text), "identical_token_count": len(same_len),
            "first_difference": example}


def _ms(x: float | None) -> str:
    return "n/a" if x is None else f"{x * 1000:.0f} ms"


def _summary(res: dict[str, Any]) -> str:
    t = res["per_request_tokens"]
    return (f"{res['tokens_per_s']:.1f} tok/s, TTFT p50 {_ms(res['ttft_s']['p50'])}, ITL p50 {_ms(res['itl_s']['p50'])}, "
            f"{res['completed']}/{res['requests']} ok, {res['errors']} errors, tokens/request "
            f"{t['received_mean']:.1f} (min {t['received_min']}, max {t['received_max']}), finish "
            f"{res['finish_reasons']}, API CPU {res['cpu']['api_s_per_1k_tokens']:.2f} s/1k tok, worker CPU "
            f"{res['cpu']['worker_s_per_1k_tokens']:.2f} s/1k tok")


def run(args: argparse.Namespace) -> dict[str, Any]:
    requests = 0 if args.duration else (args.requests or 2 * args.clients)
    out: dict[str, Any] = {"config": {
        "model": args.model, "dtype": args.dtype, "device": args.device, "threads": args.threads,
        "clients": args.clients, "new_tokens": args.new_tokens, "requests_per_run": requests,
        "duration_s": args.duration or None, "rounds": args.rounds, "prompts": args.prompts,
        "api_workers": args.api_workers, "order": "generate_stream then chat in every pair",
        "cpu_model": cpu_model(), "cpus": os.cpu_count(), "loadavg_start": [round(x, 2) for x in os.getloadavg()],
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "commit": _commit()}, "errors": []}
    _say(f"CPU {out['config']['cpu_model']} x {os.cpu_count()}; starting redis + 1 worker ({args.threads} threads, "
         f"{args.dtype}) + API ({args.api_workers} gunicorn worker(s))")
    stack = TgqStack(args, "chat", 1, args.threads)
    try:
        stack.start()
        prompts = prepare_prompts(stack.url, args.prompts)
        check = token_check(prompts)
        out["token_check"] = check
        args.prompt_tokens = round(check["chat_tokens_mean"])  # what the runs' summaries report
        out["example_prompt"] = prompts[0]["text"]
        _say(f"token check: {check['identical_ids']}/{check['prompts']} prompts give the same ids on /chat_tokenize "
             f"(chat: no special tokens added) and /tokenize of the rendered text (/generate: special tokens added); "
             f"/tokenize - /chat_tokenize length {check['generate_minus_chat_tokens']}; prompt tokens "
             f"{check['chat_tokens_min']}-{check['chat_tokens_max']} (mean {check['chat_tokens_mean']:.1f})")
        if check["identical_ids"] != check["prompts"]:
            out["errors"].append("the two routes tokenize the rendered text differently")
        fns = payload_fns(prompts, args.new_tokens)
        _say("warm-up")
        for api in ("tgi", "chat"):
            run_load(stack.url, api=api, clients=1, requests=1, new_tokens=8, payloads=fns[api], hard_deadline_s=120)
            run_load(stack.url, api=api, clients=args.clients, requests=args.clients, new_tokens=4, payloads=fns[api],
                     hard_deadline_s=120)
        runs: dict[str, list[dict[str, Any]]] = {"generate_stream": [], "chat": []}
        pairs: list[float] = []
        same: list[dict[str, Any]] = []
        same_gen: list[dict[str, Any]] = []  # generate_stream against its own previous run: the batch's effect
        previous: list[RequestResult] | None = None
        for k in range(args.rounds):
            pair_results = {}
            for api, name in (("tgi", "generate_stream"), ("chat", "chat")):
                res, results = one_run(args, stack, api, fns[api], args.clients, requests, args.new_tokens,
                                       args.duration)
                runs[name].append(res)
                pair_results[name] = results
                _say(f"round {k + 1}/{args.rounds} {name:15s} {_summary(res)}")
            ratio = runs["chat"][-1]["tokens_per_s"] / runs["generate_stream"][-1]["tokens_per_s"]
            pairs.append(ratio)
            same.append(compare_outputs(pair_results["generate_stream"], pair_results["chat"], len(prompts)))
            note = ""
            if previous is not None:
                same_gen.append(compare_outputs(previous, pair_results["generate_stream"], len(prompts)))
                note = (f" (generate_stream against its previous run: {same_gen[-1]['identical_text']}/"
                        f"{same_gen[-1]['prompts_compared']})")
            previous = pair_results["generate_stream"]
            _say(f"round {k + 1}/{args.rounds} chat / generate_stream = {ratio:.3f}; identical text for "
                 f"{same[-1]['identical_text']}/{same[-1]['prompts_compared']} prompts{note}")
        out["runs"] = runs
        out["outputs_compared"] = same
        out["generate_vs_previous_generate"] = same_gen
        out["ratio_pairs"] = [round(r, 3) for r in pairs]
        out["ratio_median"] = stats.median(pairs)
        for name, rs in runs.items():
            out[name] = {
                "tokens_per_s_median": stats.median(r["tokens_per_s"] for r in rs),
                "ttft_p50_s_median": stats.median(r["ttft_s"]["p50"] for r in rs),
                "itl_p50_s_median": stats.median(r["itl_s"]["p50"] for r in rs),
                "tokens_per_request_mean": stats.median(r["per_request_tokens"]["received_mean"] for r in rs),
                "api_cpu_s_per_1k_tokens_median": stats.median(r["cpu"]["api_s_per_1k_tokens"] for r in rs),
                "worker_cpu_s_per_1k_tokens_median": stats.median(r["cpu"]["worker_s_per_1k_tokens"] for r in rs),
                "errors": sum(r["errors"] for r in rs)}
            if out[name]["errors"]:
                out["errors"].append(f"{name}: {out[name]['errors']} failed requests")
    except RuntimeError as exc:
        out["errors"].append(f"stack: {exc}")
    finally:
        stack.stop(out["errors"])
    return out


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def format_report(res: dict[str, Any]) -> str:
    c = res["config"]
    lines = [f"/v1/chat/completions vs /generate_stream: {c['model']} {c['dtype']} on {c['device']}, "
             f"{c['threads']} torch threads, {c['clients']} clients x {c['new_tokens']} new tokens, "
             f"{c['requests_per_run'] or str(c['duration_s']) + ' s'} requests per run, {c['rounds']} pairs",
             f"CPU: {c['cpu_model']} ({c['cpus']} CPUs), load average at start {c['loadavg_start']}"]
    if "token_check" in res:
        t = res["token_check"]
        lines.append(f"token check: {t['identical_ids']}/{t['prompts']} prompts, same ids on both routes "
                     f"({t['chat_tokens_min']}-{t['chat_tokens_max']} prompt tokens)")
    if "runs" in res:
        lines.append("")
        lines.append("| pair | generate_stream tok/s | chat tok/s | chat / generate | TTFT p50 gen | TTFT p50 chat | "
                     "tokens/req gen | tokens/req chat | API CPU s/1k tok gen | chat | same text |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
        for k, (g, ch) in enumerate(zip(res["runs"]["generate_stream"], res["runs"]["chat"])):
            same = res["outputs_compared"][k]
            lines.append(f"| {k + 1} | {g['tokens_per_s']:.1f} | {ch['tokens_per_s']:.1f} | {res['ratio_pairs'][k]:.3f} | "
                         f"{_ms(g['ttft_s']['p50'])} | {_ms(ch['ttft_s']['p50'])} | "
                         f"{g['per_request_tokens']['received_mean']:.1f} | {ch['per_request_tokens']['received_mean']:.1f} | "
                         f"{g['cpu']['api_s_per_1k_tokens']:.2f} | {ch['cpu']['api_s_per_1k_tokens']:.2f} | "
                         f"{same['identical_text']}/{same['prompts_compared']} |")
        g, ch = res["generate_stream"], res["chat"]
        lines.append("")
        lines.append(f"median tok/s: generate_stream {g['tokens_per_s_median']:.1f}, chat {ch['tokens_per_s_median']:.1f}; "
                     f"TTFT p50 (median of runs): generate_stream {_ms(g['ttft_p50_s_median'])}, chat "
                     f"{_ms(ch['ttft_p50_s_median'])}")
        lines.append(f"chat / generate_stream per pair {res['ratio_pairs']}, median {res['ratio_median']:.3f}")
        if res.get("generate_vs_previous_generate"):
            lines.append("same text, generate_stream against its own previous run (greedy, other batch "
                         "neighbours): " + ", ".join(f"{x['identical_text']}/{x['prompts_compared']}"
                                                     for x in res["generate_vs_previous_generate"]))
    for e in res["errors"]:
        lines.append(f"error: {e}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.chat", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--threads", type=int, default=2, help="torch threads of the worker")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--requests", type=int, default=0, help="requests per run (default 2 per client)")
    p.add_argument("--duration", type=float, default=0.0, help="seconds per run instead of --requests")
    p.add_argument("--rounds", type=int, default=3, help="generate/chat pairs")
    p.add_argument("--prompts", type=int, default=64, help="distinct chats (request i uses chat i mod this)")
    p.add_argument("--deadline", type=float, default=600.0, help="safety cut of a run, seconds")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--api-workers", type=int, default=1, help="gunicorn workers of the API")
    p.add_argument("--cache-dir", default="")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--out", type=Path, default=None, help="the JSON (default bench/results/<date>-chat-vs-generate.json)")
    p.add_argument("--logs", type=Path, default=RESULTS, help="where the servers' logs go (<logs>/logs)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.rounds < 1 or args.clients < 1 or args.prompts < 1:
        raise SystemExit("--rounds, --clients and --prompts must be positive")
    args.max_batch_size = max(args.max_batch_size, args.clients)
    out_json = args.out or ROOT / "bench" / "results" / f"{time.strftime('%Y-%m-%d')}-chat-vs-generate.json"
    args.out = args.logs  # TgqStack writes its logs under args.out / "logs"
    res = run(args)
    report = format_report(res)
    print(report)
    res["report"] = report
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(res, indent=1))
    print(f"\nresults: {out_json}")
    return 0 if not res["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())

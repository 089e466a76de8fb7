"""`tgq bench`: a streaming load generator in the manner of TGI's benchmark and vLLM's benchmark_serving.

N concurrent clients, each issuing one streaming request after another, on one asyncio loop (aiohttp):
a single thread that sleeps in epoll takes the arrival time of every SSE event as it is read, without
the GIL contention of N reader threads, and leaves the cores to the server being measured.

Three server dialects:
  tgi     POST {url}/generate_stream (TGI 0.5.0, tgq)
  openai  POST {url}/v1/completions with stream=true (llama.cpp's llama-server, llama-cpp-python's server, vLLM, ...)
  chat    POST {url}/v1/chat/completions with stream=true (library use with `payloads`: the body carries
          the messages; `bench.chat` compares it with /generate_stream on the template's rendered text)

Figures: aggregate generated tokens/s (tokens received / wall time), time to first token, inter-token
latency (every gap between consecutive token events, pooled over requests, as vLLM does), request
latency, errors, and for tgi the batch sizes the workers reached, from `{url}/metrics`
(`tgi_batch_current_size` sampled every 2 s during the run -- a scrape costs the API ~9 ms of CPU,
which every 0.5 s took ~2% of a core from the server under test; `tgi_batch_next_size` and
`tgi_batch_inference_*` differences between a scrape before and one after).

Stopping: after `--requests` requests, or once `--duration` seconds have passed (requests in flight
then finish). `hard_deadline_s` (library use, e.g. the slow one-at-a-time baseline) additionally
aborts whatever is still streaming at that time; tokens received until then count, and the wall time
ends there.
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from . import stats

# Common single-token English words (with a leading space each is one token for Llama-family BPEs).
WORDS = (
    "time year people way day man thing woman life child world school state family student group "
    "country problem hand part place case week company system program question work government "
    "number night point home water room mother area money story fact month lot right study book eye "
    "job word business issue side kind head house service friend father power hour game line end "
    "member law car city community name president team minute idea kid body information back parent "
    "face others level office door health person art war history party result change morning reason "
    "research girl guy moment air teacher force education river garden forest mountain village king "
    "ship horse bird tree flower light music letter table window road bridge island castle dragon"
).split()

PROMPT_HEAD = "Tell a long story about"
PROMPT_TAIL = ". Once upon a time,"


def make_prompt(index: int, prompt_tokens: int) -> str:
    """A prompt of about `prompt_tokens` tokens, different for every request index (no shared prefix
    beyond the fixed head, so no server can serve one request from another's prompt cache)."""
    n = max(1, prompt_tokens - 12)  # head + tail are ~12 tokens
    start = (index * 37) % len(WORDS)
    words = [WORDS[(start + k * 11) % len(WORDS)] for k in range(n)]
    return f"{PROMPT_HEAD} {' '.join(words)}{PROMPT_TAIL}"


def make_payload(api: str, index: int, prompt_tokens: int, new_tokens: int, sample: bool, seed: int) -> dict[str, Any]:
    prompt = make_prompt(index, prompt_tokens)
    if api == "tgi":
        params: dict[str, Any] = {"max_new_tokens": new_tokens, "details": True}
        if sample:
            params.update(do_sample=True, seed=seed + index)
        else:
            params["do_sample"] = False
        return {"inputs": prompt, "parameters": params}
    if api == "openai":
        body: dict[str, Any] = {"prompt": prompt, "max_tokens": new_tokens, "stream": True}
        if sample:
            body.update(temperature=1.0, top_p=1.0, top_k=0, seed=seed + index)
        else:
            body.update(temperature=0.0, top_k=1)
        return body
    raise ValueError(f"unknown api dialect {api!r}")


ENDPOINTS = {"tgi": "/generate_stream", "openai": "/v1/completions", "chat": "/v1/chat/completions"}


def endpoint(api: str, url: str) -> str:
    return url.rstrip("/") + ENDPOINTS[api]


def interpret_chat(data: str) -> stats.StreamEvent:
    """An OpenAI `/v1/chat/completions` stream chunk, or `[DONE]`.

    A choice's first chunk carries only the role (no token: "other"); then one chunk per generated token,
    the last with `finish_reason` ("final"; its piece is empty for a special token such as EOS, and it
    still counts); with `stream_options.include_usage` a chunk with no choices carries `usage`
    ("other", with the server's completion_tokens as generated_tokens).
    """
    if data.strip() == "[DONE]":
        return stats.StreamEvent("done")
    try:
        obj = json.loads(data)
    except ValueError:
        return stats.StreamEvent("error", error=f"not JSON: {data[:200]!r}")
    if not isinstance(obj, dict):
        return stats.StreamEvent("other")
    if "error" in obj:
        err = obj["error"]
        return stats.StreamEvent("error", error=str(err.get("message", err)) if isinstance(err, dict) else str(err))
    choices = obj.get("choices") or []
    if not choices:
        usage = obj.get("usage") or {}
        return stats.StreamEvent("other", generated_tokens=usage.get("completion_tokens"))
    choice = choices[0]
    delta = choice.get("delta") or {}
    text = delta.get("content") or ""
    finish = choice.get("finish_reason")
    if finish is not None:
        return stats.StreamEvent("final", text=text, tokens=1, finish_reason=finish)
    if "role" in delta:
        return stats.StreamEvent("other", text=text)
    return stats.StreamEvent("token", text=text, tokens=1)


INTERPRETERS = {"tgi": stats.interpret_tgi, "openai": stats.interpret_openai, "chat": interpret_chat}


@dataclass
class RequestResult:
    index: int
    start: float = 0.0  # perf_counter when the request was sent
    token_times: list[float] = field(default_factory=list)  # perf_counter of each token event
    tokens: int = 0
    end: float | None = None
    ok: bool = False
    cut: bool = False  # aborted at the hard deadline
    error: str | None = None
    generated_tokens: int | None = None
    finish_reason: str | None = None
    text: list[str] | None = None  # the token pieces received, when the caller asks for them (`keep_text`)

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] - self.start if self.token_times else None

    @property
    def latency(self) -> float | None:
        return self.end - self.start if (self.ok and self.end is not None) else None


async def _one_request(session: Any, api: str, url: str, payload: dict[str, Any], r: RequestResult) -> None:
    import aiohttp

    interpret = INTERPRETERS[api]
    dec = stats.SseDecoder()
    r.start = time.perf_counter()
    try:
        async with session.post(url, json=payload) as resp:
            if resp.status != 200:
                body = (await resp.text())[:300]
                r.error = f"HTTP {resp.status}: {body}"
                r.end = time.perf_counter()
                return
            finished = False
            async for line in resp.content:
                now = time.perf_counter()
                data = dec.feed_line(line)
                if data is None:
                    continue
                ev = interpret(data)
                if ev.kind in ("token", "final") and ev.tokens:
                    r.tokens += ev.tokens
                    r.token_times.append(now)
                    if r.text is not None:
                        r.text.append(ev.text)
                if ev.kind == "error":
                    r.error = ev.error
                    r.end = now
                    return
                if ev.kind == "other" and ev.generated_tokens is not None:  # chat's usage chunk, after the final
                    r.generated_tokens = ev.generated_tokens
                if ev.kind == "final":
                    r.generated_tokens = ev.generated_tokens if ev.generated_tokens is not None else r.generated_tokens
                    r.finish_reason = ev.finish_reason
                    finished = True
                    r.end = now  # TGI's body ends right after; reading on to EOF keeps the connection reusable
                if ev.kind == "done":
                    r.end = r.end or now
                    break
            if finished:
                r.ok = True
            else:
                r.error = "stream ended without a final event"
                r.end = time.perf_counter()
    except asyncio.CancelledError:
        r.cut = True
        r.end = time.perf_counter()
        raise
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as exc:
        r.error = f"{type(exc).__name__}: {exc}"
        r.end = time.perf_counter()


async def _fetch_metrics(session: Any, base: str) -> dict | None:
    try:
        async with session.get(base.rstrip("/") + "/metrics") as resp:
            if resp.status != 200:
                return None
            return stats.parse_prometheus(await resp.text())
    except Exception:  # a server without /metrics (llama.cpp) or one that is busy: no batch figures
        return None


async def _sample_gauge(session: Any, base: str, out: list[float], every_s: float) -> None:
    while True:
        samples = await _fetch_metrics(session, base)
        if samples is not None:
            v = stats.metric_value(samples, "tgi_batch_current_size")
            if v is not None:
                out.append(v)
        await asyncio.sleep(every_s)


async def _run_async(url: str, api: str, clients: int, prompt_tokens: int, new_tokens: int, requests: int,
                     duration: float, sample: bool, seed: int, progress: bool, hard_deadline_s: float | None,
                     scrape_metrics: bool, gauge_every_s: float, payloads: Any = None, keep_text: bool = False,
                     results_out: list[RequestResult] | None = None) -> dict[str, Any]:
    import aiohttp

    target = endpoint(api, url)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=900)
    # A fresh connection per request, for every server alike: llama.cpp's server drops idle kept-alive
    # connections, and a reused one fails with "Can not write request body" (a loopback connect costs
    # well under a millisecond).
    connector = aiohttp.TCPConnector(limit=clients + 4, force_close=True)
    results: list[RequestResult] = []
    counter = itertools.count()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=requests or None, unit="req", desc=f"{api} c={clients}", file=sys.stderr,
                   dynamic_ncols=True)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector, read_bufsize=1 << 20) as session:
        before = await _fetch_metrics(session, url) if scrape_metrics else None
        gauge: list[float] = []
        sampler = (asyncio.create_task(_sample_gauge(session, url, gauge, gauge_every_s))
                   if before is not None else None)
        t0 = time.perf_counter()
        stop_issuing = t0 + duration if not requests else float("inf")

        async def client_loop() -> None:
            while True:
                i = next(counter)
                if (requests and i >= requests) or (not requests and time.perf_counter() >= stop_issuing):
                    return
                r = RequestResult(index=i, text=[] if keep_text else None)
                results.append(r)
                payload = payloads(i) if payloads is not None else make_payload(api, i, prompt_tokens, new_tokens,
                                                                                 sample, seed)
                await _one_request(session, api, target, payload, r)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(tokens=sum(x.tokens for x in results), refresh=False)

        tasks = [asyncio.create_task(client_loop()) for _ in range(clients)]
        _, pending = await asyncio.wait(tasks, timeout=hard_deadline_s)
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        t1 = time.perf_counter()
        if sampler is not None:
            sampler.cancel()
            await asyncio.gather(sampler, return_exceptions=True)
        after = await _fetch_metrics(session, url) if before is not None else None
    if bar is not None:
        bar.close()
    if results_out is not None:
        results_out.extend(results)
    return summarize_run(results, t1 - t0, api=api, url=url, clients=clients, prompt_tokens=prompt_tokens,
                         new_tokens=new_tokens, sample=sample, before=before, after=after, gauge=gauge)


def summarize_run(results: list[RequestResult], wall_s: float, *, api: str, url: str, clients: int,
                  prompt_tokens: int, new_tokens: int, sample: bool, before: dict | None, after: dict | None,
                  gauge: list[float]) -> dict[str, Any]:
    """Everything the report prints, as one JSON-able dict (times in seconds)."""
    ok = [r for r in results if r.ok]
    errors = [r for r in results if r.error and not r.cut]
    cut = [r for r in results if r.cut]
    tokens = sum(r.tokens for r in results)
    ttfts = [r.ttft for r in results if r.ttft is not None]
    itls = [g for r in results for g in stats.gaps(r.token_times)]
    lats = [r.latency for r in ok if r.latency is not None]
    tpots = [(r.end - r.token_times[0]) / (len(r.token_times) - 1) for r in ok
             if r.end is not None and len(r.token_times) > 1]
    finish: dict[str, int] = {}
    for r in ok:
        finish[str(r.finish_reason)] = finish.get(str(r.finish_reason), 0) + 1
    first_errors: list[str] = []
    for r in errors:
        if r.error not in first_errors:
            first_errors.append(str(r.error))
        if len(first_errors) >= 5:
            break
    out: dict[str, Any] = {
        "api": api, "url": url, "clients": clients, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
        "sample": sample, "wall_s": wall_s, "requests": len(results), "completed": len(ok),
        "errors": len(errors), "cut_at_deadline": len(cut), "error_messages": first_errors,
        "generated_tokens": tokens, "tokens_per_s": tokens / wall_s if wall_s > 0 else None,
        "mean_tokens_per_request": (sum(r.tokens for r in ok) / len(ok)) if ok else None,
        "finish_reasons": finish,
        "ttft_s": stats.summarize(ttfts), "itl_s": stats.summarize(itls), "latency_s": stats.summarize(lats),
        "tpot_mean_s": (sum(tpots) / len(tpots)) if tpots else None,
        "server": None,
    }
    if before is not None and after is not None:
        nonzero = [g for g in gauge if g > 0]
        dec = stats.histogram_delta(before, after, "tgi_batch_inference_duration", method="decode")
        pre = stats.histogram_delta(before, after, "tgi_batch_inference_duration", method="prefill")

        def counter(name: str, **labels: str) -> float | None:
            a = stats.metric_value(after, name, **labels)
            b = stats.metric_value(before, name, **labels)
            return None if a is None else a - (b or 0.0)

        out["server"] = {
            "batch_current_size": {"samples": len(gauge), "max": max(gauge) if gauge else None,
                                   "mean_nonzero": (sum(nonzero) / len(nonzero)) if nonzero else None},
            "batch_next_size": stats.histogram_delta(before, after, "tgi_batch_next_size"),
            "decode_steps": counter("tgi_batch_inference_count", method="decode"),
            "prefill_steps": counter("tgi_batch_inference_count", method="prefill"),
            "decode_step_mean_s": dec["mean"], "decode_busy_s": dec["sum"],
            "prefill_step_mean_s": pre["mean"], "prefill_busy_s": pre["sum"],
            "request_success": counter("tgi_request_success"),
            "request_failure": counter("tgi_request_failure"),
        }
    return out


def run_load(url: str, *, api: str = "tgi", clients: int = 8, prompt_tokens: int = 32, new_tokens: int = 128,
             requests: int = 0, duration: float = 30.0, sample: bool = False, seed: int = 1234,
             progress: bool = False, hard_deadline_s: float | None = None, scrape_metrics: bool | None = None,
             gauge_every_s: float = 2.0, payloads: Any = None, keep_text: bool = False,
             results_out: list[RequestResult] | None = None) -> dict[str, Any]:
    """Run one load test and return its summary (see `summarize_run`).

    `payloads(i)`, when given, makes request i's JSON body (instead of `make_payload`; needed for
    api="chat"); `keep_text` keeps every request's token pieces (`RequestResult.text`); `results_out`
    receives the RequestResults."""
    if clients < 1:
        raise ValueError("clients must be >= 1")
    if requests < 0 or (not requests and duration <= 0):
        raise ValueError("give requests > 0 or duration > 0")
    if scrape_metrics is None:
        scrape_metrics = api == "tgi"
    if api == "chat" and payloads is None:
        raise ValueError("api='chat' needs payloads (a function of the request index)")
    return asyncio.run(_run_async(url, api, clients, prompt_tokens, new_tokens, requests, duration, sample, seed,
                                  progress, hard_deadline_s, scrape_metrics, gauge_every_s, payloads, keep_text,
                                  results_out))


def _ms(x: float | None) -> str:
    return "n/a" if x is None else f"{x * 1000:.1f} ms"


def _num(x: float | None) -> str:
    return "n/a" if x is None else (str(int(x)) if float(x).is_integer() else f"{x:.1f}")


def format_report(res: dict[str, Any]) -> str:
    lines = [
        f"target        {res['url']} ({res['api']}), {res['clients']} clients, ~{res['prompt_tokens']} prompt "
        f"tokens, {res['new_tokens']} new tokens, {'sampling' if res['sample'] else 'greedy'}",
        f"requests      {res['completed']} completed, {res['errors']} errors, {res['cut_at_deadline']} cut "
        f"at deadline, in {res['wall_s']:.1f} s",
        f"throughput    {res['tokens_per_s']:.1f} generated tok/s ({res['generated_tokens']} tokens; "
        f"{(res['mean_tokens_per_request'] or 0):.1f} per completed request; finish {res['finish_reasons']})",
        f"TTFT          p50 {_ms(res['ttft_s']['p50'])}   p95 {_ms(res['ttft_s']['p95'])}",
        f"inter-token   p50 {_ms(res['itl_s']['p50'])}   p95 {_ms(res['itl_s']['p95'])}   "
        f"(mean per-request TPOT {_ms(res['tpot_mean_s'])})",
        f"latency       p50 {_ms(res['latency_s']['p50'])}   p95 {_ms(res['latency_s']['p95'])}",
    ]
    for msg in res["error_messages"]:
        lines.append(f"  error: {msg}")
    srv = res.get("server")
    if srv:
        cur, nxt = srv["batch_current_size"], srv["batch_next_size"]
        mean_nz = cur["mean_nonzero"]
        lines.append(f"batch (gauge) max {_num(cur['max'])}, mean while busy "
                     f"{'n/a' if mean_nz is None else f'{mean_nz:.1f}'} ({cur['samples']} samples)")
        nmean = nxt["mean"]
        sizes = " ".join(f"{k}:{int(v)}" for k, v in nxt["per_bucket"].items())
        lines.append(f"batch (new)   {int(nxt['count'])} batches formed, mean size "
                     f"{'n/a' if nmean is None else f'{nmean:.1f}'}, largest {_num(nxt['max_le'])}; "
                     f"size:count {sizes or '-'}")
        lines.append(f"steps         {_num(srv['decode_steps'])} decode (mean {_ms(srv['decode_step_mean_s'])}), "
                     f"{_num(srv['prefill_steps'])} prefill (mean {_ms(srv['prefill_step_mean_s'])})")
    elif res["api"] == "tgi":
        lines.append("batch         n/a (no /metrics)")
    return "\n".join(lines)


def run_bench(args: argparse.Namespace) -> int:
    """Entry point of `tgq bench`; 0 when every request succeeded, 1 otherwise."""
    res = run_load(args.url, api=getattr(args, "api", "tgi"), clients=args.clients,
                   prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, requests=args.requests,
                   duration=args.duration, sample=args.sample, seed=getattr(args, "seed", 1234),
                   progress=not args.no_progress)
    if args.json:
        print(json.dumps(res))
    else:
        print(format_report(res))
    return 0 if res["errors"] == 0 and res["completed"] > 0 else 1


def _parser() -> argparse.ArgumentParser:
    """`python -m bench.client`: the flags of `tgq bench` plus the dialect switch."""
    p = argparse.ArgumentParser(prog="python -m bench.client", description=__doc__.split("\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:3000")
    p.add_argument("--api", choices=("tgi", "openai"), default="tgi")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--requests", type=int, default=0)
    p.add_argument("--duration", type=float, default=30.0)
    p.add_argument("--sample", action="store_true")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    return p


if __name__ == "__main__":
    sys.exit(run_bench(_parser().parse_args()))


__all__ = ["RequestResult", "endpoint", "format_report", "interpret_chat", "make_payload", "make_prompt", "run_bench",
           "run_load"]

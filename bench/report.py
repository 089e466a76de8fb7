"""The suite's table: figures and ratios, formatted."""
from __future__ import annotations

from typing import Any


def _fmt_ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1000:.0f}ms"


def _fmt(x: float | None, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or not b else f"{a / b:.2f}x"


def format_table(res: dict[str, Any]) -> str:
    cfg = res["config"]
    raw = res.get("raw") or {}
    tgq, naive = res.get("tgq") or {}, res.get("naive") or {}
    llq, llb = res.get("llamacpp_q4_1") or {}, res.get("llamacpp_bf16") or {}
    paired = res.get("paired_naive_ratio") or {}
    lines = [f"model {cfg['model']}  device {cfg.get('device', 'cpu')}  dtype {cfg['dtype']}  threads {cfg['threads']}  new tokens {cfg['new_tokens']}  "
             f"prompt ~{cfg['prompt_tokens']} tokens  repeats {cfg['repeats']} (medians)  load avg at start "
             f"{cfg['loadavg_start']}", ""]
    head = (f"{'C':>3} | {'raw loop':>8} {'engine':>7} | {'tgq tok/s':>9} {'TTFT p50':>8} {'ITL p50':>7} "
            f"{'batch':>5} {'RT/step':>7} | {'naive':>6} {'TTFT':>7} | {'llama q4':>8} {'llama bf16':>10} | "
            f"{'/raw':>6} {'/naive':>6} {'/q4':>6} {'/bf16':>6}")
    lines += [head, "-" * len(head)]
    for c in cfg["concurrency"]:
        k = str(c)
        t, n = tgq.get(k) or {}, naive.get(k) or {}
        q, b = llq.get(k) or {}, llb.get(k) or {}
        r = (raw.get("raw_median") or {}).get(k)
        e = (raw.get("engine_median") or {}).get(k)
        tt = t.get("tokens_per_s")
        # tgq / naive: the median of alternating runs' ratios when the suite paired them
        vs_naive = f"{paired[k]['median']:.2f}x" if (paired.get(k) or {}).get("median") else \
            _ratio(tt, n.get("tokens_per_s"))
        lines.append(
            f"{c:>3} | {_fmt(r):>8} {_fmt(e):>7} | {_fmt(tt):>9} {_fmt_ms(t.get('ttft_p50_s')):>8} "
            f"{_fmt_ms(t.get('itl_p50_s')):>7} {_fmt(t.get('batch_max'), '.0f'):>5} "
            f"{_fmt(t.get('round_trips_per_step'), '.2f'):>7} | {_fmt(n.get('tokens_per_s')):>6} "
            f"{_fmt_ms(n.get('ttft_p50_s')):>7} | {_fmt(q.get('tokens_per_s')):>8} {_fmt(b.get('tokens_per_s')):>10} | "
            f"{_ratio(tt, r):>6} {vs_naive:>6} {_ratio(tt, q.get('tokens_per_s')):>6} "
            f"{_ratio(tt, b.get('tokens_per_s')):>6}")
    lines += ["", "raw loop / engine: decode tok/s of the bare batched loop / of tgq's Engine without Redis, at B=C "
              "(prefill excluded); tgq, naive, llama: generated tok/s seen by C streaming clients (wall clock, "
              "prefill and HTTP included). batch: largest tgi_batch_current_size sampled. RT/step: the worker's "
              "Redis round trips (commands or whole pipelines sent, its own count) per prefill/decode step."]
    if paired:
        lines.append("/naive: tgq and the naive baseline ran alternately (tgq, naive, tgq, ...); the median of "
                     "each pair's ratio. Pairs at C=" + "; C=".join(f"{c}: {', '.join(f'{x:.2f}' for x in v['pairs'])}"
                                                         for c, v in paired.items()))
    mem = res.get("memory") or {}
    if mem:
        lines.append(f"memory: {mem.get('completed')} streams of ~{mem.get('prompt_tokens')}+{mem.get('new_tokens')} "
                     f"tokens, errors {mem.get('errors')}, batch max {mem.get('batch_max')}, "
                     f"{_fmt(mem.get('tokens_per_s'))} tok/s, worker peak RSS "
                     f"{(res.get('peak_rss_mib') or {}).get('tgq worker, long rows')} MiB")
    if res.get("llamacpp_server"):
        lines.append(f"llama: {res['llamacpp_server']}")
    scale = res.get("scaleout") or {}
    if scale:
        lines.append("")
        for label, d in scale.items():
            lines.append(f"scale-out {label}: {_fmt(d.get('tokens_per_s'))} tok/s, TTFT p50 "
                         f"{_fmt_ms(d.get('ttft_p50_s'))}, ITL p50 {_fmt_ms(d.get('itl_p50_s'))}, peak RSS/worker "
                         f"{d.get('peak_rss_mib')} MiB")
    rss = res.get("peak_rss_mib") or {}
    if rss:
        lines.append("peak RSS (VmHWM, MiB): " + ", ".join(f"{k} {v}" for k, v in rss.items()))
    t = tgq.get(str(max(cfg["concurrency"]))) or {}
    if t.get("worker_busy_share") is not None:
        lines.append(f"worker busy in prefill/decode steps at C={max(cfg['concurrency'])}: "
                     f"{100 * t['worker_busy_share']:.1f}% of the wall time (the rest: Redis I/O, bookkeeping, idle)")
    if t.get("commands_per_step") is not None:
        lines.append(f"Redis commands per step at C={max(cfg['concurrency'])} (all clients, INFO commandstats): "
                     f"{t['commands_per_step']:.1f}")
    for err in res.get("errors", []):
        lines.append(f"note: {err}")
    return "\n".join(lines)


def _rss_round(values: list[float | None]) -> list[float | None]:
    return [None if v is None else round(v, 1) for v in values]

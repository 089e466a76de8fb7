"""`python -m bench.step_cost`: what one worker step's Redis calls cost Redis's CPU, piece by piece.

A private redis-server pinned to `--cpu` (this process on the other CPUs) and a started registry of
`--rows` leases with RQ's member names. Each figure is Redis's main-thread CPU (`INFO cpu`) per call,
the median of `--runs` runs of `--calls` calls, for:
- PING: one round trip with nothing in it, the floor under any step;
- the step's messages PUBLISHed in one pipeline, with no fence and no flags: the least that any design
  delivering every step's tokens to `--api-processes` subscribers costs, once per step;
- MGET of the rows' cancel flags (what a step reads today);
- ZMSCORE over the rows' leases (the fence, outside a script);
- a script with the step's arguments that does nothing (the cost of passing them to Lua);
- the step itself: `worker.rq_worker.FENCED_STEP` on one step's messages, built by `step_call` from
  `--rows` token events for `--api-processes` reply channels (subscribed, and drained by this process).
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import uuid
from types import SimpleNamespace
from typing import Any, Callable

from .cost_probe import cpu_model


def _redis(cpu: int) -> tuple[subprocess.Popen, Any]:
    import redis

    from common.serve import start_private_redis

    proc, url, _ = start_private_redis()
    os.sched_setaffinity(proc.pid, {cpu})
    rest = set(range(os.cpu_count() or 1)) - {cpu}
    if rest:
        os.sched_setaffinity(0, rest)
    return proc, redis.Redis.from_url(url)


def _step(rows: int, channels: list[str]) -> tuple[list[Any], list[str], list[str], list[Any]]:
    """(FENCED_STEP keys, args, lease members, cancel keys) of one decode step of `rows` rows."""
    from common import protocol
    from common.schemas import Token, TokenEvent
    from worker.rq_worker import step_call

    held, events = {}, []
    for i in range(rows):
        rid = uuid.uuid4().hex
        held[rid] = SimpleNamespace(execution=SimpleNamespace(composite_key=f"{rid}:{uuid.uuid4().hex}"),
                                    job=SimpleNamespace(reply_to=channels[i % len(channels)],
                                                        version=protocol.STEP_VERSION))
        events.append(TokenEvent(rid, 0, 17 + i, Token(1234 + i, " word", -0.6931, False)))
    call = step_call("rq:wip:tgq:bench", events, held)
    return call.keys, call.args, [h.execution.composite_key for h in held.values()], \
        [protocol.cancel_key(rid) for rid in held]


def measure(client: Any, fn: Callable[[], Any], calls: int, runs: int, drain: Callable[[], None]) -> list[float]:
    def cpu() -> float:
        info = client.info("cpu")
        return float(info["used_cpu_sys_main_thread"]) + float(info["used_cpu_user_main_thread"])

    out = []
    for _ in range(runs):
        before = cpu()
        for k in range(calls):
            fn()
            if k % 64 == 63:
                drain()
        out.append(1e6 * (cpu() - before) / calls)
        drain()
    return out


def run(args: argparse.Namespace) -> list[tuple[str, list[float]]]:
    from worker.rq_worker import FENCED_STEP

    proc, r = _redis(args.cpu)
    try:
        channels = [f"tgq:reply:bench-{i}" for i in range(args.api_processes)]
        subs = []
        for ch in channels:
            s = r.pubsub()
            s.subscribe(ch)
            s.get_message(timeout=1)
            subs.append(s)

        def drain() -> None:
            for s in subs:
                while s.get_message(timeout=0):
                    pass

        keys, argv, members, flags = _step(args.rows, channels)
        r.zadd(keys[0], {m: time.time() + 3600 for m in members})
        step = r.script_load(FENCED_STEP)
        noop = r.script_load("return {1, {}}")
        m = int(argv[0])
        messages = argv[m + 2:m + 2 + int(argv[m + 1])]

        def publish_only() -> None:
            pipe = r.pipeline(transaction=False)
            for ch, msg in zip(keys[1:1 + len(messages)], messages):
                pipe.publish(ch, msg)
            pipe.execute()

        pieces: list[tuple[str, Callable[[], Any]]] = [
            ("PING (a round trip)", r.ping),
            (f"{len(channels)} PUBLISH of the step's messages, one pipeline, nothing else", publish_only),
            (f"MGET of {args.rows} cancel flags", lambda: r.mget(flags)),
            (f"ZMSCORE over {args.rows} leases", lambda: r.zmscore(keys[0], members)),
            ("a script that does nothing, with the step's arguments",
             lambda: r.evalsha(noop, len(keys), *keys, *argv)),
            (f"FENCED_STEP: fence + {len(channels)} PUBLISH ({sum(len(a) for a in argv if isinstance(a, bytes))} "
             f"bytes)", lambda: r.evalsha(step, len(keys), *keys, *argv)),
        ]
        return [(name, measure(r, fn, args.calls, args.runs, drain)) for name, fn in pieces]
    finally:
        proc.terminate()
        proc.wait(5)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.step_cost", description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--api-processes", type=int, default=2)
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--cpu", type=int, default=0, help="the CPU redis-server gets")
    args = p.parse_args(argv)
    if min(args.rows, args.api_processes, args.calls, args.runs) < 1:
        raise SystemExit("--rows, --api-processes, --calls and --runs must be positive")
    res = run(args)
    print(f"Redis main-thread CPU per call, median of {args.runs} x {args.calls} calls; {args.rows} rows, "
          f"{args.api_processes} API processes; CPU {cpu_model()} x {os.cpu_count()}, Redis pinned to CPU {args.cpu}")
    print("| call | µs per call | per token at these rows | runs |\n|---|---|---|---|")
    for name, values in res:
        med = statistics.median(values)
        print(f"| {name} | {med:.1f} | {med / args.rows:.2f} | {', '.join(f'{v:.1f}' for v in values)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

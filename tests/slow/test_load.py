"""Load and soak against a real stack (marked slow: CI skips them; run them before a release).

    .venv/bin/python -m pytest -m slow -s tests/slow          # -s prints the figures
    TGQ_SOAK_SECONDS=60 .venv/bin/python -m pytest -m slow -s tests/slow -k soak   # a short soak
"""
from __future__ import annotations

import concurrent.futures as cf
import json
import os
import random
import threading
import time
from dataclasses import dataclass, field

import psutil
import pytest
import redis
import requests

from tests.integration.conftest import make_stack

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STREAMS = int(os.environ.get("TGQ_LOAD_STREAMS", "500"))
SOAK_SECONDS = float(os.environ.get("TGQ_SOAK_SECONDS", "600"))
LIMITS = ("--max-queue-length", "2000")


@pytest.fixture
def load_stack(redis_server, tiny_model_dir):
    redis.Redis.from_url(redis_server.url).flushall()
    stack = make_stack(redis_server.url, tiny_model_dir, workers=0, api_args=LIMITS)  # 2 gevent workers
    stack.add_worker(*LIMITS, "--max-batch-size", "64")
    yield stack
    stack.stop()


def read_stream(url: str, body: dict, opened: threading.Barrier | None) -> list[dict]:
    with requests.post(url, json=body, stream=True, timeout=(30, 600)) as resp:
        assert resp.status_code == 200, resp.text
        if opened is not None:
            opened.wait(120)  # every stream is open (headers received) before any is read
        raw = b"".join(resp.iter_content(chunk_size=None))
    return [json.loads(f[5:]) for f in raw.split(b"\n\n") if f.startswith(b"data:")]


def test_500_concurrent_streams_complete(load_stack):
    body = {"inputs": "many at once", "parameters": {"max_new_tokens": 16, "details": True}}
    opened = threading.Barrier(STREAMS)
    started = time.monotonic()
    with cf.ThreadPoolExecutor(STREAMS) as pool:
        futures = [pool.submit(read_stream, load_stack.url + "/generate_stream", body, opened)
                   for _ in range(STREAMS)]
        results = [f.result() for f in futures]
    duration = time.monotonic() - started
    complete = [ev for ev in results if ev and "details" in ev[-1] and ev[-1]["details"]
                and ev[-1]["details"]["generated_tokens"] == len(ev) == 16]
    print(f"\n{STREAMS} concurrent streams: {len(complete)} complete in {duration:.1f} s")
    assert len(complete) == STREAMS, [ev[-1] for ev in results if ev not in complete][:3]
    assert requests.get(load_stack.url + "/metrics", timeout=10).status_code == 200


# ---- soak -------------------------------------------------------------------------------------

@dataclass
class Tally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, what: str) -> None:
        with self.lock:
            self.counts[what] = self.counts.get(what, 0) + 1


def one_request(url: str, rng: random.Random, tally: Tally) -> None:
    kind = rng.choice(["generate", "details", "stream", "stream", "abort", "invalid", "best_of"])
    params: dict = {"max_new_tokens": rng.randint(1, 40)}
    if kind == "details":
        params["details"] = True
    if kind == "best_of":
        params.update(best_of=2, do_sample=True)
    if kind == "invalid":
        params["top_k"] = 0
    body = {"inputs": "soak " * rng.randint(1, 50), "parameters": params}
    if kind == "stream":
        events = read_stream(url + "/generate_stream", body, None)
        tally.add("stream_ok" if "details" in events[-1] else "stream_error")
    elif kind == "abort":
        try:
            requests.post(url + "/generate", json=dict(body, parameters={"max_new_tokens": 400}), timeout=(5, 0.2))
            tally.add("abort_finished_first")
        except requests.exceptions.ReadTimeout:
            tally.add("abort")
    else:
        tally.add(f"{kind}_{requests.post(url + '/generate', json=body, timeout=60).status_code}")


def processes(stack) -> dict[str, psutil.Process]:
    api = psutil.Process(stack.api.proc.pid)
    named = {"api master": api}
    for i, child in enumerate(sorted(api.children(), key=lambda p: p.pid)):
        named[f"api worker {i + 1}"] = child
    for i, w in enumerate(stack.workers):
        named[f"worker {i + 1}"] = psutil.Process(w.proc.pid)
    return named


def test_soak_rss_stays_flat(load_stack):
    """Mixed traffic for TGQ_SOAK_SECONDS (default 10 min); RSS after warm-up must stay flat."""
    procs = processes(load_stack)
    assert len(procs) == 4, procs
    warmup = min(60.0, SOAK_SECONDS / 5)
    samples: dict[str, list[float]] = {name: [] for name in procs}
    tally, stop = Tally(), threading.Event()

    def client(seed: int) -> None:
        rng = random.Random(seed)
        while not stop.is_set():
            one_request(load_stack.url, rng, tally)

    started = time.monotonic()
    with cf.ThreadPoolExecutor(12) as pool:
        clients = [pool.submit(client, seed) for seed in range(12)]
        baseline: dict[str, float] = {}
        while time.monotonic() - started < SOAK_SECONDS:
            time.sleep(5)
            for name, p in procs.items():
                samples[name].append(p.memory_info().rss / 2**20)
            if not baseline and time.monotonic() - started >= warmup:
                baseline = {name: s[-1] for name, s in samples.items()}
        stop.set()
        for c in clients:
            c.result()
    print(f"\nsoak {SOAK_SECONDS:.0f} s, {sum(tally.counts.values())} requests: {dict(sorted(tally.counts.items()))}")
    print(f"{'process':<14}{'start MiB':>10}{'after warm-up':>15}{'end MiB':>10}{'peak MiB':>10}")
    for name, s in samples.items():
        print(f"{name:<14}{s[0]:>10.1f}{baseline[name]:>15.1f}{s[-1]:>10.1f}{max(s):>10.1f}")
    assert not [k for k in tally.counts if k.endswith(("_500", "_502", "_503", "_424")) or k == "stream_error"]
    assert tally.counts.get("invalid_422", 0) > 0 and tally.counts.get("stream_ok", 0) > 0
    for name, s in samples.items():
        growth = s[-1] - baseline[name]
        assert growth < max(48.0, 0.25 * baseline[name]), f"{name}: RSS grew {growth:.1f} MiB after warm-up"
    assert all(w.alive() for w in load_stack.workers) and load_stack.api.alive()

"""The Grafana dashboard's sums against a real fleet: two API processes (gunicorn, two workers each) and two
`tgq worker`s on one redis-server. Every endpoint is scraped as Prometheus would (adding `job` and
`instance`), each panel's PromQL is evaluated over the samples by a small evaluator for the forms the
dashboard uses, and the values are compared with the truth: requests sent, failures made, what Redis says.
"""
from __future__ import annotations

import json
import math
import os
import re
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
import requests

from common import protocol
from tests.support.processes import (
    start_api,
    start_worker,
    wait_http,
    wait_worker_ready,
)
from tests.support.redis_server import free_port

from .conftest import MODEL_ID

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "dashboards" / "tgq.json"
WINDOW_S = 60.0  # what $__rate_interval stands for here; rate() is the increase between two scrapes / this

# -- scraping ------------------------------------------------------------------------------------------

Labels = tuple[tuple[str, str], ...]  # sorted, includes __name__
Snapshot = dict[Labels, float]

_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_exposition(text: str, target: dict[str, str]) -> Snapshot:
    out: Snapshot = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        assert m, line
        labels = dict(_LABEL.findall(m.group(2) or ""))
        labels.update(target)  # Prometheus's target labels (honor_labels false: no clash here anyway)
        labels["__name__"] = m.group(1)
        out[tuple(sorted(labels.items()))] = float(m.group(3))
    return out


def scrape(targets: list[dict[str, str]]) -> Snapshot:
    snap: Snapshot = {}
    for t in targets:
        text = requests.get(f"http://{t['instance']}/metrics", timeout=10).text
        snap.update(parse_exposition(text, t))
    return snap


# -- a PromQL evaluator for the dashboard's forms ------------------------------------------------------

_TOKEN = re.compile(r'\s*(?:(?P<num>\d+(?:\.\d+)?)|(?P<str>"(?:[^"\\]|\\.)*")|(?P<dur>\[[^\]]+\])'
                    r'|(?P<id>[a-zA-Z_:][a-zA-Z0-9_:]*)|(?P<op>==|!=|=~|[-+*/(){},=]))')
AGGS = {"sum": sum, "max": max, "min": min, "count": len}

Vector = dict[Labels, float]


def _strip(labels: Labels, drop: set[str] | None = None, keep: set[str] | None = None) -> Labels:
    return tuple((k, v) for k, v in labels if k != "__name__" and (keep is None or k in keep)
                 and (drop is None or k not in drop))


class Evaluator:
    def __init__(self, before: Snapshot, after: Snapshot, window_s: float = WINDOW_S) -> None:
        self.before, self.after, self.window_s = before, after, window_s

    def eval(self, expr: str) -> Vector:
        expr = expr.replace("$__rate_interval", f"{int(self.window_s)}s")
        self.toks = [(m.lastgroup, m.group(m.lastgroup)) for m in _TOKEN.finditer(expr) if m.lastgroup]
        assert "".join(v for _, v in self.toks).replace(" ", "") == expr.replace(" ", ""), expr
        self.i = 0
        out = self._or()
        assert self.i == len(self.toks), f"unparsed tail in {expr}"
        return out

    # tokens
    def _peek(self, k: int = 0) -> str | None:
        return self.toks[self.i + k][1] if self.i + k < len(self.toks) else None

    def _take(self, want: str | None = None) -> str:
        tok = self.toks[self.i][1]
        assert want is None or tok == want, f"expected {want}, got {tok}"
        self.i += 1
        return tok

    def _labels(self) -> list[str]:
        self._take("(")
        names = []
        while self._peek() != ")":
            names.append(self._take())
            if self._peek() == ",":
                self._take()
        self._take(")")
        return names

    # grammar: or > additive > multiplicative > primary
    def _or(self) -> Vector:
        left = self._add()
        while self._peek() == "or":
            self._take()
            on = set(self._labels()) if self._peek() == "on" and self._take() else None
            right = self._add()
            seen = {_strip(k, keep=on) for k in left}
            left = {**left, **{k: v for k, v in right.items() if _strip(k, keep=on) not in seen}}
        return left

    def _add(self) -> Vector:
        left = self._mul()
        while self._peek() in ("+", "-"):
            op = self._take()
            left = self._binary(op, left)
        return left

    def _mul(self) -> Vector:
        left = self._primary()
        while self._peek() in ("*", "/"):
            op = self._take()
            left = self._binary(op, left, mul=True)
        return left

    def _binary(self, op: str, left: Vector, mul: bool = False) -> Vector:
        on = extra = None
        if self._peek() == "on":
            self._take()
            on = set(self._labels())
        if self._peek() == "group_left":
            self._take()
            extra = set(self._labels())
        right = self._primary() if mul else self._mul()
        fn = {"+": float.__add__, "-": float.__sub__, "*": float.__mul__, "/": float.__truediv__}[op]
        sig = (lambda ls: _strip(ls, keep=on)) if on is not None else (lambda ls: _strip(ls))
        by_sig = {}
        for k, v in right.items():
            assert sig(k) not in by_sig, "many-to-many match"
            by_sig[sig(k)] = (k, v)
        out: Vector = {}
        for k, v in left.items():
            if sig(k) in by_sig:
                rk, rv = by_sig[sig(k)]
                labels = dict(_strip(k))
                labels.update({n: val for n, val in rk if n in (extra or set())})
                out[tuple(sorted(labels.items()))] = fn(float(v), float(rv))
        return out

    def _primary(self) -> Vector:
        kind, tok = self.toks[self.i]
        if tok == "(":
            self._take()
            out = self._or()
            self._take(")")
            return out
        if tok in AGGS:
            self._take()
            by = set(self._labels()) if self._peek() == "by" and self._take() else set()
            self._take("(")
            inner = self._or()
            self._take(")")
            groups: dict[Labels, list[float]] = {}
            for k, v in inner.items():
                groups.setdefault(_strip(k, keep=by), []).append(v)
            return {k: float(AGGS[tok](vs)) for k, vs in groups.items()}
        if tok in ("rate", "increase"):
            self._take()
            self._take("(")
            name, matchers = self._selector()
            dur = self._take()
            self._take(")")
            seconds = _seconds(dur[1:-1])
            out = {}
            for k, v in self._select(self.after, name, matchers).items():
                inc = v - self.before.get(k, 0.0)
                out[_strip(k)] = inc / seconds if tok == "rate" else inc
            return out
        if tok == "histogram_quantile":
            self._take()
            self._take("(")
            phi = float(self._take())
            self._take(",")
            inner = self._or()
            self._take(")")
            return histogram_quantile(phi, inner)
        if kind == "id":
            name, matchers = self._selector()
            return {k: v for k, v in self._select(self.after, name, matchers).items()}
        raise AssertionError(f"unsupported token {tok}")

    def _selector(self) -> tuple[str, dict[str, str]]:
        name = self._take()
        matchers: dict[str, str] = {}
        if self._peek() == "{":
            self._take()
            while self._peek() != "}":
                label = self._take()
                self._take("=")
                matchers[label] = json.loads(self._take())
                if self._peek() == ",":
                    self._take()
            self._take("}")
        return name, matchers

    @staticmethod
    def _select(snap: Snapshot, name: str, matchers: dict[str, str]) -> Vector:
        want = {"__name__": name, **matchers}
        return {k: v for k, v in snap.items() if all(dict(k).get(n) == val for n, val in want.items())}


def _seconds(dur: str) -> float:
    return float(dur[:-1]) * {"s": 1, "m": 60, "h": 3600}[dur[-1]]


def histogram_quantile(phi: float, buckets: Vector) -> Vector:
    """Prometheus's bucketQuantile: linear interpolation inside the bucket the rank falls in."""
    series: dict[Labels, list[tuple[float, float]]] = {}
    for k, v in buckets.items():
        le = dict(k)["le"]
        series.setdefault(_strip(k, drop={"le"}), []).append((math.inf if le == "+Inf" else float(le), v))
    out: Vector = {}
    for k, bs in series.items():
        bs.sort()
        total = bs[-1][1]
        if total == 0:
            out[k] = math.nan
            continue
        rank = phi * total
        prev_bound, prev_count = 0.0, 0.0
        for bound, count in bs:
            if count >= rank:
                if math.isinf(bound):
                    out[k] = prev_bound
                else:
                    out[k] = prev_bound + (bound - prev_bound) * (rank - prev_count) / (count - prev_count)
                break
            prev_bound, prev_count = bound, count
    return out


def panel_exprs() -> dict[str, list[str]]:
    dash = json.loads(DASHBOARD.read_text())
    return {p["title"]: [t["expr"] for t in p["targets"]] for p in dash["panels"]}


def only(vector: Vector) -> float:
    assert len(vector) == 1, vector
    return next(iter(vector.values()))


# -- the fleet -----------------------------------------------------------------------------------------

@dataclass
class Fleet:
    redis_url: str
    api_urls: list[str]
    targets: list[dict[str, str]]  # Prometheus's view: job and instance of each endpoint
    workers: list


@pytest.fixture(scope="module")
def fleet(redis_server, tiny_model_dir):
    redis.Redis.from_url(redis_server.url).flushall()
    procs, api_urls, targets = [], [], []
    try:
        for _ in range(2):
            api, url = start_api(redis_server.url, tiny_model_dir, "--model-id", MODEL_ID)  # --workers 2
            procs.append(api)
            api_urls.append(url)
            targets.append({"job": "tgq-api", "instance": url.removeprefix("http://")})
        workers = []
        for _ in range(2):
            port = free_port()
            w = start_worker(redis_server.url, tiny_model_dir, "--model-id", MODEL_ID, "--metrics-port", str(port))
            procs.append(w)
            workers.append(w)
            targets.append({"job": "tgq-worker", "instance": f"127.0.0.1:{port}"})
        wait_worker_ready(redis.Redis.from_url(redis_server.url), workers)
        for url in api_urls:
            wait_http(url, procs)
        for t in targets[2:]:
            wait_http(f"http://{t['instance']}", procs)
        yield Fleet(redis_server.url, api_urls, targets, workers)
    finally:
        for p in procs:
            p.stop(40)


def test_panels_sum_to_the_truth(fleet):
    f, workers = fleet, fleet.workers
    conn = redis.Redis.from_url(f.redis_url)
    before = scrape(f.targets)
    exprs = panel_exprs()

    # Traffic spread over both API processes (and over both gunicorn workers of each).
    ok, bad, tokens = 12, 3, 5
    session = requests.Session()
    for i in range(ok):
        r = session.post(f.api_urls[i % 2] + "/generate",
                         json={"inputs": f"hello {i}", "parameters": {"max_new_tokens": tokens}}, timeout=60)
        assert r.status_code == 200, r.text
    for i in range(bad):
        r = session.post(f.api_urls[i % 2] + "/generate",
                         json={"inputs": "hello", "parameters": {"temperature": -1}}, timeout=60)
        assert r.status_code == 422
    after = scrape(f.targets)
    ev = Evaluator(before, after)

    # every series the dashboard queries exists in the fleet's scrapes (tgq_model_queue_size only
    # appears when an API serves several models; tests/unit/test_dashboard.py covers that case)
    names = {dict(k)["__name__"] for k in after}
    for title, es in exprs.items():
        for e in es:
            for name in re.findall(r"\b((?:tgi|tgq)_[a-z0-9_]+)", e):
                assert name in names or name == "tgq_model_queue_size", f"{title}: {name} not exported"

    window = WINDOW_S
    requests_panel = [only(ev.eval(e)) * window for e in exprs["Requests"]]
    assert requests_panel == pytest.approx([ok + bad, ok])
    failures = {dict(k)["err"]: v * window for k, v in ev.eval(exprs["Failures by err"][0]).items()}
    assert failures == pytest.approx({"validation": bad})

    # generated tokens: the API's sum equals what the requests returned; decode steps: the workers'
    # counters summed equal the cluster-wide hash in Redis (which every API replica also exports).
    generated = sum(v for k, v in after.items() if dict(k)["__name__"] == "tgi_request_generated_tokens_sum")
    tok_s, req_s, decode_s = (only(ev.eval(e)) * window for e in exprs["Throughput"])
    assert tok_s == pytest.approx(generated) and 0 < generated <= ok * tokens
    assert req_s == pytest.approx(ok)
    batch_hash = {k.decode(): float(v) for k, v in conn.hgetall(protocol.batch_metrics_key(MODEL_ID)).items()}
    decode_before = sum(v for k, v in before.items() if dict(k).get("__name__") == "tgi_batch_inference_count"
                        and dict(k)["job"] == "tgq-worker" and dict(k)["method"] == "decode")
    assert decode_s + decode_before == pytest.approx(batch_hash["inference_count:decode"])
    per_worker = [v for k, v in after.items() if dict(k)["__name__"] == "tgi_batch_inference_count"
                  and dict(k)["job"] == "tgq-worker" and dict(k)["method"] == "prefill"]
    assert len(per_worker) == 2 and all(v > 0 for v in per_worker)  # both workers served
    # a naive sum over every job would count each decode step three times (two API replicas + workers)
    naive = sum(v for k, v in after.items() if dict(k)["__name__"] == "tgi_batch_inference_count"
                and dict(k)["method"] == "decode")
    assert naive == pytest.approx(3 * batch_hash["inference_count:decode"])

    # quantile panels: finite, positive, from histograms holding every request / every forward
    for title in ("Time to first token", "Inter-token latency", "Request duration", "Input and generated length"):
        for e in exprs[title]:
            value = only(ev.eval(e))
            assert math.isfinite(value) and value > 0, (title, e, value)
    queued = ev.eval('sum by (le) (rate(tgi_request_queue_duration_bucket{job="tgq-api"}[1m]))')
    assert max(queued.values()) * window == pytest.approx(ok)

    assert ev.eval(exprs["Workers per model"][0]) == {(("model", MODEL_ID),): 2.0}

    # queue size: with both workers stopped, requests wait in the RQ list; both API replicas report its
    # length and the panel (max over replicas) shows it once
    waiting = 4
    for w in workers:
        os.kill(w.proc.pid, signal.SIGSTOP)
    threads = []
    try:
        for i in range(waiting):
            t = threading.Thread(target=requests.post, args=(f.api_urls[i % 2] + "/generate",),
                                 kwargs={"json": {"inputs": "queued", "parameters": {"max_new_tokens": 2}},
                                         "timeout": 60})
            t.start()
            threads.append(t)
        # a stopped worker's blocking pop is still served by Redis, so each may hold one job: the truth is LLEN
        queue_key = f"rq:queue:{protocol.queue_name(MODEL_ID)}"
        deadline = time.monotonic() + 20
        readings: list[int] = []
        while time.monotonic() < deadline and not (len(readings) >= 10 and len(set(readings[-10:])) == 1):
            readings.append(conn.llen(queue_key))
            time.sleep(0.05)
        length = conn.llen(queue_key)
        assert length >= waiting - len(workers)
        snap = scrape([t for t in f.targets if t["job"] == "tgq-api"])  # stopped workers cannot answer
        assert conn.llen(queue_key) == length
        queue = Evaluator(before, snap).eval(exprs["Queue size"][0])
        assert only(queue) == length
        assert sum(v for k, v in snap.items() if dict(k)["__name__"] == "tgi_queue_size") == 2 * length
    finally:
        for w in workers:
            os.kill(w.proc.pid, signal.SIGCONT)
    for t in threads:
        t.join(60)


def test_batch_size_is_the_sum_over_workers(fleet):
    """While long generations run on both workers, the panel equals the sum of the workers' batch keys in
    Redis (read right after the scrape; retried until the batches hold still for one reading)."""
    f = fleet
    conn = redis.Redis.from_url(f.redis_url)
    expr = panel_exprs()["Batch size"][0]
    threads = [threading.Thread(target=requests.post, args=(f.api_urls[i % 2] + "/generate",),
                                kwargs={"json": {"inputs": f"long {i}", "parameters": {"max_new_tokens": 400}},
                                        "timeout": 120}) for i in range(6)]
    for t in threads:
        t.start()
    try:
        agreed = None
        deadline = time.monotonic() + 60
        while agreed is None and time.monotonic() < deadline:
            keys = list(conn.scan_iter(match=protocol.worker_batch_pattern(MODEL_ID)))
            before_redis = sum(float(v) for v in conn.mget(keys) if v is not None) if keys else 0
            snap = scrape(f.targets)
            keys = list(conn.scan_iter(match=protocol.worker_batch_pattern(MODEL_ID)))
            after_redis = sum(float(v) for v in conn.mget(keys) if v is not None) if keys else 0
            panel = Evaluator(snap, snap).eval(expr)
            per_worker = [v for k, v in snap.items() if dict(k)["__name__"] == "tgi_batch_current_size"
                          and dict(k)["job"] == "tgq-worker"]
            if (before_redis == after_redis and after_redis > 0 and len(keys) == 2
                    and panel.get((("model", MODEL_ID),)) == after_redis and min(per_worker) > 0):
                agreed = (panel, per_worker, snap)
            time.sleep(0.05)
        assert agreed is not None, "never saw both workers busy with a stable batch size"
        panel, per_worker, snap = agreed
        assert only(panel) == sum(per_worker)
        # each API replica exports the same cluster-wide sum: the naive sum over every job triples it
        api_copies = [v for k, v in snap.items() if dict(k)["__name__"] == "tgi_batch_current_size"
                      and dict(k)["job"] == "tgq-api"]
        assert len(api_copies) == 2
    finally:
        for t in threads:
            t.join(180)

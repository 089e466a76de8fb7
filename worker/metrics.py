"""Worker-local TGI batch metrics, exported on the worker's port and handed to the sink as Redis increments."""
from __future__ import annotations

import threading
from typing import Callable, Iterator

from prometheus_client.core import Metric
from prometheus_client.registry import Collector, CollectorRegistry

from common.metrics_spec import batch_size_buckets, bucket_index, duration_buckets

METHODS = ("prefill", "decode")


def _le(bound: float) -> str:
    """Rust f64 Display, as TGI renders bucket bounds: `10` not `10.0`, shortest round-trip otherwise."""
    if bound == float("inf"):
        return "+Inf"
    return str(int(bound)) if bound.is_integer() else repr(bound)


class _Histogram:
    """Plain per-bucket counts (non-cumulative, +Inf last) with sum and count."""

    def __init__(self, layout: list[float]) -> None:
        self.layout = layout
        self.counts = [0] * (len(layout) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> int:
        i = bucket_index(self.layout, value)
        self.counts[i] += 1
        self.sum += value
        self.count += 1
        return i

    def samples(self, name: str, labels: dict[str, str]) -> Iterator[tuple[str, dict[str, str], float]]:
        running = 0
        for bound, n in zip(self.layout + [float("inf")], self.counts):
            running += n
            le = _le(bound)
            yield f"{name}_bucket", {**labels, "le": le}, float(running)
        yield f"{name}_sum", labels, self.sum
        yield f"{name}_count", labels, float(self.count)


def prefix_cache_families(tokens: dict[str, float]) -> Iterator[Metric]:
    """tgq_prefix_cache_{hit,miss}_tokens_total from the counts {"hit": n, "miss": n}."""
    for kind, what in (("hit", "held by the prefix cache"), ("miss", "computed with the prefix cache on")):
        family = Metric(f"tgq_prefix_cache_{kind}_tokens", f"Prompt tokens {what}", "counter")
        family.add_sample(f"tgq_prefix_cache_{kind}_tokens_total", {}, float(tokens.get(kind, 0.0)))
        yield family


MASK_FAMILY = "tgq_grammar_mask_duration"
MASK_HELP = "Seconds per step spent computing the output constraints' allowed-token masks"


def _mask_family(samples) -> Metric:  # type: ignore[no-untyped-def]
    family = Metric(MASK_FAMILY, MASK_HELP, "histogram")
    for name, labels, value in samples(MASK_FAMILY, {}):
        family.add_sample(name, labels, value)
    return family


class EngineMetrics(Collector):
    """Records batch figures once; exposes them as TGI-named families and as pending Redis hash increments."""

    def __init__(self, max_batch_size: int, registry: CollectorRegistry | None = None, model: str = "") -> None:
        self._lock = threading.Lock()
        self.model = model  # exported as tgq_worker_info{model}: dashboards count workers per model with it
        self.current_size = 0
        self._next_size = _Histogram(batch_size_buckets(max_batch_size))
        self._counts = {(kind, m): 0 for kind in ("count", "success", "failure") for m in METHODS}
        self._durations = {m: _Histogram(duration_buckets()) for m in METHODS}
        self._pending: dict[str, float] = {}
        self.prefix_tokens = {"hit": 0, "miss": 0}  # prompt tokens the prefix cache held / did not hold
        self._mask = _Histogram(duration_buckets())  # per step: the output constraints' masks
        self.round_trips: Callable[[], int] | None = None  # the worker's Redis round trips so far, if counted
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def _add(self, field: str, value: float) -> None:
        self._pending[field] = self._pending.get(field, 0.0) + value

    def set_current_size(self, size: int) -> None:
        """tgi_batch_current_size: set before each decode step, 0 when the batch drains."""
        with self._lock:
            self.current_size = size

    def observe_next_size(self, size: int) -> None:
        """tgi_batch_next_size: the number of requests that form (or join) a batch."""
        with self._lock:
            i = self._next_size.observe(float(size))
            self._add("next_size_sum", float(size))
            self._add("next_size_count", 1.0)
            self._add(f"next_size_bucket:{i}", 1.0)

    def observe_inference(self, method: str, seconds: float, ok: bool) -> None:
        """One prefill or decode forward: count, success/failure and (successful) duration."""
        with self._lock:
            self._counts[("count", method)] += 1
            self._add(f"inference_count:{method}", 1.0)
            outcome = "success" if ok else "failure"
            self._counts[(outcome, method)] += 1
            self._add(f"inference_{outcome}:{method}", 1.0)
            if ok:
                i = self._durations[method].observe(seconds)
                self._add(f"inference_duration_sum:{method}", seconds)
                self._add(f"inference_duration_bucket:{method}:{i}", 1.0)

    def observe_prefix_cache(self, hit: int, miss: int) -> None:
        """Prompt tokens whose keys and values a paged prefix cache held (hit) or that were computed (miss)."""
        with self._lock:
            for kind, n in (("hit", hit), ("miss", miss)):
                if n:
                    self.prefix_tokens[kind] += n
                    self._add(f"prefix_cache_{kind}_tokens", float(n))

    def observe_grammar_mask(self, seconds: float) -> None:
        """One step's time computing the allowed-token masks of its constrained rows."""
        with self._lock:
            i = self._mask.observe(seconds)
            self._add("grammar_mask_duration_sum", seconds)
            self._add(f"grammar_mask_duration_bucket:{i}", 1.0)

    def take_increments(self) -> dict[str, float]:
        """Hash-field increments since the last call (see common.metrics_spec); the sink HINCRBYFLOATs them
        in the same pipeline as the step's events, so reporting costs no extra round trip."""
        with self._lock:
            out, self._pending = self._pending, {}
        return out

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            gauge = Metric("tgi_batch_current_size", "Current batch size", "gauge")
            gauge.add_sample("tgi_batch_current_size", {}, float(self.current_size))
            yield gauge
            if self._next_size.count:
                hist = Metric("tgi_batch_next_size", "Batch size of newly formed batches", "histogram")
                for name, labels, value in self._next_size.samples("tgi_batch_next_size", {}):
                    hist.add_sample(name, labels, value)
                yield hist
            for kind in ("count", "success", "failure"):
                name = f"tgi_batch_inference_{kind}"
                # "unknown", not "counter": prometheus_client would rename a counter family to *_total,
                # and TGI's names have no suffix.
                family = Metric(name, f"Batch inference {kind} (a counter)", "unknown")
                for m in METHODS:
                    if self._counts[("count", m)]:
                        family.add_sample(name, {"method": m}, float(self._counts[(kind, m)]))
                if family.samples:
                    yield family
            dur = Metric("tgi_batch_inference_duration", "Batch inference duration", "histogram")
            for m in METHODS:
                if self._durations[m].count:
                    for name, labels, value in self._durations[m].samples("tgi_batch_inference_duration",
                                                                          {"method": m}):
                        dur.add_sample(name, labels, value)
            if dur.samples:
                yield dur
            if any(self.prefix_tokens.values()):
                yield from prefix_cache_families(self.prefix_tokens)
            if self._mask.count:
                yield _mask_family(self._mask.samples)
        if self.model:
            info = Metric("tgq_worker_info", "1 per live worker process, labelled with the model it serves",
                          "gauge")
            info.add_sample("tgq_worker_info", {"model": self.model}, 1.0)
            yield info
        if self.round_trips is not None:
            trips = Metric("tgq_worker_redis_round_trips", "Redis round trips of this worker process "
                           "(a command or a whole pipeline is one)", "counter")
            trips.add_sample("tgq_worker_redis_round_trips_total", {}, float(self.round_trips()))
            yield trips

"""TGI 0.5.0's Prometheus families, correct across gunicorn processes and across replicas.

Request families are recorded by each API process through prometheus-client; under gunicorn they
live in `PROMETHEUS_MULTIPROC_DIR` and every scrape merges all processes' files. Queue and batch
families describe the whole cluster, so they are read from Redis at scrape time:
  tgi_queue_size          LLEN of the model's RQ queue (what the 429 check counts)
  tgi_batch_current_size  sum of the workers' `protocol.worker_batch_key` values
  tgi_batch_next_size, tgi_batch_inference_*   the hash `protocol.batch_metrics_key` (metrics_spec)
TGI's families describe the default (first) model. With several models served, tgq adds its own
per-model gauges beside them, labelled `model`: tgq_model_queue_size, tgq_model_batch_current_size.
The text is rendered here rather than by prometheus-client so that names, `le` values and number
formats match metrics-exporter-prometheus 0.11 (TGI): counters without `_total`, `le="10"` not
`le="10.0"`, no `_created` samples, and a family only once it has been observed.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Iterable, Sequence

import redis
from prometheus_client import CollectorRegistry, Counter, Histogram, values
from prometheus_client.multiprocess import MultiProcessCollector

from common import metrics_spec, protocol
from common.settings import LimitSettings

from .timing import Timing

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; charset=utf-8"
DEFAULT_BATCH_BUCKETS = 32  # worker --max-batch-size default; grown if a worker reports larger batches
METHODS = ("prefill", "decode")


def rust_number(x: float) -> str:
    """f64 Display as Rust prints it: shortest round trip, no exponent, `10` not `10.0`."""
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    if math.isnan(x):
        return "NaN"
    if x == int(x) and abs(x) < 1e17:
        return str(int(x))
    return format(Decimal(repr(x)), "f")


@dataclass
class Family:
    name: str
    kind: str  # counter | gauge | histogram
    samples: list[tuple[str, dict[str, str], float]] = field(default_factory=list)


def render(families: Iterable[Family]) -> bytes:
    order = {"counter": 0, "gauge": 1, "histogram": 2}
    lines: list[str] = []
    for fam in sorted(families, key=lambda f: (order[f.kind], f.name)):
        lines.append(f"# TYPE {fam.name} {fam.kind}")
        for name, labels, value in fam.samples:
            label_text = ",".join(f'{k}="{v}"' for k, v in labels.items())
            lines.append(f"{name}{{{label_text}}} {rust_number(value)}" if label_text
                         else f"{name} {rust_number(value)}")
        lines.append("")
    return ("\n".join(lines) + "\n").encode() if lines else b""


class Metrics:
    """The API process's request metrics and the `/metrics` scrape."""

    def __init__(self, limits: LimitSettings, multiproc_dir: str | None = None) -> None:
        self.multiproc_dir = multiproc_dir
        if multiproc_dir:
            # prometheus-client picks its value store when first imported; make sure this process
            # writes to the shared directory even if it was imported before the variable was set.
            if not isinstance(values.ValueClass, type) or values.ValueClass.__name__ != "MmapedValue":
                values.ValueClass = values.MultiProcessValue()
            registry: CollectorRegistry | None = None
        else:
            registry = CollectorRegistry(auto_describe=True)
        self._registry = registry
        durations = metrics_spec.duration_buckets()
        tokens = metrics_spec.total_tokens_buckets(limits.max_total_tokens)

        def counter(name: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(name, name, labels, registry=registry)

        def histogram(name: str, buckets: list[float]) -> Histogram:
            return Histogram(name, name, buckets=buckets, registry=registry)

        self.request_count = counter("tgi_request_count")
        self.request_success = counter("tgi_request_success")
        self.request_failure = counter("tgi_request_failure", ("err",))
        self.request_duration = histogram("tgi_request_duration", durations)
        self.validation_duration = histogram("tgi_request_validation_duration", durations)
        self.queue_duration = histogram("tgi_request_queue_duration", durations)
        self.inference_duration = histogram("tgi_request_inference_duration", durations)
        self.time_per_token = histogram("tgi_request_mean_time_per_token_duration", durations)
        self.generated_tokens = histogram("tgi_request_generated_tokens", tokens)
        self.input_length = histogram("tgi_request_input_length",
                                      metrics_spec.input_length_buckets(limits.max_input_length))
        self.max_new_tokens = histogram("tgi_request_max_new_tokens", tokens)

    def failure(self, err: str) -> None:
        self.request_failure.labels(err=err).inc()

    def validated(self, input_length: int, max_new_tokens: int, copies: int) -> None:
        """TGI records these during validation, once per best_of copy."""
        for _ in range(copies):
            self.input_length.observe(input_length)
            self.max_new_tokens.observe(max_new_tokens)

    def succeeded(self, timing: Timing, generated_tokens: int) -> None:
        self.request_duration.observe(timing.total)
        self.validation_duration.observe(timing.validation)
        self.queue_duration.observe(timing.queue)
        self.inference_duration.observe(timing.inference)
        self.time_per_token.observe(timing.per_token(generated_tokens))
        self.generated_tokens.observe(generated_tokens)
        self.request_success.inc()

    # scrape ------------------------------------------------------------------------------------

    def scrape(self, client: redis.Redis, models: Sequence[tuple[str, str]]) -> bytes:
        """The exposition text; `models` holds each served model's (id, Redis list of its RQ queue),
        the default model first."""
        families = list(self._local_families())
        try:
            families.extend(self._redis_families(client, models))
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            log.warning("metrics: Redis unreachable, queue and batch families left out: %s", exc)
        return render(families)

    def _local_families(self) -> Iterable[Family]:
        if self.multiproc_dir:
            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=self.multiproc_dir)
        else:
            registry = self._registry or CollectorRegistry()
        for metric in registry.collect():
            fam = Family(metric.name, metric.type)
            for s in metric.samples:
                if s.name.endswith("_created"):
                    continue
                name = s.name[: -len("_total")] if metric.type == "counter" and s.name.endswith("_total") else s.name
                labels = dict(s.labels)
                if "le" in labels:
                    le = labels.pop("le")
                    labels["le"] = "+Inf" if le == "+Inf" else rust_number(float(le))
                fam.samples.append((name, labels, s.value))
            if metric.type == "histogram":
                fam.samples.sort(key=_histogram_order)
            # a family only appears once something was observed, as with metrics-exporter-prometheus
            observed = [v for n, _, v in fam.samples if n == metric.name or n.endswith("_count")]
            if any(v for v in observed):
                yield fam

    def _redis_families(self, client: redis.Redis, models: Sequence[tuple[str, str]]) -> Iterable[Family]:
        pipe = client.pipeline(transaction=False)
        for _, queue_key in models:
            pipe.llen(queue_key)
        pipe.hgetall(protocol.batch_metrics_key(models[0][0]))
        *queue_lens, batch_hash = pipe.execute()
        current = [_current_batch(client, model_id) for model_id, _ in models]
        yield Family("tgi_queue_size", "gauge", [("tgi_queue_size", {}, float(queue_lens[0]))])
        yield Family("tgi_batch_current_size", "gauge", [("tgi_batch_current_size", {}, current[0])])
        fields = {_text(k): _number(v) for k, v in batch_hash.items()}
        yield from _batch_families(fields)
        if len(models) > 1:
            ids = [model_id for model_id, _ in models]
            yield Family("tgq_model_queue_size", "gauge", [
                ("tgq_model_queue_size", {"model": i}, float(n)) for i, n in zip(ids, queue_lens)])
            yield Family("tgq_model_batch_current_size", "gauge", [
                ("tgq_model_batch_current_size", {"model": i}, n) for i, n in zip(ids, current)])


def _current_batch(client: redis.Redis, model_id: str) -> float:
    """Sum of the live workers' current batch sizes (their keys expire when they die)."""
    batch_keys = list(client.scan_iter(match=protocol.worker_batch_pattern(model_id), count=500))
    current = 0.0
    if batch_keys:
        for value in client.mget(batch_keys):
            if value is not None:
                try:
                    current += float(value)
                except ValueError:
                    continue
    return current


def _histogram_order(sample: tuple[str, dict[str, str], float]) -> tuple[object, ...]:
    """Per label set: buckets by bound, then _sum, then _count (metrics-exporter-prometheus order)."""
    name, labels, _ = sample
    rank = 0 if name.endswith("_bucket") else 1 if name.endswith("_sum") else 2
    le = labels.get("le")
    bound = math.inf if le in (None, "+Inf") else float(le)
    return (tuple((k, v) for k, v in labels.items() if k != "le"), rank, bound)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _number(value: bytes | str) -> float:
    try:
        return float(_text(value))
    except ValueError:
        return 0.0


def _histogram_samples(name: str, labels: dict[str, str], layout: list[float], counts: dict[int, float],
                       total: float, count: float) -> list[tuple[str, dict[str, str], float]]:
    """Per-bucket counts (metrics_spec: index len(layout) is +Inf) to cumulative samples."""
    samples: list[tuple[str, dict[str, str], float]] = []
    running = 0.0
    for i, upper in enumerate(layout):
        running += counts.get(i, 0.0)
        samples.append((f"{name}_bucket", {**labels, "le": rust_number(upper)}, running))
    samples.append((f"{name}_bucket", {**labels, "le": "+Inf"}, max(count, running + counts.get(len(layout), 0.0))))
    samples.append((f"{name}_sum", dict(labels), total))
    samples.append((f"{name}_count", dict(labels), count))
    return samples


def _indexed(fields: dict[str, float], prefix: str) -> dict[int, float]:
    out: dict[int, float] = {}
    for key, value in fields.items():
        if key.startswith(prefix):
            try:
                out[int(key[len(prefix):])] = value
            except ValueError:
                continue
    return out


def _batch_families(fields: dict[str, float]) -> Iterable[Family]:
    if fields.get("next_size_count", 0.0) > 0:
        counts = _indexed(fields, "next_size_bucket:")
        # Batch sizes never exceed the worker's max_batch_size, so bucket i always means le=i+1;
        # the layout only needs to be long enough for the largest index reported.
        size = max([DEFAULT_BATCH_BUCKETS] + [i + 1 for i in counts])
        layout = metrics_spec.batch_size_buckets(size)
        yield Family("tgi_batch_next_size", "histogram", _histogram_samples(
            "tgi_batch_next_size", {}, layout, counts, fields.get("next_size_sum", 0.0),
            fields["next_size_count"]))
    for kind in ("count", "success", "failure"):
        name = f"tgi_batch_inference_{kind}"
        samples = [(name, {"method": m}, fields[f"inference_{kind}:{m}"])
                   for m in METHODS if f"inference_{kind}:{m}" in fields]
        if samples:
            yield Family(name, "counter", samples)
    if "prefix_cache_hit_tokens" in fields or "prefix_cache_miss_tokens" in fields:
        for kind in ("hit", "miss"):
            name = f"tgq_prefix_cache_{kind}_tokens"
            yield Family(f"{name}_total", "counter", [(f"{name}_total", {}, fields.get(f"prefix_cache_{kind}_tokens", 0.0))])
    layout = metrics_spec.duration_buckets()
    samples = []
    for m in METHODS:
        counts = _indexed(fields, f"inference_duration_bucket:{m}:")
        count = sum(counts.values())
        if count > 0:
            samples.extend(_histogram_samples("tgi_batch_inference_duration", {"method": m}, layout, counts,
                                              fields.get(f"inference_duration_sum:{m}", 0.0), count))
    if samples:
        yield Family("tgi_batch_inference_duration", "histogram", samples)
    counts = _indexed(fields, "grammar_mask_duration_bucket:")
    if counts:
        yield Family("tgq_grammar_mask_duration", "histogram", _histogram_samples(
            "tgq_grammar_mask_duration", {}, layout, counts, fields.get("grammar_mask_duration_sum", 0.0),
            sum(counts.values())))

"""Pure helpers of the benchmark: percentiles, SSE framing, Prometheus text. No I/O, no third-party imports."""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) with linear interpolation between closest ranks (numpy's default).

    None for an empty sequence, so a report can say "n/a" rather than invent a zero.
    """
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    data = sorted(float(v) for v in values)
    if not data:
        return None
    if len(data) == 1:
        return data[0]
    pos = (len(data) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def median(values: Iterable[float | None]) -> float | None:
    """Median of the values that are not None (None when there are none)."""
    present = [v for v in values if v is not None]
    return percentile(present, 50) if present else None


def median_over(rows: Iterable[Any], get: Callable[[Any], float | None]) -> float | None:
    """Median of `get(row)` over the rows that have the figure (a KeyError or TypeError: not there)."""
    values = []
    for row in rows:
        try:
            values.append(get(row))
        except (KeyError, TypeError):
            continue
    return median(values)


def summarize(values: Sequence[float]) -> dict[str, float | int | None]:
    """count, mean, p50, p95, p99, max of a sample (None fields when it is empty)."""
    return {"count": len(values), "mean": (sum(values) / len(values)) if values else None,
            "p50": percentile(values, 50), "p95": percentile(values, 95), "p99": percentile(values, 99),
            "max": max(values) if values else None}


def gaps(timestamps: Sequence[float]) -> list[float]:
    """Differences between consecutive timestamps (inter-token latencies of one stream)."""
    return [b - a for a, b in zip(timestamps, timestamps[1:])]


# ---- Server-sent events -----------------------------------------------------------------------

class SseDecoder:
    """Incremental SSE decoder: feed lines (str or bytes, with or without the line ending), get events.

    An event is the `data` of one frame: its `data:` lines joined by newlines, dispatched at the blank
    line that ends the frame. `data:x` and `data: x` are the same (one leading space is dropped, as the
    SSE spec says). Comment lines (`:` keep-alives) and other fields (`event:`, `id:`) are ignored.
    """

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed_line(self, line: str | bytes) -> str | None:
        """Consume one line; return the completed event's data when this line ends a frame."""
        if isinstance(line, bytes):
            line = line.decode("utf-8", errors="replace")
        line = line.rstrip("\r\n")
        if line == "":
            if not self._data:
                return None
            data = "\n".join(self._data)
            self._data = []
            return data
        if line.startswith(":"):
            return None
        name, sep, value = line.partition(":")
        if not sep:
            name, value = line, ""
        elif value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        return None

    def flush(self) -> str | None:
        """The pending event when the stream ended without its blank line (None if there is none)."""
        if not self._data:
            return None
        data = "\n".join(self._data)
        self._data = []
        return data


def parse_sse_lines(lines: Iterable[str | bytes]) -> list[str]:
    """Every event's data in a whole stream of lines (convenience for tests and small tools)."""
    dec = SseDecoder()
    out = [d for d in (dec.feed_line(line) for line in lines) if d is not None]
    tail = dec.flush()
    if tail is not None:
        out.append(tail)
    return out


@dataclass(frozen=True)
class StreamEvent:
    """What one SSE event means to the benchmark, whichever server dialect sent it."""
    kind: str  # "token" | "final" | "error" | "done" | "other"
    text: str = ""
    tokens: int = 0  # tokens this event carries (1 for a token or a TGI final event)
    generated_tokens: int | None = None  # the server's own count, when it reports one
    finish_reason: str | None = None
    error: str | None = None


def _json_object(data: str) -> dict | StreamEvent:
    """The event's JSON object, or the StreamEvent that says why there is none."""
    try:
        obj = json.loads(data)
    except ValueError:
        return StreamEvent("error", error=f"not JSON: {data[:200]!r}")
    return obj if isinstance(obj, dict) else StreamEvent("other")


def interpret_tgi(data: str) -> StreamEvent:
    """A TGI `/generate_stream` event: token, final (token + generated_text) or error."""
    obj = _json_object(data)
    if isinstance(obj, StreamEvent):
        return obj
    if "error" in obj:
        return StreamEvent("error", error=f"{obj.get('error_type', '?')}: {obj.get('error')}")
    token = obj.get("token") or {}
    text = token.get("text", "") if isinstance(token, dict) else ""
    if obj.get("generated_text") is not None:
        details = obj.get("details") or {}
        return StreamEvent("final", text=text, tokens=1, generated_tokens=details.get("generated_tokens"),
                           finish_reason=details.get("finish_reason"))
    if token:
        return StreamEvent("token", text=text, tokens=1)
    return StreamEvent("other")


def interpret_openai(data: str) -> StreamEvent:
    """An OpenAI-style `/v1/completions` stream chunk (llama.cpp's servers, vLLM), or `[DONE]`.

    One chunk per sampled token; a chunk carrying finish_reason ends the choice (its text, if any,
    counts as a token). A chunk whose text is empty still counts: the server sampled a token whose bytes
    are an incomplete UTF-8 sequence.
    """
    if data.strip() == "[DONE]":
        return StreamEvent("done")
    obj = _json_object(data)
    if isinstance(obj, StreamEvent):
        return obj
    if "error" in obj:
        err = obj["error"]
        return StreamEvent("error", error=str(err.get("message", err)) if isinstance(err, dict) else str(err))
    choices = obj.get("choices") or []
    if not choices:
        return StreamEvent("other")
    choice = choices[0]
    text = choice.get("text") or ""
    finish = choice.get("finish_reason")
    if finish is not None:
        usage = obj.get("usage") or {}
        return StreamEvent("final", text=text, tokens=1 if text else 0,
                           generated_tokens=usage.get("completion_tokens"), finish_reason=finish)
    return StreamEvent("token", text=text, tokens=1)


# ---- Prometheus text exposition ------------------------------------------------------------------

_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)(\s+\d+)?$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')

Labels = tuple[tuple[str, str], ...]


def parse_prometheus(text: str) -> dict[tuple[str, Labels], float]:
    """Samples of a text exposition: {(name, sorted label pairs): value}. Comments are skipped."""
    out: dict[tuple[str, Labels], float] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if not m:
            continue
        name, labels_text, value = m.group(1), m.group(3) or "", m.group(4)
        labels = tuple(sorted((k, v.replace('\\"', '"').replace("\\\\", "\\"))
                              for k, v in _LABEL.findall(labels_text)))
        try:
            out[(name, labels)] = float(value)
        except ValueError:
            continue
    return out


def metric_value(samples: dict[tuple[str, Labels], float], name: str, **labels: str) -> float | None:
    """One sample's value, or the sum over every sample of `name` whose labels include `labels`."""
    want = set(labels.items())
    found = [v for (n, ls), v in samples.items() if n == name and want <= set(ls)]
    return sum(found) if found else None


def histogram_buckets(samples: dict[tuple[str, Labels], float], name: str, **labels: str) -> list[tuple[float, float]]:
    """Cumulative (le, count) pairs of histogram `name`, sorted by le (+Inf last)."""
    want = set(labels.items())
    out: dict[float, float] = {}
    for (n, ls), v in samples.items():
        if n != name + "_bucket":
            continue
        d = dict(ls)
        if "le" not in d or not want <= set(ls):
            continue
        le = math.inf if d["le"] in ("+Inf", "Inf", "inf") else float(d["le"])
        out[le] = out.get(le, 0.0) + v
    return sorted(out.items())


def histogram_delta(before: dict[tuple[str, Labels], float], after: dict[tuple[str, Labels], float],
                    name: str, **labels: str) -> dict[str, Any]:
    """What a histogram recorded between two scrapes.

    Returns count, sum, mean, the non-cumulative count per bucket upper bound (`per_bucket`, only the
    non-empty ones) and the largest bucket bound that received an observation (`max_le`).
    """
    b = dict(histogram_buckets(before, name, **labels))
    a = histogram_buckets(after, name, **labels)

    def delta(suffix: str) -> float:
        return (metric_value(after, name + suffix, **labels) or 0.0) - (metric_value(before, name + suffix, **labels) or 0.0)

    count, total = delta("_count"), delta("_sum")
    per_bucket: dict[str, float] = {}
    prev = 0.0
    max_le: float | None = None
    for le, cum in a:
        cum_delta = cum - b.get(le, 0.0)
        n = cum_delta - prev
        prev = cum_delta
        if n > 0:
            per_bucket["+Inf" if math.isinf(le) else _fmt_le(le)] = n
            max_le = le
    return {"count": count, "sum": total, "mean": (total / count) if count > 0 else None,
            "per_bucket": per_bucket, "max_le": max_le}


def _fmt_le(le: float) -> str:
    return str(int(le)) if float(le).is_integer() else repr(le)


# ---- Redis INFO -----------------------------------------------------------------------------------

def commandstats_calls(info: dict[str, Any]) -> dict[str, int]:
    """{command: calls} from redis-py's parsed `INFO commandstats` (keys `cmdstat_<name>`)."""
    out: dict[str, int] = {}
    for key, value in info.items():
        if key.startswith("cmdstat_") and isinstance(value, dict):
            out[key[len("cmdstat_"):]] = int(value.get("calls", 0))
    return out


def counter_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """after - before per key, keeping only keys that changed."""
    return {k: after.get(k, 0) - before.get(k, 0) for k in set(before) | set(after)
            if after.get(k, 0) != before.get(k, 0)}

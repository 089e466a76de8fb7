"""The API <-> worker contract on Redis: key and channel names, and the message envelope.

This is the only module that spells a Redis key or channel. Everything on the wire is JSON
(orjson); nothing is pickled.

Path of one request:
  API:    validate -> SUBSCRIBE reply_channel(api instance) (once per process)
          -> RQ enqueue on queue_name(model_id) (job id = request id, args = [job dict])
  worker: dequeue a batch -> each step, one fenced script call for the whole batch: one PUBLISH
          per API process holding that process's rows' events
          -> on finish SET result_key(request id) with a TTL, mark the RQ job finished
  API:    relay events by request id; forward only indexes above the last one sent
  cancel: API SETs cancel_key(request id); the worker checks its rows' keys once per step
  alive:  each API process keeps presence_key(its channel) alive; a worker does not start a job
          whose API process is gone, and drops rows whose channel has had no subscriber for a while

Versions, side by side during a rolling upgrade (readers accept the previous version):
  event v1: {"v": 1, "type": "token"|"final"|"error", "request_id", "attempt", ...payload}, one per
            message; still the layout of stored results, and of replies to v1 jobs.
  step  v2: {"v": 2, "events": [event without "v", ...]}: one message per API process per step.
  job: GenerationJob.to_dict() carries "v" (absent: 1). A v1 job (an API of the previous release)
       gets v1 event messages; a v2 job gets step messages; a job of a newer version than
       JOB_VERSION is failed with a clear error rather than run by a worker that may not honour it.
"""
from __future__ import annotations

import math
from typing import Any

import orjson

from .schemas import (ErrorEvent, Event, FinalEvent, FinishReason, PrefillToken, Token,
                      TokenEvent)

VERSION = 1  # a single event: stored results, and replies to v1 jobs
STEP_VERSION = 2  # one message per API process per step
PRESENCE_TTL_S = 30  # an API process's presence key outlives a Redis blip or a Sentinel failover
PRESENCE_EVERY_S = 5.0  # how often an API process renews it
PREFIX = "tgq"
RESULT_TTL_S = 600  # how long a final result stays readable for a late reader
CANCEL_TTL_S = 3600
EXECUTION_TTL_S = 3600  # an RQ execution hash's life; the lease itself is the started-registry score
CLAIM_TTL_S = 3600  # a claim outlives any stall it guards against; the reaper deletes it anyway

# The function path RQ records for our jobs. Workers never let RQ call it: the batching worker
# takes the job's payload (args[0]) and runs it in its batch.
JOB_FUNC = "worker.rq_worker.generate"


def queue_name(model_id: str) -> str:
    """RQ queue name for a model: several models behind one Redis is a routing table."""
    return f"{PREFIX}:{model_id}"


def reply_channel(instance_id: str) -> str:
    """Pub/sub channel of one API process; all of its requests' events arrive there."""
    return f"{PREFIX}:reply:{instance_id}"


def presence_key(channel: str) -> str:
    """Exists while the API process that reads `channel` is alive (renewed every PRESENCE_EVERY_S)."""
    return f"{channel}:alive"


def result_key(request_id: str) -> str:
    return f"{PREFIX}:result:{request_id}"


def cancel_key(request_id: str) -> str:
    return f"{PREFIX}:cancel:{request_id}"


def claim_key(job_id: str) -> str:
    """Which worker took this job off the queue and has not yet marked it started (its name)."""
    return f"{PREFIX}:claim:{job_id}"


def stranded_key(job_id: str) -> str:
    """When a reaper first saw this job popped off the queue but not started (see common.reaper)."""
    return f"{PREFIX}:stranded:{job_id}"


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _token(t: Token) -> dict[str, Any]:
    d = {"id": t.id, "text": t.text, "logprob": _finite(t.logprob), "special": t.special}
    if t.top:  # only rows that asked for alternatives carry them
        d["top"] = [_token(x) for x in t.top]
    return d


def encode_event(event: Event) -> bytes:
    """One event in a message of its own (v1)."""
    return orjson.dumps(_event(event, {"v": VERSION}))


def encode_step(events: list[Event]) -> bytes:
    """A step's events for one API process in one message (v2)."""
    return orjson.dumps({"v": STEP_VERSION, "events": [_event(e, {}) for e in events]})


def _event(event: Event, head: dict[str, Any]) -> dict[str, Any]:
    if isinstance(event, TokenEvent):
        return {**head, "type": "token", "request_id": event.request_id,
                "attempt": event.attempt, "index": event.index, "token": _token(event.token)}
    if isinstance(event, FinalEvent):
        return {
            **head, "type": "final", "request_id": event.request_id, "attempt": event.attempt,
            "index": event.index, "token": _token(event.token), "generated_text": event.generated_text,
            "finish_reason": event.finish_reason.value, "generated_tokens": event.generated_tokens,
            "seed": event.seed, "started_at": event.started_at, "finished_at": event.finished_at,
            "tokens": [_token(t) for t in event.tokens],
            "prefill": [p.to_dict() for p in event.prefill]}
    if isinstance(event, ErrorEvent):
        return {**head, "type": "error", "request_id": event.request_id,
                "attempt": event.attempt, "message": event.message, "error_type": event.error_type}
    raise TypeError(f"not an event: {event!r}")


class ProtocolError(ValueError):
    """A message that is not a tgq event of a version this process understands."""


def decode_event(data: bytes | str) -> Event:
    """A single (v1) event: a stored result."""
    events = decode_message(data)
    if len(events) != 1:
        raise ProtocolError(f"expected one event, got {len(events)}")
    return events[0]


def decode_message(data: bytes | str) -> list[Event]:
    """The events of one reply message, either layout (v1: one event; v2: a step's events)."""
    try:
        d = orjson.loads(data)
        version = d.get("v") if isinstance(d, dict) else None
        if version == VERSION:
            return [_decode(d)]
        if version == STEP_VERSION:
            return [_decode(e) for e in d["events"]]
        raise ProtocolError(f"unsupported protocol version {version!r}")
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        if isinstance(exc, ProtocolError):
            raise
        raise ProtocolError(str(exc)) from exc


def _decode(d: dict[str, Any]) -> Event:
    kind = d["type"]
    if kind == "token":
        return TokenEvent(d["request_id"], int(d["attempt"]), int(d["index"]), Token.from_dict(d["token"]))
    if kind == "final":
        return FinalEvent(
            request_id=d["request_id"], attempt=int(d["attempt"]), index=int(d["index"]),
            token=Token.from_dict(d["token"]), generated_text=d["generated_text"],
            finish_reason=FinishReason(d["finish_reason"]), generated_tokens=int(d["generated_tokens"]),
            seed=d["seed"], started_at=float(d["started_at"]), finished_at=float(d["finished_at"]),
            tokens=tuple(Token.from_dict(t) for t in d["tokens"]),
            prefill=tuple(PrefillToken.from_dict(p) for p in d["prefill"]))
    if kind == "error":
        return ErrorEvent(d["request_id"], int(d["attempt"]), d["message"], d["error_type"])
    raise ProtocolError(f"unknown event type {kind!r}")


def batch_metrics_key(model_id: str) -> str:
    """Hash of cumulative batch metrics written by every worker of a model (see common.metrics_spec)."""
    return f"{PREFIX}:metrics:{model_id}"


def worker_batch_key(model_id: str, worker_name: str) -> str:
    """A worker's current batch size, refreshed each step with a short TTL so dead workers vanish."""
    return f"{PREFIX}:batch:{model_id}:{worker_name}"


def worker_batch_pattern(model_id: str) -> str:
    return f"{PREFIX}:batch:{model_id}:*"


def worker_status_key(model_id: str, worker_name: str) -> str:
    """Hash a worker rewrites about once a second for `tgq status` (host, rows, capacity, tok/s, at);
    it expires when the worker dies."""
    return f"{PREFIX}:worker:{model_id}:{worker_name}"


def worker_status_pattern() -> str:
    return f"{PREFIX}:worker:*"


def overloaded_key(model_id: str) -> str:
    """Sorted set of the times (epoch s) the API answered 429 for a model; trimmed to the last minute."""
    return f"{PREFIX}:overloaded:{model_id}"


OVERLOAD_WINDOW_S = 60

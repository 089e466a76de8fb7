"""The previous release's wire codec (protocol v1, tgq at 80b577c), frozen for rolling-upgrade tests.

An API or worker of that release reads and writes exactly this: one event per message, `"v": 1`,
and jobs without a `"v"` field. Do not edit it to follow the current code: it stands for the
processes a fleet still runs while it upgrades."""
from __future__ import annotations

import math
from typing import Any

import orjson

from common.schemas import ErrorEvent, Event, FinalEvent, FinishReason, PrefillToken, Token, TokenEvent

VERSION = 1


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _token(t: Token) -> dict[str, Any]:
    d = {"id": t.id, "text": t.text, "logprob": _finite(t.logprob), "special": t.special}
    if t.top:  # only rows that asked for alternatives carry them
        d["top"] = [_token(x) for x in t.top]
    return d


def encode_event(event: Event) -> bytes:
    if isinstance(event, TokenEvent):
        return orjson.dumps({"v": VERSION, "type": "token", "request_id": event.request_id,
                             "attempt": event.attempt, "index": event.index, "token": _token(event.token)})
    if isinstance(event, FinalEvent):
        return orjson.dumps({
            "v": VERSION, "type": "final", "request_id": event.request_id, "attempt": event.attempt,
            "index": event.index, "token": _token(event.token), "generated_text": event.generated_text,
            "finish_reason": event.finish_reason.value, "generated_tokens": event.generated_tokens,
            "seed": event.seed, "started_at": event.started_at, "finished_at": event.finished_at,
            "tokens": [_token(t) for t in event.tokens],
            "prefill": [p.to_dict() for p in event.prefill]})
    if isinstance(event, ErrorEvent):
        return orjson.dumps({"v": VERSION, "type": "error", "request_id": event.request_id,
                             "attempt": event.attempt, "message": event.message,
                             "error_type": event.error_type})
    raise TypeError(f"not an event: {event!r}")


class ProtocolError(ValueError):
    """A message that is not a tgq event of a version this process understands."""


def decode_event(data: bytes | str) -> Event:
    try:
        d = orjson.loads(data)
        if d.get("v") != VERSION:
            raise ProtocolError(f"unsupported protocol version {d.get('v')!r}")
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
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        if isinstance(exc, ProtocolError):
            raise
        raise ProtocolError(str(exc)) from exc




def job_dict(job: Any) -> dict[str, Any]:
    """A job as the previous release's API enqueued it: today's fields without "v"."""
    d = job.to_dict()
    d.pop("v")
    return d

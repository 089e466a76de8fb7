"""TGI 0.5.0 response bodies and headers built from worker events (pure, no Flask).

Field order follows TGI's serde structs; `details` is left out when not asked for; logprobs are
written as the shortest text that reads back as the same f32 (serde prints f32), non-finite ones
as null; seeds are full u64 (orjson writes them exactly).
"""
from __future__ import annotations

import math
import struct
import time
from dataclasses import dataclass
from typing import Any, Sequence

import orjson

from common.schemas import FinalEvent, PrefillToken, Token

COMPUTE_TYPE = "gpu+optimized"


def _f32_bits(x: float) -> bytes:
    return struct.pack("<f", x)


def f32_logprob(x: float | None) -> float | None:
    """The shortest decimal that is the same f32 as `x` (so `-1.8267672`, not `-1.8267672061920166`)."""
    if x is None or not math.isfinite(x):
        return None
    try:
        target = _f32_bits(x)
    except OverflowError:
        return None
    for digits in range(1, 10):
        candidate = float(f"{x:.{digits}g}")
        if _f32_bits(candidate) == target:
            return candidate
    return x


def token_dict(t: Token) -> dict[str, Any]:
    return {"id": t.id, "text": t.text, "logprob": f32_logprob(t.logprob), "special": t.special}


def prefill_dict(p: PrefillToken) -> dict[str, Any]:
    return {"id": p.id, "text": p.text, "logprob": f32_logprob(p.logprob)}


def mean_logprob(final: FinalEvent) -> float:
    """best_of's score: mean logprob of the generated tokens (NaN counts as -inf)."""
    tokens = final.tokens or (final.token,)
    total = 0.0
    for t in tokens:
        total += t.logprob if math.isfinite(t.logprob) else -math.inf
    return total / len(tokens)


def pick_best(finals: Sequence[FinalEvent]) -> int:
    """Index of the winner: highest mean logprob, strict `>` so ties go to the earliest."""
    best, best_score = 0, -math.inf
    for i, final in enumerate(finals):
        score = mean_logprob(final)
        if i == 0 or score > best_score:
            best, best_score = i, score
    return best


def _text(final: FinalEvent, prefix: str) -> str:
    return prefix + final.generated_text


def generate_body(finals: Sequence[FinalEvent], winner: int, *, details: bool, prefix: str) -> dict[str, Any]:
    """GenerateResponse; `finals` holds the best_of copies in submission order, `winner` indexes it."""
    final = finals[winner]
    body: dict[str, Any] = {"generated_text": _text(final, prefix)}
    if details:
        d: dict[str, Any] = {
            "finish_reason": final.finish_reason.value, "generated_tokens": final.generated_tokens,
            "seed": final.seed, "prefill": [prefill_dict(p) for p in final.prefill],
            "tokens": [token_dict(t) for t in final.tokens]}
        if len(finals) > 1:
            d["best_of_sequences"] = [{
                "generated_text": _text(f, prefix), "finish_reason": f.finish_reason.value,
                "generated_tokens": f.generated_tokens, "seed": f.seed,
                "prefill": [prefill_dict(p) for p in f.prefill],
                "tokens": [token_dict(t) for t in f.tokens]} for i, f in enumerate(finals) if i != winner]
        body["details"] = d
    return body


def dumps(obj: Any) -> bytes:
    return orjson.dumps(obj)


@dataclass(frozen=True)
class Timing:
    """A request's clock readings (epoch seconds) for TGI's headers and duration metrics."""
    start: float  # handler entered
    enqueued: float  # job(s) enqueued
    batched: float  # FinalEvent.started_at: the job joined a batch
    end: float

    @property
    def total(self) -> float:
        return max(0.0, self.end - self.start)

    @property
    def validation(self) -> float:
        return max(0.0, self.enqueued - self.start)

    @property
    def queue(self) -> float:
        return max(0.0, self.batched - self.enqueued)

    @property
    def inference(self) -> float:
        return max(0.0, self.end - self.batched)

    def per_token(self, generated_tokens: int) -> float:
        return self.inference / max(1, generated_tokens)


def timing_for(start: float, enqueued: float, final: FinalEvent, end: float | None = None) -> Timing:
    batched = min(max(final.started_at, enqueued), end or time.time())
    return Timing(start=start, enqueued=enqueued, batched=batched, end=end or time.time())


def _ms(seconds: float) -> str:
    return str(int(seconds * 1000))  # Duration::as_millis truncates


def generate_headers(timing: Timing, generated_tokens: int, characters: int) -> dict[str, str]:
    return {
        "x-compute-type": COMPUTE_TYPE,
        "x-compute-time": _ms(timing.total),
        "x-compute-characters": str(characters),
        "x-total-time": _ms(timing.total),
        "x-validation-time": _ms(timing.validation),
        "x-queue-time": _ms(timing.queue),
        "x-inference-time": _ms(timing.inference),
        "x-time-per-token": _ms(timing.per_token(generated_tokens)),
    }


def stream_headers(characters: int) -> dict[str, str]:
    return {"Cache-Control": "no-cache", "x-compute-type": COMPUTE_TYPE,
            "x-compute-characters": str(characters), "X-Accel-Buffering": "no"}

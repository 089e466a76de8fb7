"""TGI 0.5.0 response bodies and headers built from worker events (pure, no Flask).

Field order follows TGI's serde structs; `details` is left out when not asked for; logprobs are
written as the shortest text that reads back as the same f32 (serde prints f32), non-finite ones
as null; seeds are full u64 (orjson writes them exactly).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import orjson

from common.schemas import FinalEvent, PrefillToken, Token

from ..core.numbers import f32_logprob
from ..core.timing import Timing

COMPUTE_TYPE = "gpu+optimized"


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

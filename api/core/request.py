"""A generation request in tgq's own terms, before validation: what TGI's parser yields and what the
OpenAI dialect maps its fields onto (`api.core.validation` checks it)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

F32_MAX = 3.4028234663852886e38


@dataclass(frozen=True)
class RawParameters:
    """TGI 0.5.0 `GenerateParameters` as deserialized (floats already rounded to f32)."""
    best_of: int | None = None
    temperature: float | None = None
    repetition_penalty: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    typical_p: float | None = None
    do_sample: bool = False
    max_new_tokens: int = 20
    return_full_text: bool | None = None
    stop: tuple[str, ...] = ()
    truncate: int | None = None
    watermark: bool = False
    details: bool = False
    seed: int | None = None
    grammar: tuple[str, Any] | None = None  # TGI 3's `{"type", "value"}` as given (api.core.constraints)


@dataclass(frozen=True)
class RawRequest:
    inputs: str
    parameters: RawParameters = RawParameters()
    stream: bool = False  # only read from the compat routes (`POST /`, `/invocations`)

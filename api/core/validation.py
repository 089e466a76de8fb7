"""TGI 0.5.0's request validation: the same checks, in the same order, with the same messages.

Pure (no Flask, no Redis): the routes call `check_best_of` (handler level), then the queue's 429
check, then `Validator.validate` (`api.tgi.parsing.parse_and_validate` chains them for tests).
These are tgq's parameter rules for both dialects, worded as TGI 0.5.0 words them.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

from common.errors import ValidationError
from common.grammars import ConstraintError
from common.schemas import SamplingParams, StoppingParams
from common.settings import LimitSettings

from .constraints import from_tagged, grammar_of
from .request import F32_MAX, RawParameters, RawRequest


class Encoding(Protocol):
    ids: list[int]


class TokenizerLike(Protocol):
    """What validation needs from `tokenizers.Tokenizer`."""

    def encode(self, sequence: str, add_special_tokens: bool = True) -> Encoding: ...


@dataclass(frozen=True)
class ValidRequest:
    """A request that passed validation; one GenerationJob per best_of copy is built from it."""
    inputs: str
    input_ids: tuple[int, ...]
    sampling: SamplingParams  # seed: the client's, or 0 when `seed_given` is false
    stopping: StoppingParams
    best_of: int  # >= 1 (TGI 0.5.0 treats best_of 0 on /generate as 1)
    details: bool
    return_full_text: bool | None
    seed_given: bool
    grammar: str | None = None  # the output constraint as an llguidance grammar (api.core.constraints)

    @property
    def input_length(self) -> int:
        return len(self.input_ids)


def _grammar(given: tuple[str, Any] | None) -> str | None:
    """TGI 3's grammar check, worded as TGI 3 words it."""
    if given is None:
        return None
    try:
        return grammar_of(from_tagged(*given))
    except ConstraintError as exc:
        raise ValidationError(f"grammar is not valid: {exc}") from None


def random_seed() -> int:
    """A random u64, as TGI's router draws when the client gives no seed."""
    return random.getrandbits(64)


def check_best_of(params: RawParameters, limits: LimitSettings, *, stream: bool) -> int:
    """Handler-level best_of checks; returns how many sequences to generate."""
    best_of = params.best_of
    if stream:
        if (1 if best_of is None else best_of) != 1:
            raise ValidationError("`best_of` != 1 is not supported when streaming tokens")
        return 1
    if best_of is not None and best_of > 1:
        if limits.max_best_of == 1:
            raise ValidationError("`best_of` != 1 is not allowed for this endpoint")
        if best_of > limits.max_best_of:
            raise ValidationError(
                f"`best_of` must be > 0 and <= {limits.max_best_of}. Given: {best_of}")
        return best_of
    return 1


def _finite32(x: float) -> float:
    """Keep job payloads strict JSON: an f32 overflow (inf) is sent as f32::MAX, same effect."""
    return max(-F32_MAX, min(F32_MAX, x))


class Validator:
    def __init__(self, limits: LimitSettings, tokenizer: TokenizerLike | None) -> None:
        self.limits = limits
        self.tokenizer = tokenizer  # None: TGI's "no fast tokenizer" path (length checks skipped)

    def validate(self, request: RawRequest, *, best_of: int = 1,
                 input_ids: Sequence[int] | None = None) -> ValidRequest:
        """`Validation::validate` of TGI 0.5.0, checks in its order; raises ValidationError.

        `input_ids`: the prompt already tokenized by the caller (the /v1 routes tokenize a chat
        template's text without special tokens); by default `request.inputs` is tokenized here."""
        p = request.parameters
        limits = self.limits
        sampling = (p.do_sample or p.temperature is not None or p.top_k is not None
                    or p.top_p is not None or p.typical_p is not None)
        if best_of > 1 and not sampling:
            raise ValidationError("you must use sampling when `best_of` is > 1")
        temperature = 1.0 if p.temperature is None else p.temperature
        if temperature <= 0:
            raise ValidationError("`temperature` must be strictly positive")
        repetition_penalty = 1.0 if p.repetition_penalty is None else p.repetition_penalty
        if repetition_penalty <= 0:
            raise ValidationError("`repetition_penalty` must be strictly positive")
        top_p = 1.0
        if p.top_p is not None:
            if p.top_p <= 0.0 or p.top_p >= 1.0:
                raise ValidationError("`top_p` must be > 0.0 and < 1.0")
            top_p = p.top_p
        typical_p = 1.0
        if p.typical_p is not None:
            if p.typical_p <= 0.0 or p.typical_p >= 1.0:
                raise ValidationError("`typical_p` must be > 0.0 and < 1.0")
            typical_p = p.typical_p
        top_k = 0
        if p.top_k is not None:
            if p.top_k <= 0:
                raise ValidationError("`top_k` must be strictly positive")
            top_k = p.top_k
        if p.max_new_tokens == 0:
            raise ValidationError("`max_new_tokens` must be strictly positive")
        if len(p.stop) > limits.max_stop_sequences:
            raise ValidationError(
                f"`stop` supports up to {limits.max_stop_sequences} stop sequences. Given: {len(p.stop)}")
        if p.seed is not None and best_of > 1:
            raise ValidationError("`seed` must not be set when `best_of` > 1")
        if request.inputs == "":
            raise ValidationError("`inputs` cannot be empty")
        if p.truncate is not None and (p.truncate == 0 or p.truncate > limits.max_input_length):
            raise ValidationError(
                f"`truncate` must be strictly positive and less than {limits.max_input_length}. "
                f"Given: {p.truncate}")
        grammar = _grammar(p.grammar)
        input_ids = self._input_ids(request.inputs, p.truncate, p.max_new_tokens, input_ids)
        return ValidRequest(
            inputs=request.inputs, input_ids=input_ids,
            sampling=SamplingParams(do_sample=p.do_sample, temperature=_finite32(temperature), top_k=top_k,
                                    top_p=top_p, typical_p=typical_p,
                                    repetition_penalty=_finite32(repetition_penalty),
                                    watermark=p.watermark, seed=p.seed if p.seed is not None else 0),
            stopping=StoppingParams(max_new_tokens=p.max_new_tokens, stop=p.stop),
            best_of=best_of, details=p.details, return_full_text=p.return_full_text,
            seed_given=p.seed is not None, grammar=grammar)

    def tokenize(self, inputs: str, *, add_special_tokens: bool = True) -> list[int]:
        if self.tokenizer is None:
            return []
        try:
            return list(self.tokenizer.encode(inputs, add_special_tokens=add_special_tokens).ids)
        except Exception as exc:  # the tokenizers library raises plain Exception
            raise ValidationError(f"tokenizer error {exc}") from exc

    def _input_ids(self, inputs: str, truncate: int | None, max_new_tokens: int,
                   given: Sequence[int] | None) -> tuple[int, ...]:
        limits = self.limits
        if self.tokenizer is None:
            if (truncate or limits.max_input_length) + max_new_tokens > limits.max_total_tokens:
                raise ValidationError(
                    f"`max_new_tokens` must be <= {limits.max_total_tokens - limits.max_input_length}. "
                    f"Given: {max_new_tokens}")
            return ()
        ids: Sequence[int] = self.tokenize(inputs) if given is None else given
        if truncate is not None and truncate < len(ids):
            ids = ids[len(ids) - truncate:]  # keep the last `truncate` tokens (TGI >= 0.6.0 behaviour)
        input_length = len(ids)
        if input_length + max_new_tokens > limits.max_total_tokens:
            raise ValidationError(
                f"`inputs` tokens + `max_new_tokens` must be <= {limits.max_total_tokens}. "
                f"Given: {input_length} `inputs` tokens and {max_new_tokens} `max_new_tokens`")
        if input_length > limits.max_input_length:
            raise ValidationError(
                f"`inputs` must have less than {limits.max_input_length} tokens. Given: {input_length}")
        return tuple(ids)

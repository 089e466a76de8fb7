"""Logits processors: one small class per transform of a batch's fp32 scores [B, V] before the warpers.

Each processor touches only its own rows and leaves the others' scores as they are, so no row's choice
depends on its neighbours. `for_batch` builds the list a batch needs this step (empty for a batch that
nothing processes, which lets the chooser use the fused greedy kernel). Order, as TGI applies them:
watermark, repetition penalty, OpenAI's frequency/presence penalties, then the output constraint's mask,
last, so that the warpers and the reported logprobs see the distribution the token is drawn from.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, Sequence

import torch

from .warpers import openai_penalties, repetition_penalty
from .watermark import Watermark

if TYPE_CHECKING:
    from .sampling import SamplingBatch


class LogitsProcessor(Protocol):
    def __call__(self, scores: torch.Tensor) -> torch.Tensor: ...  # may modify `scores` in place


def on_rows(scores: torch.Tensor, rows: Sequence[int], fn, *args) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """Apply `fn` to a subset of rows only (the others keep their scores).

    Tensor arguments are per batch row and get the same rows; other arguments go through as they are."""
    if len(rows) == scores.shape[0]:
        return fn(scores, *args)
    index = torch.tensor(list(rows), dtype=torch.long, device=scores.device)
    scores[index] = fn(scores[index], *(a[index] if isinstance(a, torch.Tensor) else a for a in args))
    return scores


@dataclass
class WatermarkBias:
    """Kirchenbauer et al.'s greenlist bias, seeded by each row's previous token."""
    watermark: Watermark
    rows: list[int]
    prev_ids: list[int]

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        return self.watermark.apply(scores, self.rows, self.prev_ids)


@dataclass
class RepetitionPenalty:
    """CTRL's penalty on every id of the row's prompt and output (`seen` [B, V])."""
    rows: list[int]
    seen: torch.Tensor
    penalty: torch.Tensor  # [B, 1]

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        return on_rows(scores, self.rows, repetition_penalty, self.seen, self.penalty)


@dataclass
class FrequencyPresencePenalty:
    """OpenAI's penalties over the ids the row generated (`counts` [B, V])."""
    rows: list[int]
    counts: torch.Tensor
    frequency: torch.Tensor  # [B, 1]
    presence: torch.Tensor  # [B, 1]

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        return on_rows(scores, self.rows, openai_penalties, self.counts, self.frequency, self.presence)


@dataclass
class ConstraintMask:
    """An output constraint's mask: each constrained row's disallowed ids get -inf (`bias` [n, V] is 0 or
    -inf, added). It only removes ids, so a greedy row's argmax and logprob over the masked logits are
    still those of the distribution it chooses from: the fused greedy kernel may run after it."""
    rows: list[int]
    bias: torch.Tensor
    keeps_greedy_kernel = True

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        index = torch.tensor(self.rows, dtype=torch.long, device=scores.device)
        return scores.index_add_(0, index, self.bias.to(scores.dtype))


def for_batch(sb: SamplingBatch, seen: torch.Tensor | None, counts: torch.Tensor | None,
              prev_ids: Sequence[int], watermark: Watermark | None) -> list[LogitsProcessor]:
    """The processors a batch's rows ask for, in TGI's order: `seen` [B, V] marks each row's prompt and
    output ids, `counts` [B, V] counts its generated ids, `prev_ids` are the rows' last ids."""
    out: list[LogitsProcessor] = []
    if sb.watermark_rows and watermark is not None:
        out.append(WatermarkBias(watermark, sb.watermark_rows, [prev_ids[i] for i in sb.watermark_rows]))
    if sb.penalty_rows and seen is not None:
        out.append(RepetitionPenalty(sb.penalty_rows, seen, sb.penalty))
    if sb.openai_rows and counts is not None:
        out.append(FrequencyPresencePenalty(sb.openai_rows, counts, sb.frequency, sb.presence))
    return out


def apply(processors: Sequence[LogitsProcessor], scores: torch.Tensor) -> torch.Tensor:
    for processor in processors:
        scores = processor(scores)
    return scores

"""TGI's logits processing (§9.1), vectorised over a batch with per-row parameters, and the token choice.

Order: watermark, repetition penalty, temperature, top-k, top-p, typical-p. The reported logprob is
log_softmax of the processed scores at the chosen id. Greedy rows take the argmax; sampling rows draw
by inverse CDF with one uniform from their own seeded generator, so no row's draw depends on others.

Top-p and typical-p never sort the whole vocabulary in the common case: they look at the best
`candidates` ids (one partial top-k) and fall back to TGI's full sort only for rows whose kept set
does not fit in them, so the kept sets are those of the full computation. Remaining differences are
float rounding at the exact boundary and tie-breaking between equal scores (HF's sort keeps an
arbitrary subset of ties at the cut-off, this keeps all of them).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from common.schemas import SamplingParams

from .watermark import Watermark

CANDIDATES = 256
NEG_INF = float("-inf")
U32 = 0xFFFF_FFFF


def fold_seed(seed: int) -> int:
    """Seed for torch's CPU generator: its mt19937 keeps only the low 32 bits, so fold the high half in."""
    # torch.Generator.manual_seed accepts the whole u64 range, but seeds equal in their low 32 bits
    # would give the same stream on CPU; xor-folding keeps every bit of the API's u64 seed relevant.
    seed = int(seed) & 0xFFFF_FFFF_FFFF_FFFF
    return (seed ^ (seed >> 32)) & U32


def make_generator(seed: int) -> torch.Generator:
    """One CPU generator per sampling row, seeded once (CPU so draws are the same on any device)."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(fold_seed(seed))
    return gen


@dataclass
class SamplingBatch:
    """Per-row parameters as host lists and device tensors, rebuilt whenever the rows change."""
    params: list[SamplingParams]
    generators: list[torch.Generator | None]
    temperature: torch.Tensor  # [B, 1]
    penalty: torch.Tensor  # [B, 1]
    watermark_rows: list[int]
    penalty_rows: list[int]
    temperature_rows: list[int]
    top_k_rows: list[int]
    top_p_rows: list[int]
    typical_rows: list[int]
    sample_rows: list[int]

    @classmethod
    def build(cls, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None],
              device: torch.device | str) -> SamplingBatch:
        params = list(params)
        rows = range(len(params))
        return cls(
            params=params, generators=list(generators),
            temperature=torch.tensor([[p.temperature] for p in params], dtype=torch.float32, device=device),
            penalty=torch.tensor([[p.repetition_penalty] for p in params], dtype=torch.float32, device=device),
            watermark_rows=[i for i in rows if params[i].watermark],
            penalty_rows=[i for i in rows if params[i].repetition_penalty != 1.0],
            temperature_rows=[i for i in rows if params[i].temperature != 1.0],
            top_k_rows=[i for i in rows if params[i].top_k != 0],
            top_p_rows=[i for i in rows if params[i].top_p < 1.0],
            typical_rows=[i for i in rows if params[i].typical_p < 1.0],
            sample_rows=[i for i in rows if params[i].sampling],
        )

    @property
    def needs_seen(self) -> bool:
        return bool(self.penalty_rows)


def repetition_penalty(scores: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """HF rule over every id seen (prompt + generated): positive scores / penalty, negative * penalty."""
    penalised = torch.where(scores < 0, scores * penalty, scores / penalty)
    return torch.where(seen, penalised, scores)


def top_k_filter(scores: torch.Tensor, top_k: Sequence[int]) -> torch.Tensor:
    """HF TopKLogitsWarper per row (k = 0: off): drop scores below each row's k-th best."""
    vocab = scores.shape[-1]
    ks = [min(max(int(k), 1), vocab) if k > 0 else 0 for k in top_k]
    if not any(ks):
        return scores
    values = torch.topk(scores, max(ks), dim=-1).values
    index = torch.tensor([max(k - 1, 0) for k in ks], device=scores.device)[:, None]
    kth = values.gather(1, index)
    off = torch.tensor([k == 0 for k in ks], device=scores.device)[:, None]
    kth = kth.masked_fill(off, NEG_INF)
    return scores.masked_fill(scores < kth, NEG_INF)


def _top_p_full(scores: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """HF TopPLogitsWarper exactly: ascending sort, drop ids whose cumulative mass is <= 1 - p."""
    sorted_logits, sorted_idx = torch.sort(scores, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= (1 - top_p)
    remove[..., -1:] = False
    return scores.masked_fill(remove.scatter(1, sorted_idx, remove), NEG_INF)


def top_p_filter(scores: torch.Tensor, top_p: Sequence[float], candidates: int = CANDIDATES) -> torch.Tensor:
    """Nucleus filter per row (p >= 1: off) looking only at the best `candidates` ids when they suffice."""
    vocab = scores.shape[-1]
    p = torch.tensor([min(float(x), 1.0) for x in top_p], dtype=scores.dtype, device=scores.device)[:, None]
    width = min(candidates, vocab)
    values = torch.topk(scores, width, dim=-1).values  # best first
    probs = torch.exp(values - torch.logsumexp(scores, dim=-1, keepdim=True))
    cumulative = probs.cumsum(dim=-1)
    # Descending view of HF's rule: the id at rank m stays iff the mass strictly above it is < p.
    keep = (cumulative - probs) < p
    kept = keep.sum(dim=-1, keepdim=True).clamp(min=1)
    threshold = values.gather(1, kept - 1).masked_fill(p >= 1.0, NEG_INF)
    out = scores.masked_fill(scores < threshold, NEG_INF)
    if width < vocab:
        # Rows whose candidates hold less than p of the mass keep ids beyond them: sort those fully.
        spill = ((cumulative[:, -1:] < p) & (p < 1.0)).squeeze(1)
        if bool(spill.any()):
            rows = spill.nonzero().squeeze(1)
            out[rows] = _top_p_full(scores[rows], p[rows])
    return out


def _typical_full(scores: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """HF TypicalLogitsWarper exactly (full sort by distance to the entropy)."""
    logp = torch.log_softmax(scores, dim=-1)
    p = logp.exp()
    entropy = -(logp * p).nansum(-1, keepdim=True)
    shifted = (-logp - entropy).abs()
    sorted_shift, sorted_idx = torch.sort(shifted, descending=False)
    cumulative = scores.gather(-1, sorted_idx).softmax(dim=-1).cumsum(dim=-1)
    last = (cumulative < mass).sum(dim=1).clamp(max=scores.shape[-1] - 1)
    remove = sorted_shift > sorted_shift.gather(1, last.view(-1, 1))
    remove[..., :1] = False
    return scores.masked_fill(remove.scatter(1, sorted_idx, remove), NEG_INF)


def typical_filter(scores: torch.Tensor, typical_p: Sequence[float], candidates: int = CANDIDATES) -> torch.Tensor:
    """Typical-p filter per row (mass >= 1: off) with a partial sort of the `candidates` most typical ids."""
    vocab = scores.shape[-1]
    mass = torch.tensor([float(x) for x in typical_p], dtype=scores.dtype, device=scores.device)[:, None]
    logp = torch.log_softmax(scores, dim=-1)
    p = logp.exp()
    entropy = -(logp * p).nansum(-1, keepdim=True)
    shifted = (-logp - entropy).abs()
    width = min(candidates, vocab)
    neg_shift, idx = torch.topk(-shifted, width, dim=-1)  # most typical first
    cumulative = p.gather(1, idx).cumsum(dim=-1)
    last = (cumulative < mass).sum(dim=1, keepdim=True)
    spill = (last >= width).squeeze(1) & (mass < 1.0).squeeze(1)
    threshold = (-neg_shift).gather(1, last.clamp(max=width - 1))
    threshold = threshold.masked_fill(mass >= 1.0, float("inf"))
    out = scores.masked_fill(shifted > threshold, NEG_INF)
    if width < vocab and bool(spill.any()):
        rows = spill.nonzero().squeeze(1)
        out[rows] = _typical_full(scores[rows], mass[rows])
    return out


def _on_rows(scores: torch.Tensor, rows: list[int], fn, *args) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """Apply a filter to a subset of rows only (the others keep their scores)."""
    if len(rows) == scores.shape[0]:
        return fn(scores, *args)
    index = torch.tensor(rows, dtype=torch.long, device=scores.device)
    scores[index] = fn(scores[index], *args)
    return scores


def process(scores: torch.Tensor, sb: SamplingBatch, seen: torch.Tensor | None,
            prev_ids: Sequence[int], watermark: Watermark | None,
            candidates: int = CANDIDATES) -> torch.Tensor:
    """Run TGI's processors on fp32 `scores` [B, V] (may modify it in place); returns processed scores."""
    if sb.watermark_rows and watermark is not None:
        scores = watermark.apply(scores, sb.watermark_rows, [prev_ids[i] for i in sb.watermark_rows])
    if sb.penalty_rows and seen is not None:
        scores = repetition_penalty(scores, seen, sb.penalty)  # penalty 1.0 rows: x/1 == x exactly
    if sb.temperature_rows:
        scores = scores / sb.temperature
    params = sb.params
    if sb.top_k_rows:
        scores = _on_rows(scores, sb.top_k_rows, top_k_filter, [params[i].top_k for i in sb.top_k_rows])
    if sb.top_p_rows:
        scores = _on_rows(scores, sb.top_p_rows, top_p_filter,
                          [params[i].top_p for i in sb.top_p_rows], candidates)
    if sb.typical_rows:
        scores = _on_rows(scores, sb.typical_rows, typical_filter,
                          [params[i].typical_p for i in sb.typical_rows], candidates)
    return scores


def sample(scores: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """Draw one id per row from softmax(scores) by inverse CDF, one uniform per row from its generator."""
    probs = torch.softmax(scores, dim=-1)
    cdf = probs.cumsum(dim=-1)
    u = torch.tensor([torch.rand((), generator=g, dtype=torch.float64).item() for g in generators],
                     dtype=cdf.dtype, device=cdf.device)[:, None]
    # First id whose cumulative mass exceeds u * total: always an id with non-zero probability.
    ids = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)
    return ids.clamp(max=scores.shape[-1] - 1).squeeze(1)


def choose(scores: torch.Tensor, sb: SamplingBatch, seen: torch.Tensor | None, prev_ids: Sequence[int],
           watermark: Watermark | None, candidates: int = CANDIDATES) -> tuple[torch.Tensor, torch.Tensor]:
    """Next id and its logprob (under the processed distribution) for every row of fp32 `scores` [B, V]."""
    scores = process(scores, sb, seen, prev_ids, watermark, candidates)
    ids = torch.argmax(scores, dim=-1)
    if sb.sample_rows:
        gens = [sb.generators[i] for i in sb.sample_rows]
        if any(g is None for g in gens):
            raise ValueError("a sampling row has no generator")
        index = torch.tensor(sb.sample_rows, dtype=torch.long, device=scores.device)
        ids[index] = sample(scores[index], gens)  # type: ignore[arg-type]
    # log_softmax + gather is about twice as fast on CPU as logsumexp over the same [B, V].
    logprobs = torch.log_softmax(scores, dim=-1).gather(1, ids[:, None]).squeeze(1)
    return ids, logprobs

"""TGI's logits warpers on dense [n, V] scores with per-row parameters (HF transformers' rules).

Top-p and typical-p look at the best `candidates` ids first (one partial top-k) and sort the whole
vocabulary only for rows whose kept set does not fit in them, so the kept sets are those of the full
computation; what remains is float rounding at the exact boundary and ties at the cut-off (HF keeps
an arbitrary subset of equal scores there, these keep all of them).
"""
from __future__ import annotations

from typing import Sequence

import torch

CANDIDATES = 256
NEG_INF = float("-inf")


def repetition_penalty(scores: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """HF rule over every id seen (prompt + generated): positive scores / penalty, negative * penalty."""
    penalised = torch.where(scores < 0, scores * penalty, scores / penalty)
    return torch.where(seen, penalised, scores)


def openai_penalties(scores: torch.Tensor, counts: torch.Tensor, frequency: torch.Tensor,
                     presence: torch.Tensor) -> torch.Tensor:
    """OpenAI's frequency and presence penalties with vLLM's semantics: `counts` [n, V] is how many times
    each row GENERATED each id so far (prompt ids do not count, unlike the repetition penalty's), and
    an id's score loses frequency * count + presence * (count > 0); negative penalties reward repeats."""
    return scores - frequency * counts - presence * (counts > 0).to(scores.dtype)


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

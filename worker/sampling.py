"""TGI's warpers and the draw (§9.1), vectorised over a batch with per-row parameters.

They run on scores the row's processors (`worker.processors`: watermark, penalties, the output
constraint's mask) already transformed: temperature, top-k, top-p, typical-p, then the choice.
`worker.chooser` composes the two. The reported logprob is log_softmax of the warped scores at the chosen id, and
rows that ask for `top_n_tokens` alternatives get theirs from that same log_softmax. Greedy rows
take the argmax; sampling rows draw by inverse CDF with one uniform from their own seeded generator,
so no row's draw depends on others.

Rows with top-k or top-p never touch the full vocabulary after one partial top-k: their support lies
in their best `candidates` ids (or top_k or top_n_tokens, if larger), where every later warper and
the draw run exactly. A top-p row whose nucleus does not fit in them, and typical-p-only rows, take
the dense path (`warpers.py`, which sorts the full vocabulary only when its own candidates do not
suffice). Whether a row takes which path depends on that row alone, so its draws never depend on its
neighbours.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from common.schemas import SamplingParams

from .alternatives import Alternatives
from .processors import on_rows
from .warpers import CANDIDATES, NEG_INF, top_k_filter, top_p_filter, typical_filter

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
    frequency: torch.Tensor  # [B, 1] OpenAI's frequency penalty
    presence: torch.Tensor  # [B, 1] OpenAI's presence penalty
    watermark_rows: list[int]
    penalty_rows: list[int]
    openai_rows: list[int]  # rows with a frequency or presence penalty
    candidate_rows: list[int]  # rows with top-k or top-p: warped and drawn among candidates
    all_greedy: bool  # no row samples: each takes the argmax of its processed scores

    @classmethod
    def build(cls, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None],
              device: torch.device | str) -> SamplingBatch:
        params = list(params)
        rows = range(len(params))

        def column(values: list[float]) -> torch.Tensor:
            return torch.tensor([[v] for v in values], dtype=torch.float32, device=device)

        openai_rows = [i for i in rows if params[i].frequency_penalty != 0.0 or params[i].presence_penalty != 0.0]
        return cls(
            params=params, generators=list(generators),
            temperature=column([p.temperature for p in params]),
            penalty=column([p.repetition_penalty for p in params]),
            frequency=column([p.frequency_penalty for p in params]),
            presence=column([p.presence_penalty for p in params]),
            watermark_rows=[i for i in rows if params[i].watermark],
            penalty_rows=[i for i in rows if params[i].repetition_penalty != 1.0],
            openai_rows=openai_rows,
            candidate_rows=[i for i in rows if params[i].top_k != 0 or params[i].top_p < 1.0],
            all_greedy=not any(p.sampling for p in params),
        )

    @property
    def needs_seen(self) -> bool:
        return bool(self.penalty_rows)

    @property
    def needs_counts(self) -> bool:
        return bool(self.openai_rows)


def warp_dense(scores: torch.Tensor, params: Sequence[SamplingParams], temperature: torch.Tensor,
               candidates: int = CANDIDATES) -> torch.Tensor:
    """Temperature, top-k, top-p, typical-p on dense rows (the reference path)."""
    rows = range(len(params))
    if any(p.temperature != 1.0 for p in params):
        scores = scores / temperature
    top_k = [i for i in rows if params[i].top_k != 0]
    if top_k:
        scores = on_rows(scores, top_k, top_k_filter, [params[i].top_k for i in top_k])
    top_p = [i for i in rows if params[i].top_p < 1.0]
    if top_p:
        scores = on_rows(scores, top_p, top_p_filter, [params[i].top_p for i in top_p], candidates)
    typical = [i for i in rows if params[i].typical_p < 1.0]
    if typical:
        scores = on_rows(scores, typical, typical_filter, [params[i].typical_p for i in typical], candidates)
    return scores


@dataclass
class Candidates:
    """Warped scores of some rows restricted to their best ids: values [n, C] (-inf = removed), ids [n, C]."""
    values: torch.Tensor
    ids: torch.Tensor
    spill: list[bool]  # rows whose top-p nucleus does not fit: their values are meaningless

    def dense(self, vocab: int) -> torch.Tensor:
        """The same scores over the whole vocabulary (tests compare this with the dense path)."""
        out = torch.full((self.values.shape[0], vocab), NEG_INF, dtype=self.values.dtype,
                         device=self.values.device)
        return out.scatter(1, self.ids, self.values)


def warp_candidates(scores: torch.Tensor, params: Sequence[SamplingParams], temperature: torch.Tensor,
                    candidates: int = CANDIDATES) -> Candidates:
    """Temperature, top-k, top-p, typical-p for rows that all have top-k or top-p, among candidates."""
    vocab = scores.shape[-1]
    dev = scores.device
    ks = [min(p.top_k, vocab) for p in params]
    # A row's width also holds its top_n_tokens alternatives (ids its top-k removed show as -inf).
    widths = [min(vocab, max(candidates, k, p.top_n_tokens)) for k, p in zip(ks, params)]
    values, ids = torch.topk(scores, max(widths), dim=-1)  # temperature > 0 keeps this order
    values = values / temperature
    col = torch.arange(values.shape[1], device=dev)[None, :]
    # Each row sees only its own width (top_k, or `candidates`): its result cannot depend on neighbours.
    limit = torch.tensor([k if k > 0 else w for k, w in zip(ks, widths)], device=dev)[:, None]
    values = values.masked_fill(col >= limit, NEG_INF)
    has_k = torch.tensor([k > 0 for k in ks], device=dev)[:, None]
    if bool(has_k.all()):
        lse = torch.logsumexp(values, dim=-1, keepdim=True)
    else:
        # Without top-k the support is still the whole vocabulary: normalise over all of it.
        full = torch.logsumexp(scores / temperature, dim=-1, keepdim=True)
        lse = torch.where(has_k, torch.logsumexp(values, dim=-1, keepdim=True), full)
    spill = [False] * len(params)
    if any(p.top_p < 1.0 for p in params):
        values, spill = _top_p_candidates(values, lse, params, ks, widths)
    if any(p.typical_p < 1.0 for p in params):
        values = _typical_candidates(values, params)
    return Candidates(values=values, ids=ids, spill=spill)


def _top_p_candidates(values: torch.Tensor, lse: torch.Tensor, params: Sequence[SamplingParams],
                      ks: list[int], widths: list[int]) -> tuple[torch.Tensor, list[bool]]:
    p = torch.tensor([min(x.top_p, 1.0) for x in params], dtype=values.dtype, device=values.device)[:, None]
    probs = torch.exp(values - lse)
    cumulative = probs.cumsum(dim=-1)
    # HF's ascending rule seen from the top: rank m stays iff the mass strictly above it is < p.
    kept = ((cumulative - probs) < p).sum(dim=-1, keepdim=True).clamp(min=1)
    threshold = values.gather(1, kept - 1).masked_fill(p >= 1.0, NEG_INF)
    values = values.masked_fill(values < threshold, NEG_INF)
    edge = torch.tensor([w - 1 for w in widths], device=values.device)[:, None]
    short = (cumulative.gather(1, edge) < p).squeeze(1).tolist()
    spill = [bool(s) and x.top_p < 1.0 and k == 0 for s, x, k in zip(short, params, ks)]
    return values, spill


def _typical_candidates(values: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """HF's typical rule on a support that lies inside the candidates (ids outside have mass 0)."""
    mass = torch.tensor([x.typical_p for x in params], dtype=values.dtype, device=values.device)[:, None]
    logp = torch.log_softmax(values, dim=-1)
    p = logp.exp()
    entropy = -(logp * p).nansum(-1, keepdim=True)
    shifted = (-logp - entropy).abs()
    sorted_shift, order = torch.sort(shifted, dim=-1)
    cumulative = p.gather(1, order).cumsum(dim=-1)
    last = (cumulative < mass).sum(dim=1, keepdim=True).clamp(max=values.shape[1] - 1)
    threshold = sorted_shift.gather(1, last).masked_fill(mass >= 1.0, float("inf"))
    return values.masked_fill(shifted > threshold, NEG_INF)


def _uniforms(generators: Sequence[torch.Generator | None], device: torch.device) -> torch.Tensor:
    if any(g is None for g in generators):
        raise ValueError("a sampling row has no generator")
    return torch.tensor([torch.rand((), generator=g, dtype=torch.float64).item() for g in generators],
                        dtype=torch.float32, device=device)[:, None]


ARGMAX_BLOCK = 128


def first_argmax(scores: torch.Tensor) -> torch.Tensor:
    """torch.argmax(scores, dim=-1) of a [n, V] tensor: each row's first index of its maximum.

    torch's CPU argmax walks a row element by element (2.6 ms for [32, 49152] fp32 here), while
    amax is vectorised (0.1 ms). So: every block's maximum, the first block holding the row's
    maximum, then the first index in that block -- the same index (NaN counts as the maximum in
    both, as in torch.argmax)."""
    n, vocab = scores.shape
    if vocab % ARGMAX_BLOCK or scores.device.type != "cpu":
        return torch.argmax(scores, dim=-1)
    blocks = scores.reshape(n, vocab // ARGMAX_BLOCK, ARGMAX_BLOCK)
    block = torch.argmax(blocks.amax(dim=-1), dim=-1)  # [n]: first block with the row maximum
    inside = torch.argmax(blocks[torch.arange(n, device=scores.device), block], dim=-1)
    return block * ARGMAX_BLOCK + inside


def sample(scores: torch.Tensor, generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """Column of one draw per row from softmax(scores) by inverse CDF (one uniform from each row's generator)."""
    cdf = torch.softmax(scores, dim=-1).cumsum(dim=-1)
    u = _uniforms(generators, scores.device)
    # First column whose cumulative mass exceeds u * total: always one with non-zero probability.
    return torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp(max=scores.shape[-1] - 1).squeeze(1)


@dataclass
class Choice:
    """Each row's next id [B] and its logprob [B] under the processed distribution, and the alternatives
    of the rows that ask for them."""
    ids: torch.Tensor
    logprobs: torch.Tensor
    top: Alternatives | None = None
    failed: dict[int, str] = field(default_factory=dict)  # rows whose output constraint broke: why

    def record(self, rows: list[int], columns: torch.Tensor, logp: torch.Tensor,
               vocab_ids: torch.Tensor | None = None) -> None:
        """These rows chose `columns` [n] of their log-softmax `logp` [n, C]; column c of row j is the id
        vocab_ids[j, c] (None: the column is the id)."""
        ids = columns if vocab_ids is None else vocab_ids.gather(1, columns[:, None]).squeeze(1)
        logprobs = logp.gather(1, columns[:, None]).squeeze(1)
        if len(rows) == self.ids.shape[0]:
            self.ids, self.logprobs = ids, logprobs
        else:
            target = torch.tensor(rows, dtype=torch.long, device=ids.device)
            self.ids[target] = ids
            self.logprobs[target] = logprobs
        if self.top is not None:
            self.top.record(rows, logp, vocab_ids)


def _choose_dense(scores: torch.Tensor, sb: SamplingBatch, rows: list[int],
                  candidates: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The chosen ids of these rows (sorted) and the log-softmax [n, V] of their processed scores."""
    params = [sb.params[i] for i in rows]
    index = torch.tensor(rows, dtype=torch.long, device=scores.device)
    dense = scores if len(rows) == scores.shape[0] else scores[index]
    dense = warp_dense(dense, params, sb.temperature[index], candidates)
    ids = first_argmax(dense)
    sampled = [j for j, p in enumerate(params) if p.sampling]
    if sampled:
        pick = torch.tensor(sampled, dtype=torch.long, device=scores.device)
        ids[pick] = sample(dense[pick], [sb.generators[rows[j]] for j in sampled])
    # log_softmax + gather is about twice as fast on CPU as logsumexp over the same [n, V].
    return ids, torch.log_softmax(dense, dim=-1)


def choose(scores: torch.Tensor, sb: SamplingBatch, candidates: int = CANDIDATES) -> Choice:
    """Next id, its logprob (under the warped distribution) and any alternatives for every row of the
    processed fp32 `scores` [B, V] (`worker.processors` ran first): the warpers, then the draw."""
    batch, vocab = scores.shape
    choice = Choice(torch.zeros(batch, dtype=torch.long, device=scores.device),
                    torch.zeros(batch, dtype=torch.float32, device=scores.device),
                    Alternatives.empty(sb.params, vocab, scores.device))
    in_candidates = set(sb.candidate_rows)
    dense_rows = [i for i in range(batch) if i not in in_candidates]
    if sb.candidate_rows:
        rows = sb.candidate_rows
        index = torch.tensor(rows, dtype=torch.long, device=scores.device)
        cand = warp_candidates(scores[index], [sb.params[i] for i in rows], sb.temperature[index], candidates)
        fit = [j for j, spilled in enumerate(cand.spill) if not spilled]
        dense_rows += [rows[j] for j, spilled in enumerate(cand.spill) if spilled]
        if fit:
            pick = torch.tensor(fit, dtype=torch.long, device=scores.device)
            values = cand.values[pick]
            column = sample(values, [sb.generators[rows[j]] for j in fit])
            choice.record([rows[j] for j in fit], column, torch.log_softmax(values, dim=-1), cand.ids[pick])
    if dense_rows:
        dense_rows.sort()
        choice.record(dense_rows, *_choose_dense(scores, sb, dense_rows, candidates))
    return choice

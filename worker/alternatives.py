"""`top_n_tokens`: each asking row's most likely ids under the distribution its token was chosen from.

Only rows that ask pay: their alternatives come from their own rows of the log-softmax the chosen
token's logprob is read from (the processed scores; for plain greedy rows, the raw logits). Ids the
warpers removed keep their place with logprob -inf, so a row always gets min(n, vocab) entries.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from common.schemas import SamplingParams, Token

from .warpers import NEG_INF


def best_first(logp: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest values of each row of `logp` [n, C] and their columns, largest first; equal values
    by lowest column, as argmax breaks ties (torch.topk's order among equals is unspecified)."""
    values, columns = torch.topk(logp, k, dim=-1)
    order = columns.argsort(dim=-1)
    values, columns = values.gather(1, order), columns.gather(1, order)
    order = values.argsort(dim=-1, descending=True, stable=True)
    return values.gather(1, order), columns.gather(1, order)


@dataclass
class Alternatives:
    """Row rows[j] of the batch reports its best counts[j] ids: ids[j] with logprobs[j] (most likely first)."""
    rows: list[int]
    counts: list[int]
    ids: torch.Tensor  # [r, max(counts)]
    logprobs: torch.Tensor  # [r, max(counts)]

    @classmethod
    def empty(cls, params: Sequence[SamplingParams], vocab: int, device: torch.device) -> Alternatives | None:
        """Room for the rows whose top_n_tokens > 0; None when no row asks."""
        rows = [i for i, p in enumerate(params) if p.top_n_tokens > 0]
        if not rows:
            return None
        counts = [min(params[i].top_n_tokens, vocab) for i in rows]
        shape = (len(rows), max(counts))
        return cls(rows, counts, torch.zeros(shape, dtype=torch.long, device=device),
                   torch.full(shape, NEG_INF, dtype=torch.float32, device=device))

    @classmethod
    def of_logits(cls, logits: torch.Tensor, params: Sequence[SamplingParams]) -> Alternatives | None:
        """For rows whose logits nothing processes (plain greedy): the log-softmax of the asking rows only."""
        top = cls.empty(params, logits.shape[-1], logits.device)
        if top is not None:
            index = torch.tensor(top.rows, dtype=torch.long, device=logits.device)
            top.record(top.rows, torch.log_softmax(logits[index].float(), dim=-1))
        return top

    def record(self, rows: Sequence[int], logp: torch.Tensor, vocab_ids: torch.Tensor | None = None) -> None:
        """Fill in those of `rows` that ask, from their log-softmax `logp` [len(rows), C]; column c of row j
        is the id vocab_ids[j, c] (None: the column is the id)."""
        slot = {row: j for j, row in enumerate(self.rows)}
        asking = [j for j, row in enumerate(rows) if row in slot]
        if not asking:
            return
        pick = torch.tensor(asking, dtype=torch.long, device=logp.device)
        k = min(self.ids.shape[1], logp.shape[1])  # a row's C always holds its own count
        values, columns = best_first(logp[pick], k)
        target = torch.tensor([slot[rows[j]] for j in asking], dtype=torch.long, device=logp.device)
        self.ids[target, :k] = columns if vocab_ids is None else vocab_ids[pick].gather(1, columns)
        self.logprobs[target, :k] = values

    def tokens(self, decode_one: Callable[[int], str], special_ids: frozenset[int]) -> dict[int, tuple[Token, ...]]:
        """Each asking row's alternatives as Tokens, by batch row (one host transfer for all of them)."""
        ids, logprobs = torch.stack([self.ids.double(), self.logprobs.double()]).tolist()
        out = {}
        for j, (row, count) in enumerate(zip(self.rows, self.counts)):
            out[row] = tuple(Token(id=int(t), text=decode_one(int(t)), logprob=lp, special=int(t) in special_ids)
                             for t, lp in zip(ids[j][:count], logprobs[j][:count]))
        return out

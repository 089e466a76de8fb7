"""Prefill of newcomers in chunks, so a long prompt never stalls the running streams for long.

A group of admitted rows is left-padded once; each engine step then feeds the next columns of all its
rows (at most `budget` padded tokens) into the group's own KV cache, between decode steps of the
running batch. When the last column is in, the group's last-position logits pick the first tokens
and the group joins the batch. The result is the same as one forward over the whole prompts: each
chunk attends to every earlier column through the cache, under the same causal+padding mask.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from common.schemas import PrefillToken

from .batch import PrefillInputs, Row, prefill_inputs
from .kvcache import SlotCache, reserve_for
from .model import LoadedModel, forward


LOGITS_TOKENS = 1024  # most positions whose full logits one forward keeps (1024 x 49152 bf16: ~100 MB)


class PendingPrefill:
    """One group of rows whose prompts are being fed into a fresh cache, chunk by chunk."""

    def __init__(self, rows: list[Row], loaded: LoadedModel, num_layers: int, max_rows: int) -> None:
        self.rows = rows
        self.loaded = loaded
        self.inputs: PrefillInputs = prefill_inputs([r.ids for r in rows], loaded.device)
        self.cache = SlotCache(num_layers, reserve=reserve_for(loaded.device), max_rows=max_rows)
        self.done = 0  # columns already in the cache
        self.want_prefill = any(r.job.want_prefill for r in rows)
        self._logprobs: list[torch.Tensor] = []  # per chunk: [n, cols] log p(next prompt column)

    @property
    def width(self) -> int:
        return int(self.inputs.input_ids.shape[1])

    def batch_mask(self) -> torch.Tensor:
        """[n, width] bool: which columns of the group's cache hold a row's tokens."""
        return self.inputs.mask

    @property
    def remaining_tokens(self) -> int:
        """Padded tokens still to feed."""
        return len(self.rows) * (self.width - self.done)

    def advance(self, budget: int) -> tuple[torch.Tensor | None, int]:
        """Feed the next columns, at most `budget` padded tokens (at least one column).

        Returns (the last position's logits [n, V] once the whole prompt is in, else None; tokens fed)."""
        n, start = len(self.rows), self.done
        end = min(self.width, start + max(1, budget // n))
        # Prompt logprobs need every position's logits: at most LOGITS_TOKENS positions per forward.
        step = max(1, LOGITS_TOKENS // n) if self.want_prefill else end - start
        inp = self.inputs
        while self.done < end:
            a, b = self.done, min(end, self.done + step)
            out = forward(self.loaded, inp.input_ids[:, a:b], inp.attention[:, :, a:b, :b], inp.position_ids[:, a:b],
                          self.cache, logits_to_keep=0 if self.want_prefill else 1)
            if self.want_prefill:
                self._keep_logprobs(out.logits, a, b)
            self.cache = out.cache
            self.done = b
        fed = n * (end - start)
        return (out.logits[:, -1, :] if end == self.width else None), fed

    def _keep_logprobs(self, logits: torch.Tensor, start: int, end: int, part: int = 64) -> None:
        """Log-probabilities of the prompt's next ids at these columns (never [cols, V] in fp32 at once)."""
        targets = self.inputs.input_ids[:, start + 1:end + 1]  # column j predicts column j + 1
        values = []
        for s in range(0, targets.shape[1], part):
            chunk = logits[:, s:s + part, :].float()[:, :targets.shape[1] - s]
            picked = chunk.gather(2, targets[:, s:s + part, None]).squeeze(2)
            values.append(picked - torch.logsumexp(chunk, dim=-1))
        if values:
            self._logprobs.append(torch.cat(values, dim=1))

    def prefill_details(self, i: int, decode_one: Callable[[int], str]) -> tuple[PrefillToken, ...]:
        """TGI's prefill details of row i: each prompt id with its log-probability given the ids before it."""
        row = self.rows[i]
        # A group one column wide (one-token prompts) predicts no prompt id: nothing was kept.
        kept = torch.cat(self._logprobs, dim=1)[i].tolist() if self._logprobs else []
        values = kept[self.width - row.prompt_len:]
        return prefill_details(row.ids[:row.prompt_len], values, decode_one)


def prefill_details(ids: Sequence[int], logprobs: Sequence[float],
                    decode_one: Callable[[int], str]) -> tuple[PrefillToken, ...]:
    """The first id has no log-probability (nothing precedes it); id j has logprobs[j - 1]."""
    values: list[float | None] = [None, *logprobs]
    return tuple(PrefillToken(id=t, text=decode_one(t), logprob=lp) for t, lp in zip(ids, values))

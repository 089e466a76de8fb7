"""Prefill of newcomers into the paged cache: only the tokens past each row's cached prefix are computed.

The group's rows take their cached prefix's blocks at creation (a row that asks for its prompt's
logprobs computes the whole prompt: TGI's prefill details need every position's logits). Each
engine step then feeds the next tokens, at most `budget` of them, packed into one sequence without
padding; a row's last prompt position keeps its logits, which pick its first token once the whole
group is in. When a row's prompt is written, its full blocks are registered for later prompts.
"""
from __future__ import annotations

from typing import Callable

import torch

from common.schemas import PrefillToken

from ..batch import Row
from ..model import LoadedModel, forward
from ..prefill import LOGITS_TOKENS, prefill_details
from .blocks import BlockPool
from .cache import KVPool, PagedCache


class PagedPrefill:
    """One group of rows whose uncached prompt tokens are being fed, chunk by chunk."""

    def __init__(self, rows: list[Row], loaded: LoadedModel, blocks: BlockPool, kv: KVPool) -> None:
        self.rows = rows
        self.loaded = loaded
        self.cache = PagedCache(blocks, kv)
        try:
            for row in rows:
                self.cache.tables.append(blocks.allocate(row.ids[:row.prompt_len], use_cache=not row.job.want_prefill))
        except Exception:
            self.cache.release()
            raise
        self.cached = [t.length for t in self.cache.tables]
        self.want_prefill = any(r.job.want_prefill for r in rows)
        self._last: dict[int, torch.Tensor] = {}  # row -> its last prompt position's logits [V]
        self._logprobs: dict[int, list[float]] = {i: [] for i, r in enumerate(rows) if r.job.want_prefill}

    @property
    def remaining_tokens(self) -> int:
        return sum(r.prompt_len - t.length for r, t in zip(self.rows, self.cache.tables))

    def batch_mask(self) -> torch.Tensor:
        """[n, longest] bool, each row's tokens right-aligned: the running batch's mask layout."""
        lengths = torch.tensor([r.prompt_len for r in self.rows], device=self.loaded.device)
        width = int(lengths.max())
        return torch.arange(width, device=self.loaded.device)[None, :] >= (width - lengths)[:, None]

    def advance(self, budget: int) -> tuple[torch.Tensor | None, int]:
        """Feed the next prompt tokens (at most `budget`, at least one). Returns (the rows' last-position
        logits [n, V] once every prompt is in, else None; tokens fed)."""
        left = max(1, min(budget, LOGITS_TOKENS) if self.want_prefill else budget)
        picks: list[tuple[int, int]] = []
        for i, (row, table) in enumerate(zip(self.rows, self.cache.tables)):
            todo = row.prompt_len - table.length
            if todo > 0 and left > 0:
                picks.append((i, min(todo, left)))
                left -= picks[-1][1]
        starts = [self.cache.tables[i].length for i, _ in picks]
        step = self.cache.begin_prefill([i for i, _ in picks], [n for _, n in picks])
        ids = [t for (i, n), s in zip(picks, starts) for t in self.rows[i].ids[s:s + n]]
        positions = [p for (_, n), s in zip(picks, starts) for p in range(s, s + n)]
        keep, owners = [], []  # packed positions whose logits are needed, and (row, prompt position) of each
        for (i, n), s, at in zip(picks, starts, step.starts):
            wanted = range(n) if i in self._logprobs else ([n - 1] if s + n == self.rows[i].prompt_len else [])
            keep.extend(at + j for j in wanted)
            owners.extend((i, s + j) for j in wanted)
        device = self.loaded.device
        try:
            out = forward(self.loaded, torch.tensor([ids], device=device), None,
                          torch.tensor([positions], device=device), self.cache,
                          keep=torch.tensor(keep, dtype=torch.long, device=device))
        finally:
            self.cache.step = None
        self._collect(out.logits[0], owners)
        fed = sum(n for _, n in picks)
        if self.remaining_tokens:
            return None, fed
        for table, row in zip(self.cache.tables, self.rows):
            self.cache.blocks.register(table, row.ids[:row.prompt_len])
        return torch.stack([self._last[i] for i in range(len(self.rows))]), fed

    def _collect(self, logits: torch.Tensor, owners: list[tuple[int, int]]) -> None:
        """Keep the last positions' logits, and the prompt logprobs of the rows that ask for them."""
        asked = [k for k, (i, _) in enumerate(owners) if i in self._logprobs]
        if asked:
            rows = [owners[k] for k in asked]
            targets = [self.rows[i].ids[p + 1] if p + 1 < self.rows[i].prompt_len else 0 for i, p in rows]
            chosen = logits[asked].float()
            picked = chosen.gather(1, torch.tensor(targets, device=chosen.device)[:, None]).squeeze(1)
            values = (picked - torch.logsumexp(chosen, dim=-1)).tolist()
            for (i, p), value in zip(rows, values):
                if p + 1 < self.rows[i].prompt_len:
                    self._logprobs[i].append(value)
        for k, (i, p) in enumerate(owners):
            if p == self.rows[i].prompt_len - 1:
                self._last[i] = logits[k]

    def prefill_details(self, i: int, decode_one: Callable[[int], str]) -> tuple[PrefillToken, ...]:
        """TGI's prefill details of row i (computed in full: its prompt did not use the cache)."""
        row = self.rows[i]
        return prefill_details(row.ids[:row.prompt_len], self._logprobs.get(i, []), decode_one)

"""Kirchenbauer et al. watermark as TGI applies it (§9.4): boost a greenlist seeded by the previous id."""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch

GAMMA = 0.5
DELTA = 2.0
HASH_KEY = 15485863


class Watermark:
    """Adds `delta` to a per-previous-id greenlist; greenlists are cached since randperm(V) costs ~0.5 ms."""

    def __init__(self, vocab_size: int, device: torch.device | str = "cpu", gamma: float = GAMMA,
                 delta: float = DELTA, hash_key: int = HASH_KEY, cache_size: int = 512) -> None:
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self.gamma = gamma
        self.delta = delta
        self.hash_key = hash_key
        self.cache_size = cache_size
        self._masks: OrderedDict[int, torch.Tensor] = OrderedDict()

    def greenlist_ids(self, prev_id: int) -> torch.Tensor:
        """TGI's greenlist: the first int(V*gamma) ids of randperm(V) seeded with hash_key * prev_id."""
        # Drawn on a CPU generator whatever the model's device, so the list is the same everywhere
        # (TGI used the device's generator; on CPU that is this exact computation).
        rng = torch.Generator(device="cpu")
        rng.manual_seed(self.hash_key * int(prev_id))
        perm = torch.randperm(self.vocab_size, generator=rng)
        return perm[: int(self.vocab_size * self.gamma)]

    def _mask(self, prev_id: int) -> torch.Tensor:
        mask = self._masks.get(prev_id)
        if mask is None:
            mask = torch.zeros(self.vocab_size, dtype=torch.bool)
            mask[self.greenlist_ids(prev_id)] = True
            mask = mask.to(self.device)
            self._masks[prev_id] = mask
            if len(self._masks) > self.cache_size:
                self._masks.popitem(last=False)
        else:
            self._masks.move_to_end(prev_id)
        return mask

    def apply(self, scores: torch.Tensor, rows: Sequence[int], prev_ids: Sequence[int]) -> torch.Tensor:
        """Add delta in place on each listed row's greenlist of `scores` [B, V]; other rows are untouched."""
        if not rows:
            return scores
        green = torch.stack([self._mask(p) for p in prev_ids]).to(scores.dtype) * self.delta
        index = torch.tensor(list(rows), dtype=torch.long, device=scores.device)
        return scores.index_add_(0, index, green)

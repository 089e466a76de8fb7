"""A KV cache with preallocated room to grow, so a decode step writes one column instead of re-concatenating."""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

RESERVE = 32  # spare columns allocated past the live window


class SlotLayer(DynamicLayer):
    """One layer's keys/values in buffers [B, H, capacity, D]; the live window is columns [start, end)."""

    def __init__(self, reserve: int = RESERVE) -> None:
        super().__init__()
        self.reserve = reserve
        self.kbuf: torch.Tensor | None = None
        self.vbuf: torch.Tensor | None = None
        self.start = 0
        self.end = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def _set(self, kbuf: torch.Tensor, vbuf: torch.Tensor, start: int, end: int) -> None:
        self.kbuf, self.vbuf, self.start, self.end = kbuf, vbuf, start, end
        self.keys = kbuf[:, :, start:end]
        self.values = vbuf[:, :, start:end]
        self.is_initialized = True
        self.device = kbuf.device

    def _fresh(self, like: torch.Tensor, batch: int, columns: int) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (batch, like.shape[1], columns, like.shape[3])
        return (torch.zeros(shape, dtype=like.dtype, device=like.device),
                torch.zeros(shape, dtype=like.dtype, device=like.device))

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object,
               **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        """Append q new columns (allocating or growing when full) and return the live window."""
        q = key_states.shape[-2]
        if self.kbuf is None:
            k, v = self._fresh(key_states, key_states.shape[0], q + self.reserve)
            self._set(k, v, 0, 0)
        elif self.end + q > self.kbuf.shape[2]:
            self._grow(q)
        assert self.kbuf is not None and self.vbuf is not None
        self.kbuf[:, :, self.end:self.end + q] = key_states
        self.vbuf[:, :, self.end:self.end + q] = value_states
        self._set(self.kbuf, self.vbuf, self.start, self.end + q)
        return self.keys, self.values

    def _grow(self, q: int) -> None:
        """Move the window to the front of a bigger buffer (amortised: grows by a quarter at least)."""
        assert self.kbuf is not None and self.vbuf is not None
        length = self.end - self.start
        k, v = self._fresh(self.kbuf, self.kbuf.shape[0], length + q + max(self.reserve, length // 4))
        k[:, :, :length] = self.kbuf[:, :, self.start:self.end]
        v[:, :, :length] = self.vbuf[:, :, self.start:self.end]
        self._set(k, v, 0, length)

    def get_seq_length(self) -> int:
        return self.end - self.start

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def select(self, indices: torch.Tensor, drop_front: int) -> None:
        """Keep rows `indices` and drop the first `drop_front` columns (padding nobody needs any more)."""
        assert self.kbuf is not None and self.vbuf is not None
        start = self.start + drop_front
        length = self.end - start
        k, v = self._fresh(self.kbuf, int(indices.numel()), length + self.reserve)
        k[:, :, :length] = self.kbuf[indices, :, start:self.end]
        v[:, :, :length] = self.vbuf[indices, :, start:self.end]
        self._set(k, v, 0, length)

    def merged(self, other: SlotLayer) -> SlotLayer:
        """A new layer with this layer's rows then `other`'s, both right-aligned (left padding)."""
        assert self.kbuf is not None and other.kbuf is not None
        assert self.vbuf is not None and other.vbuf is not None
        la, lb = self.get_seq_length(), other.get_seq_length()
        length = max(la, lb)
        ba, bb = self.kbuf.shape[0], other.kbuf.shape[0]
        k, v = self._fresh(self.kbuf, ba + bb, length + self.reserve)
        k[:ba, :, length - la:length] = self.keys
        v[:ba, :, length - la:length] = self.values
        k[ba:, :, length - lb:length] = other.keys
        v[ba:, :, length - lb:length] = other.values
        out = SlotLayer(self.reserve)
        out._set(k, v, 0, length)
        return out


class SlotCache(Cache):
    """The model-facing cache: one SlotLayer per decoder layer, all with the same window."""

    def __init__(self, num_layers: int, reserve: int = RESERVE) -> None:
        super().__init__(layers=[SlotLayer(reserve) for _ in range(num_layers)])

    @property
    def slot_layers(self) -> list[SlotLayer]:
        return self.layers  # type: ignore[return-value]

    def length(self) -> int:
        return self.slot_layers[0].get_seq_length() if self.layers else 0

    def select(self, indices: torch.Tensor, drop_front: int = 0) -> None:
        for layer in self.slot_layers:
            layer.select(indices, drop_front)

    def merged(self, other: SlotCache) -> SlotCache:
        out = SlotCache(0)
        out.layers = [a.merged(b) for a, b in zip(self.slot_layers, other.slot_layers)]
        return out

"""A KV cache laid out for continuous batching: appends write one column, leaving rows move only the rows
that fill their slots, and newcomers are written into free slots instead of rebuilding the batch.

Each layer keeps keys/values in buffers [row capacity, H, column capacity, D]; live rows are [0, n)
and live columns [start, end). Columns left of a row's own tokens are padding hidden by the attention
mask, so whatever finite values they hold (zeros, or a departed row's keys) never matter.
"""
from __future__ import annotations

from typing import Sequence

import torch
from transformers.cache_utils import Cache, DynamicLayer

RESERVE = 32  # spare columns allocated past the live window
# On a GPU the decode step's cost hardly depends on the buffer's width, while every reallocation
# throws away the step's captured CUDA graphs (worker/graphs.py): keep more spare columns there.
GPU_RESERVE = 256


def reserve_for(device: torch.device) -> int:
    """Spare columns for KV buffers on `device`."""
    return RESERVE if device.type == "cpu" else GPU_RESERVE


class SlotLayer(DynamicLayer):
    """One decoder layer's keys and values (see the module docstring for the layout)."""

    def __init__(self, reserve: int = RESERVE, max_rows: int = 0) -> None:
        super().__init__()
        self.reserve = reserve
        self.max_rows = max_rows  # a hint for row-capacity growth (0: grow to what is needed)
        self.kbuf = torch.empty(0)
        self.vbuf = torch.empty(0)
        self.rows = 0
        self.start = 0
        self.end = 0

    # ---- what the model calls ---------------------------------------------------------------------

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True

    @torch.inference_mode()
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object,
               **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        """Append q new columns for the live rows and return the live window."""
        q = key_states.shape[-2]
        if not self.is_initialized:
            rows = key_states.shape[0]
            self._reallocate(key_states, rows, q + self.reserve)
            self.rows, self.start, self.end = rows, 0, 0
            self.is_initialized = True
        else:
            self.make_room(q)
        self.kbuf[:self.rows, :, self.end:self.end + q] = key_states
        self.vbuf[:self.rows, :, self.end:self.end + q] = value_states
        self.advance(q)
        return self.keys, self.values

    def make_room(self, q: int) -> None:
        """Ensure the buffers have q free columns past the window (reallocating them if not)."""
        if self.end + q > self.kbuf.shape[2]:
            self._make_room(q)

    def advance(self, q: int) -> None:
        """The window gains the q columns past its end (written by the caller, e.g. a replayed graph)."""
        self.end += q
        self._refresh()

    def get_seq_length(self) -> int:
        return self.end - self.start

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    # ---- buffer management ------------------------------------------------------------------------

    def _refresh(self) -> None:
        self.keys = self.kbuf[:self.rows, :, self.start:self.end]
        self.values = self.vbuf[:self.rows, :, self.start:self.end]

    def _reallocate(self, like: torch.Tensor, rows: int, columns: int) -> None:
        """Fresh zeroed buffers; the caller copies whatever must survive."""
        shape = (rows, like.shape[1], columns, like.shape[3])
        self.kbuf = torch.zeros(shape, dtype=like.dtype, device=like.device)
        self.vbuf = torch.zeros(shape, dtype=like.dtype, device=like.device)
        self.device = like.device

    def _resize(self, rows: int, columns: int, offset: int = 0) -> None:
        """Move the live rows/window into new buffers (window starting at column `offset`)."""
        old_k, old_v = self.kbuf, self.vbuf
        length = self.end - self.start
        self._reallocate(old_k, rows, columns)
        self.kbuf[:self.rows, :, offset:offset + length] = old_k[:self.rows, :, self.start:self.end]
        self.vbuf[:self.rows, :, offset:offset + length] = old_v[:self.rows, :, self.start:self.end]
        self.start, self.end = offset, offset + length

    def _make_room(self, q: int) -> None:
        """Grow the column capacity (amortised: by a quarter of the window at least)."""
        length = self.end - self.start
        self._resize(self.kbuf.shape[0], length + q + max(self.reserve, length // 4))

    @torch.inference_mode()
    def compact(self, holes: list[int], movers: list[int], rows: int, drop_front: int) -> None:
        """Rows `movers` move into slots `holes`; `rows` stay live; the first `drop_front` columns go."""
        self.start += drop_front
        if holes:
            src = torch.tensor(movers, device=self.kbuf.device)
            dst = torch.tensor(holes, device=self.kbuf.device)
            self.kbuf[dst, :, self.start:self.end] = self.kbuf[src, :, self.start:self.end]
            self.vbuf[dst, :, self.start:self.end] = self.vbuf[src, :, self.start:self.end]
        self.rows = rows
        length = self.end - self.start
        capacity = self.kbuf.shape[0]
        if rows and (rows * 4 <= capacity or length * 4 + 4 * self.reserve <= self.kbuf.shape[2]):
            # Mostly empty: give the memory back rather than hold a peak-sized batch forever.
            self._resize(max(rows, 1), length + self.reserve)
        self._refresh()

    @torch.inference_mode()
    def absorb(self, other: SlotLayer) -> None:
        """Append `other`'s live rows, right-aligned with ours (the shorter side is left-padded)."""
        la, lb = self.end - self.start, other.end - other.start
        length = max(la, lb)
        needed_rows = self.rows + other.rows
        capacity = self.kbuf.shape[0]
        if needed_rows > capacity or self.end - length < 0:
            grown = min(2 * capacity, self.max_rows) if self.max_rows else needed_rows
            self._resize(max(grown, needed_rows), length + self.reserve, offset=length - la)
        elif la < length:
            # Our rows gain padding columns on the left: clear what a departed row may have left there.
            self.kbuf[:self.rows, :, self.end - length:self.start] = 0
            self.vbuf[:self.rows, :, self.end - length:self.start] = 0
        self.start = self.end - length
        rows = slice(self.rows, needed_rows)
        self.kbuf[rows, :, self.end - lb:self.end] = other.keys
        self.vbuf[rows, :, self.end - lb:self.end] = other.values
        if lb < length:
            # The newcomers' padding columns may hold a departed row's keys: masked, but cleared anyway.
            self.kbuf[rows, :, self.start:self.end - lb] = 0
            self.vbuf[rows, :, self.start:self.end - lb] = 0
        self.rows = needed_rows
        self._refresh()


class SlotCache(Cache):
    """The model-facing cache: one SlotLayer per decoder layer, all with the same rows and window."""

    def __init__(self, num_layers: int, reserve: int = RESERVE, max_rows: int = 0) -> None:
        super().__init__(layers=[SlotLayer(reserve, max_rows) for _ in range(num_layers)])

    @property
    def slot_layers(self) -> list[SlotLayer]:
        return self.layers  # type: ignore[return-value]

    def length(self) -> int:
        return self.slot_layers[0].get_seq_length() if self.layers else 0

    def release(self) -> None:
        """Every row leaves (a failed forward): the buffers go."""
        for layer in self.slot_layers:
            layer.kbuf = layer.vbuf = layer.keys = layer.values = torch.empty(0)
            layer.rows = layer.start = layer.end = 0

    def compact(self, holes: list[int], movers: list[int], rows: int, drop_front: int = 0) -> None:
        for layer in self.slot_layers:
            layer.compact(holes, movers, rows, drop_front)

    def retire(self, histories: dict[int, Sequence[int]]) -> None:
        """Rows about to leave (see PagedCache.retire): nothing here outlives its row."""

    def absorb(self, other: SlotCache) -> None:
        for mine, theirs in zip(self.slot_layers, other.slot_layers):
            mine.absorb(theirs)

"""The paged KV cache's tensors and the rows that use them.

`KVPool` holds every layer's keys and values as blocks, [num_blocks, n_kv, block_size, D] each (a
block's slots of one KV head contiguous, as the decode attention reads them). `PagedCache` is the
rows of one batch or prefill group: their block tables in a shared `BlockPool`. It offers the
operations `worker.batch.Batch` performs on a cache (`compact`, `absorb`), none of which moves a
key: rows leaving give their blocks back, rows joining bring their tables along.

Before each forward the cache lays out that step (`PrefillStep` for new prompt tokens, packed
without padding; `DecodeStep` for one token per row): the slot each new token writes and, for
attention, the rows' block tables and lengths. The fused forward (worker/models/base.py) writes
each layer's new keys and values through the step and attends through it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


from .blocks import BlockPool, Table

NEG_INF = float("-inf")


class KVPool:
    """Every layer's key and value blocks."""

    def __init__(self, layers: int, num_blocks: int, block_size: int, n_kv: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        # One block more than the BlockPool hands out: the scratch block padding rows of a captured
        # decode graph write into (worker/paged/graphs.py).
        shape = (num_blocks + 1, n_kv, block_size, head_dim)
        self.scratch_block = num_blocks
        # Zeroed: attention masks every slot past a row's length, but a masked slot must still hold
        # a finite value (torch's ops add -inf to its score and multiply its value by 0).
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.block_size = block_size
        self.device = device

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Keys/values [N, n_kv, D] of N new tokens into their flat slots [N]."""
        bs = self.block_size
        blocks, offsets = slots // bs, slots % bs
        self.keys[layer][blocks, :, offsets] = k
        self.values[layer][blocks, :, offsets] = v

    def gather(self, layer: int, tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values of rows with block tables [R, nb], dense: [R, n_kv, nb * block_size, D]."""
        r, nb = tables.shape
        k, v = self.keys[layer][tables], self.values[layer][tables]  # [R, nb, n_kv, bs, D]
        n_kv, bs, d = k.shape[2], k.shape[3], k.shape[4]
        return (k.transpose(1, 2).reshape(r, n_kv, nb * bs, d), v.transpose(1, 2).reshape(r, n_kv, nb * bs, d))


@dataclass
class DecodeStep:
    """One new token per row: row i writes slot `slots[i]` and attends over its first `lengths[i]` tokens."""
    slots: torch.Tensor  # [R] long
    tables: torch.Tensor  # [R, nb] long, padded with block 0 (masked)
    lengths: torch.Tensor  # [R] long, the new token included
    biases: dict[int | None, torch.Tensor]  # additive [R, nb * bs] per sliding window (None: full attention)


@dataclass
class PrefillStep:
    """New prompt tokens of several rows packed into one sequence: row i's are tokens [starts[i], starts[i] + counts[i])."""
    slots: torch.Tensor  # [N] long
    starts: list[int]
    counts: list[int]
    lengths: list[int]  # each row's tokens once these are written (cached prefix + earlier chunks + these)
    tables: list[torch.Tensor]  # each row's blocks covering `lengths`


def decode_biases(lengths: torch.Tensor, columns: int, windows: Sequence[int], dtype: torch.dtype) -> dict[int | None, torch.Tensor]:
    """Additive masks [R, columns] over left-aligned rows: 0 on a row's first `length` columns, -inf past
    them; a sliding window of w also hides the columns w or more before the row's newest token."""
    cols = torch.arange(columns, device=lengths.device)[None, :]
    last = lengths[:, None] - 1
    zeros = torch.zeros((lengths.shape[0], columns), dtype=dtype, device=lengths.device)
    out: dict[int | None, torch.Tensor] = {None: zeros.masked_fill(cols > last, NEG_INF)}
    for w in windows:
        out[w] = out[None].masked_fill(cols <= last - w, NEG_INF)
    return out


class PagedCache:
    """The rows of a batch or prefill group: block tables in the shared pool (see the module docstring)."""

    def __init__(self, blocks: BlockPool, kv: KVPool) -> None:
        self.blocks, self.kv = blocks, kv
        self.tables: list[Table] = []
        self.step: PrefillStep | DecodeStep | None = None

    def __len__(self) -> int:
        return len(self.tables)

    def length(self) -> int:
        return max((t.length for t in self.tables), default=0)

    # ---- what Batch does to a cache ---------------------------------------------------------------

    def compact(self, holes: list[int], movers: list[int], rows: int, drop_front: int = 0) -> None:
        """Rows `movers` move into slots `holes`, `rows` stay; every other row leaves and frees its blocks."""
        kept = (set(range(rows)) - set(holes)) | set(movers)
        for i, table in enumerate(self.tables):
            if i not in kept:
                self.blocks.release(table)
        for hole, mover in zip(holes, movers):
            self.tables[hole] = self.tables[mover]
        del self.tables[rows:]

    def retire(self, histories: dict[int, Sequence[int]]) -> None:
        """Rows about to leave, with their tokens (prompt + generated): each one's full blocks are
        registered, so a later prompt that carries this answer on (the next turn of a chat) reuses them.
        Only written tokens count: a row's last chosen token was never fed, so it has no keys yet."""
        for i, ids in histories.items():
            table = self.tables[i]
            self.blocks.register(table, ids[:table.length])

    def absorb(self, other: PagedCache) -> None:
        """Append `other`'s rows (their blocks are in the same pool: nothing is copied)."""
        self.tables.extend(other.tables)
        other.tables = []

    def release(self) -> None:
        """Every row leaves (a failed forward, a shutdown)."""
        for table in self.tables:
            self.blocks.release(table)
        self.tables = []

    def __del__(self) -> None:  # a cache dropped with rows still in it must not keep their blocks
        if self.tables:
            self.release()

    # ---- laying out a forward --------------------------------------------------------------------

    def begin_prefill(self, rows: Sequence[int], counts: Sequence[int]) -> PrefillStep:
        """Rows `rows` each write their next `counts` prompt tokens in this forward."""
        device, bs, pool = self.kv.device, self.kv.block_size, self.blocks
        slots: list[int] = []
        starts, lengths, tables = [], [], []
        for i, n in zip(rows, counts):
            table = self.tables[i]
            pool.reserve(table, table.length + n)
            starts.append(len(slots))
            slots.extend(pool.slot(table, p) for p in range(table.length, table.length + n))
            table.length += n
            lengths.append(table.length)
            tables.append(torch.tensor(table.blocks[:-(-table.length // bs)], dtype=torch.long, device=device))
        self.step = PrefillStep(slots=torch.tensor(slots, dtype=torch.long, device=device), starts=starts,
                                counts=list(counts), lengths=lengths, tables=tables)
        return self.step

    def begin_decode(self, windows: Sequence[int], dtype: torch.dtype) -> DecodeStep:
        """Every row writes one token (a fresh block where its last one is full)."""
        device, bs, pool = self.kv.device, self.kv.block_size, self.blocks
        slots = []
        for table in self.tables:
            pool.reserve(table, table.length + 1)
            slots.append(pool.slot(table, table.length))
            table.length += 1
        lengths = [t.length for t in self.tables]
        width = -(-max(lengths) // bs)
        rows = [t.blocks[:width] + [0] * (width - min(width, len(t.blocks))) for t in self.tables]
        length_t = torch.tensor(lengths, dtype=torch.long, device=device)
        self.step = DecodeStep(slots=torch.tensor(slots, dtype=torch.long, device=device),
                               tables=torch.tensor(rows, dtype=torch.long, device=device), lengths=length_t,
                               biases=decode_biases(length_t, width * bs, windows, dtype))
        return self.step

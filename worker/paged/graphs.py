"""Decode steps through the paged KV cache replayed as CUDA graphs.

As worker/graphs.py does for the slot cache, with one difference that makes it simpler: the block
pool never moves, so a captured graph stays valid for the pool's lifetime. A graph is captured
per padded row count (worker.graphs.bucket_for) and per block-table width (a power of two), and
its inputs are the step's ids, positions, slots, block tables and lengths. Padding rows write
into the pool's scratch block (one past the blocks the BlockPool hands out) and attend to one
token of it, so their softmax stays finite and no row's keys are touched. The host-side
bookkeeping (which slot each row writes, new blocks) is the PagedCache's, as without graphs.

With `capture=False` the same in-place step runs eagerly: the CPU tests check it against the
ordinary paged forward.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from ..graphs import bucket_for, capture
from ..models import FusedDecoder, head_logits
from .cache import PagedCache

log = logging.getLogger(__name__)


def width_bucket(blocks: int) -> int:
    """Block-table widths are padded to a power of two (at least 4)."""
    width = 4
    while width < blocks:
        width *= 2
    return width


@dataclass
class _Step:
    ids: torch.Tensor  # [R, 1]
    positions: torch.Tensor  # [R, 1]
    slots: torch.Tensor  # [R]
    tables: torch.Tensor  # [R, W]
    lengths: torch.Tensor  # [R]
    logits: torch.Tensor | None = None
    graph: Any = None


class PagedDecodeGraphs:
    """Runs a batch's paged decode forward through FusedDecoder.decode_in_place_paged, as CUDA graphs when `capture`."""

    def __init__(self, fast: FusedDecoder, head: torch.nn.Module, softcap: float | None = None,
                 capture: bool = True) -> None:
        self.fast, self.head, self.softcap, self.capture = fast, head, softcap, capture
        self._steps: dict[tuple[int, int], _Step] = {}
        self._pool: int | None = None  # id of the KVPool the graphs were captured on
        self.captures = 0

    def accepts(self, input_ids: torch.Tensor, cache: Any) -> bool:
        """A decode step on a PagedCache whose positions are all inside the rotary tables."""
        return (input_ids.shape[1] == 1 and isinstance(cache, PagedCache) and len(cache) == input_ids.shape[0]
                and cache.length() + 1 <= self.fast.rope_positions and self.fast.rope_positions > 0)

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, position_ids: torch.Tensor, cache: PagedCache) -> torch.Tensor:
        kv = cache.kv
        if id(kv) != self._pool:  # another engine's pool: graphs of the old one must not run
            self._steps.clear()
            self._pool = id(kv)
        step = cache.begin_decode(self.fast.windows, kv.keys[0].dtype)
        rows, width = step.tables.shape
        padded, wide = bucket_for(rows, max(rows, 32)), width_bucket(width)
        graph_step = self._steps.get((padded, wide))
        if graph_step is None:
            graph_step = self._steps[(padded, wide)] = self._new_step(padded, wide, kv.device)
        self._load(graph_step, input_ids, position_ids, step, kv)
        if not self.capture:
            graph_step.logits = self._run(graph_step, kv)
        elif graph_step.graph is None:
            self._capture_or_run(graph_step, kv)
        else:
            graph_step.graph.replay()
        assert graph_step.logits is not None
        return graph_step.logits[:rows, None, :]

    @staticmethod
    def _new_step(rows: int, width: int, device: torch.device) -> _Step:
        def longs(*shape: int) -> torch.Tensor:
            return torch.zeros(shape, dtype=torch.long, device=device)

        return _Step(ids=longs(rows, 1), positions=longs(rows, 1), slots=longs(rows), tables=longs(rows, width),
                     lengths=longs(rows))

    @staticmethod
    def _load(s: _Step, input_ids: torch.Tensor, position_ids: torch.Tensor, step: Any, kv: Any) -> None:
        rows, width = step.tables.shape
        scratch = kv.scratch_block
        s.ids[:rows].copy_(input_ids)
        s.positions[:rows].copy_(position_ids)
        s.slots[:rows].copy_(step.slots)
        s.slots[rows:] = scratch * kv.block_size
        s.tables.fill_(scratch)
        s.tables[:rows, :width].copy_(step.tables)
        s.lengths[:rows].copy_(step.lengths)
        s.lengths[rows:] = 1

    def _run(self, s: _Step, kv: Any) -> torch.Tensor:
        hidden = self.fast.decode_in_place_paged(s.ids, s.positions, s.slots, s.tables, s.lengths, kv)
        return head_logits(self.head, hidden.view(hidden.shape[0], -1), self.softcap)

    def _capture_or_run(self, s: _Step, kv: Any) -> None:
        try:
            s.graph, s.logits = capture(lambda: self._run(s, kv))
            self.captures += 1
        except RuntimeError:
            log.exception("capturing a paged decode graph failed; decode steps run without graphs from now on")
            self.capture = False
            self._steps.clear()
            s.logits = self._run(s, kv)

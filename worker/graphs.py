"""Decode steps replayed as CUDA graphs.

On a GPU a decode step of a small model is bound by the host: Python issues the forward's ~20
kernels per layer one by one, and the GPU waits for them (on an H200, SmolLM2-135M took 11 ms per
step with one row and 16.5 ms with 32). A CUDA graph records the kernels of one step once and
replays them with one launch.

A graph's shapes and addresses are fixed, so each is captured for a row count and the KV buffers
it reads and writes:
- rows are padded up to a bucket (1, 2, 4, 8, 16, 24, 32, then multiples of 16) within the
  buffers' row capacity, so rows joining and leaving rarely need a new graph. Padding rows compute
  on stale but finite inputs, attend to one column (so their softmax stays finite), and write only
  into free slots of the buffers, whose contents the KV cache never reads unmasked;
- the step's inputs (ids, positions, the per-column mask bias and the column to write) go into the
  graph's own input tensors before each replay; the cache's bookkeeping (its window's end) moves on
  the host afterwards, as `SlotLayer.update` would;
- when the cache's buffers are reallocated (they grow every few dozen columns), every graph made
  for the old ones is dropped and the next step captures anew.

With `capture=False` the same in-place step runs eagerly: the CPU tests check it against the
ordinary forward, and the CUDA tests check the replayed graphs against it.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from .kvcache import SlotCache, SlotLayer
from .models import FusedDecoder, head_logits
from .models.layers import fill_column_bias

log = logging.getLogger(__name__)

SMALL_BUCKETS = (1, 2, 4, 8, 16, 24, 32)


def capture(run: Any) -> tuple[Any, torch.Tensor]:
    """Run `run` once eagerly on a side stream (warming its kernels), then record it as a CUDA graph and
    replay it once (capturing records without running): (the graph, its output, which holds this step's
    result now and each replay's later)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    graph.replay()
    return graph, out


def bucket_for(rows: int, capacity: int) -> int:
    """The padded row count for `rows` live rows in buffers of `capacity` rows."""
    for size in SMALL_BUCKETS:
        if rows <= size <= capacity:
            return size
    padded = -(-rows // 16) * 16
    return padded if padded <= capacity else rows


@dataclass
class _Step:
    """One captured step's inputs and output (the graph reads and writes exactly these tensors)."""
    ids: torch.Tensor  # [R, 1] long
    positions: torch.Tensor  # [R, 1] long
    column_bias: torch.Tensor  # [R, C] model dtype: 0 where a row attends, -inf elsewhere
    column: torch.Tensor  # [1] long: the column this step writes
    logits: torch.Tensor | None = None  # [R, V] model dtype
    graph: Any = None  # torch.cuda.CUDAGraph once captured


class DecodeGraphs:
    """Runs a batch's decode forward through FusedDecoder.decode_in_place, as CUDA graphs when `capture`."""

    def __init__(self, fast: FusedDecoder, head: torch.nn.Module, softcap: float | None = None,
                 capture: bool = True) -> None:
        self.fast, self.head, self.softcap, self.capture = fast, head, softcap, capture
        self._steps: dict[tuple[int, int], _Step] = {}
        self._buffers: tuple[int, ...] = ()
        self.captures = 0  # graphs captured so far (for tests and logs)

    @staticmethod
    def usable(fast: FusedDecoder | None) -> bool:
        return fast is not None and fast.rope_positions > 0

    def accepts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache: Any) -> bool:
        """A decode step (one token per row, on a SlotCache) whose positions are all in the rotary
        tables: a row's position is below the window's length, known here without a device sync."""
        return (input_ids.shape[1] == 1 and isinstance(cache, SlotCache) and cache.length() > 0
                and attention_mask.shape[-1] <= self.fast.rope_positions)

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                 cache: SlotCache) -> torch.Tensor:
        """Logits [B, 1, V] of a decode step (`attention_mask` [B, 1, 1, window] bool, as for the forward)."""
        layers = cache.slot_layers
        for layer in layers:
            layer.make_room(1)
        first = layers[0]
        rows, window = input_ids.shape[0], attention_mask.shape[-1]
        if first.rows != rows or first.end + 1 - first.start != window:
            raise ValueError(f"decode inputs for {rows} rows x {window} columns do not fit the cache "
                             f"({first.rows} rows, window {first.start}..{first.end})")
        padded = bucket_for(rows, first.kbuf.shape[0])
        buffers = tuple(t.data_ptr() for layer in layers for t in (layer.kbuf, layer.vbuf))
        if buffers != self._buffers:  # graphs made for freed buffers must never run again
            self._steps.clear()
            self._buffers = buffers
        step = self._steps.get((padded, first.kbuf.shape[2]))
        if step is None:
            step = self._steps[(padded, first.kbuf.shape[2])] = self._new_step(padded, first)
        self._load(step, input_ids, attention_mask.reshape(rows, window), position_ids, first)
        if not self.capture:
            step.logits = self._run(step, layers)
        elif step.graph is None:
            self._capture_or_run(step, layers)
        else:
            step.graph.replay()
        for layer in layers:
            layer.advance(1)
        assert step.logits is not None
        return step.logits[:rows, None, :]

    def _new_step(self, padded: int, layer: SlotLayer) -> _Step:
        device, columns = layer.kbuf.device, layer.kbuf.shape[2]
        return _Step(ids=torch.zeros((padded, 1), dtype=torch.long, device=device),
                     positions=torch.zeros((padded, 1), dtype=torch.long, device=device),
                     column_bias=torch.zeros((padded, columns), dtype=layer.kbuf.dtype, device=device),
                     column=torch.zeros(1, dtype=torch.long, device=device))

    @staticmethod
    def _load(step: _Step, input_ids: torch.Tensor, mask: torch.Tensor, position_ids: torch.Tensor,
              layer: SlotLayer) -> None:
        rows, end = mask.shape[0], layer.end
        step.ids[:rows].copy_(input_ids)
        step.positions[:rows].copy_(position_ids)
        fill_column_bias(step.column_bias, mask, layer.start)
        step.column_bias[rows:, end] = 0.0  # padding rows attend to the column they write
        step.column.fill_(end)

    def _run(self, step: _Step, layers: list[SlotLayer]) -> torch.Tensor:
        hidden = self.fast.decode_in_place(step.ids, step.positions, step.column_bias, step.column,
                                           [(layer.kbuf, layer.vbuf) for layer in layers])
        return head_logits(self.head, hidden.view(hidden.shape[0], -1), self.softcap)

    def _capture_or_run(self, step: _Step, layers: list[SlotLayer]) -> None:
        """Capture the step's graph; if capturing fails, say so and run this and later steps eagerly."""
        try:
            self._capture(step, layers)
        except RuntimeError:
            log.exception("capturing a CUDA graph failed; decode steps run without graphs from now on")
            self.capture = False
            self._steps.clear()
            step.logits = self._run(step, layers)

    def _capture(self, step: _Step, layers: list[SlotLayer]) -> None:
        step.graph, step.logits = capture(lambda: self._run(step, layers))
        self.captures += 1
        log.debug("captured a decode graph for %d rows x %d columns", step.ids.shape[0], step.column_bias.shape[1])

"""The one place that chooses each row's next token.

A step's choice is a strategy picked per batch:
- **the fused greedy kernel** (`worker/cpu_kernels.py`): argmax and logprob of the raw bf16 logits in
  one pass, when no row samples and no processor needs the full distribution;
- **processors, warpers and the draw** otherwise: the batch's logits processors (`worker.processors`,
  the output constraint's mask among them) on fp32 scores, then `worker.sampling.choose`.

Both give the same ids and logprobs for a plain greedy batch (the kernel is checked against torch's ops
at load, `worker/models/checks.py`).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

from . import processors
from .alternatives import Alternatives
from .sampling import Choice, SamplingBatch, choose
from .watermark import Watermark

if TYPE_CHECKING:
    from .batch import Batch

GreedyKernel = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def plain_greedy(sb: SamplingBatch, steps: list[processors.LogitsProcessor]) -> bool:
    """No row samples and nothing transforms the logits: each row takes the argmax of its raw logits."""
    return sb.all_greedy and not steps


class TokenChooser:
    def __init__(self, watermark: Watermark | None, greedy_kernel: GreedyKernel | None = None) -> None:
        self.watermark = watermark
        self.greedy_kernel = greedy_kernel

    def choose(self, logits: torch.Tensor, batch: Batch) -> Choice:
        """Each row's next id, logprob and any alternatives, from its last position's logits [n, V] (model dtype)."""
        sb = batch.sampling
        steps = processors.for_batch(sb, batch.seen, batch.counts, [r.ids[-1] for r in batch.rows], self.watermark)
        if self.greedy_kernel is not None and plain_greedy(sb, steps):
            ids, logprobs = self.greedy_kernel(logits)
            return Choice(ids, logprobs, Alternatives.of_logits(logits, sb.params))
        return choose(processors.apply(steps, logits.float()), sb)

"""The one place that chooses each row's next token.

A step's choice is a strategy picked per batch:
- **the fused greedy kernel** (`worker/cpu_kernels.py`): argmax and logprob of the raw bf16 logits in
  one pass, when no row samples and no processor needs the full distribution;
- **processors, warpers and the draw** otherwise: the batch's logits processors (`worker.processors`,
  the output constraint's mask among them, last) on fp32 scores, then `worker.sampling.choose`.

A constrained row's matcher (`worker.constraints`) gives its mask before the choice and consumes the
chosen id after it; a matcher that refuses the id fails that row alone (`Choice.failed`). The masks of
all constrained rows are filled in one batched call per step, right before the choice. Filling them
in a thread during the forward instead was measured (bench.structured, 2 vCPUs): llguidance's threads
and torch's OpenMP team then contend for the cores, and the constrained batch fell to 0.41x the
unconstrained tok/s, against 0.92x in line.

Both give the same ids and logprobs for a plain greedy batch (the kernel is checked against torch's ops
at load, `worker/models/checks.py`).
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable

import torch

from . import processors
from .alternatives import Alternatives
from .constraints import Masks, consume
from .sampling import Choice, SamplingBatch, choose
from .watermark import Watermark

if TYPE_CHECKING:
    from .batch import Batch

GreedyKernel = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def plain_greedy(sb: SamplingBatch, steps: list[processors.LogitsProcessor]) -> bool:
    """No row samples and nothing but constraint masks transforms the logits: each row takes the argmax
    of its (masked) raw logits."""
    return sb.all_greedy and all(getattr(step, "keeps_greedy_kernel", False) for step in steps)


class TokenChooser:
    def __init__(self, watermark: Watermark | None, greedy_kernel: GreedyKernel | None = None,
                 on_mask: Callable[[float], None] | None = None) -> None:
        self.watermark = watermark
        self.greedy_kernel = greedy_kernel
        self.masks: Masks | None = None  # built at the first constrained row (it starts llguidance's threads)
        self.on_mask = on_mask  # gets each step's mask time (the metrics)

    def choose(self, logits: torch.Tensor, batch: Batch) -> Choice:
        """Each row's next id, logprob and any alternatives, from its last position's logits [n, V] (model dtype)."""
        sb = batch.sampling
        steps = processors.for_batch(sb, batch.seen, batch.counts, [r.ids[-1] for r in batch.rows], self.watermark)
        constrained = [i for i, r in enumerate(batch.rows) if r.constraint is not None]
        if constrained:
            steps.append(self._mask(batch, constrained, logits))
        if self.greedy_kernel is not None and plain_greedy(sb, steps):
            logits = processors.apply(steps, logits)  # masks only, on the model's logits in place
            ids, logprobs = self.greedy_kernel(logits)
            choice = Choice(ids, logprobs, Alternatives.of_logits(logits, sb.params))
        else:
            choice = choose(processors.apply(steps, logits.float()), sb)
        if constrained:
            matchers = [batch.rows[i].constraint for i in constrained]
            chosen = choice.ids[torch.tensor(constrained, dtype=torch.long, device=choice.ids.device)].tolist()
            for i, why in zip(constrained, consume(matchers, chosen)):
                if why is not None:
                    choice.failed[i] = why
        return choice

    def _mask(self, batch: Batch, constrained: list[int], logits: torch.Tensor) -> processors.ConstraintMask:
        matchers = [batch.rows[i].constraint for i in constrained]
        t0 = time.perf_counter()
        masks = self._masks(batch.vocab_size)
        bias = masks.bias(masks.fill(matchers), logits.dtype, logits.device)
        if self.on_mask is not None:
            self.on_mask(time.perf_counter() - t0)
        return processors.ConstraintMask(constrained, bias)

    def _masks(self, vocab_size: int) -> Masks:
        if self.masks is None:
            self.masks = Masks(vocab_size)
        return self.masks

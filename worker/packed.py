"""bf16 linear layers with their weights laid out once for oneDNN, for CPU decode.

On CPU, torch's bf16 `F.linear` hands the weight to oneDNN, which reorders it into its blocked
layout on every call. For decode-sized inputs that reorder costs as much as the product itself
(measured here: a 1536x576 bf16 projection at 1 row, 115 us plain vs 65 us prepacked; the 49152-row
LM head 9.7 ms vs 5.5 ms). Doing it once at load runs the same kernel on the same numbers (the
outputs matched bit for bit in those measurements); a probe at load checks the logits agree and
falls back to the plain layers if they do not.
"""
from __future__ import annotations

import logging
from typing import Callable

import torch
from torch import nn

log = logging.getLogger(__name__)


def prepacking_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Only bf16 on CPU with oneDNN's prepacked linear ops present (they are internal to torch)."""
    if device.type != "cpu" or dtype != torch.bfloat16 or not torch.backends.mkldnn.is_available():
        return False
    ops = torch.ops.mkldnn
    if not (hasattr(ops, "_reorder_linear_weight") and hasattr(ops, "_linear_pointwise")):
        return False
    try:  # oneDNN's bf16 path needs avx512bw/vl/dq or avx_ne_convert; other CPUs raise here
        ops._reorder_linear_weight(torch.zeros(16, 16, dtype=dtype), 1)
    except RuntimeError as exc:
        log.info("no prepacked bf16 linears on this CPU: %s", str(exc).splitlines()[0])
        return False
    return True


class PackedLinear(nn.Module):
    """y = x W^T (+ b) through oneDNN with W reordered once; `rows_hint` is the expected row count."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, rows_hint: int) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows_hint)
        self.bias = None if bias is None else bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def pack_linears(model: nn.Module, rows_hint: int) -> Callable[[], None]:
    """Swap every nn.Linear of `model` (the LM head included) for a PackedLinear; returns an undo.

    A head tied to the input embedding gets its own packed copy; the embedding keeps the plain one."""
    swapped: list[tuple[nn.Module, str, nn.Linear]] = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, PackedLinear(child.weight, child.bias, rows_hint))
                swapped.append((parent, name, child))

    def undo() -> None:
        for parent, name, original in swapped:
            setattr(parent, name, original)

    return undo


@torch.inference_mode()
def prepack(model: nn.Module, rows_hint: int, vocab_size: int) -> bool:
    """Prepack the model's linear layers if that gives the same logits on a probe; True if kept."""
    probe = torch.arange(1, 9, dtype=torch.long)[None] % vocab_size
    before = model(input_ids=probe).logits.float()
    undo = pack_linears(model, rows_hint)
    try:
        after = model(input_ids=probe).logits.float()
        same = torch.allclose(before, after, rtol=1e-3, atol=1e-3)
    except RuntimeError as exc:
        log.warning("prepacked linear layers failed (%s); using plain ones", exc)
        same = False
    if not same:
        undo()
        log.warning("prepacked linear layers changed the logits; using plain ones")
    return same

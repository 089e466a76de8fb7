"""tgq's fused forwards, one file per decoder family, registered here by the config's `model_type`.

A family is a `FusedDecoder` subclass (worker/models/base.py) that overrides only what its
architecture does differently; the layers they share are in worker/models/layers.py. A model whose
type is not here, or whose fused forward does not reproduce transformers' logits at load, keeps
transformers' forward, and the log says why.
"""
from __future__ import annotations

import logging
from typing import Any

from ..cpu_kernels import CpuKernels
from ..cpu_paged import PagedAttention
from .base import FusedDecoder
from .checks import accepted, head_logits, probe_deviation
from .gemma import Gemma
from .gemma2 import Gemma2
from .llama import Llama
from .mistral import Mistral
from .phi3 import Phi3
from .qwen2 import Qwen2
from .qwen3 import Qwen3

log = logging.getLogger(__name__)

FAMILIES: dict[str, type[FusedDecoder]] = {
    kind: family for family in (Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma2, Phi3) for kind in family.model_types}

__all__ = ["FAMILIES", "FusedDecoder", "build_fast", "family_for", "head_logits", "probe_deviation",
           "unsupported_reason"]


def family_for(model: Any) -> type[FusedDecoder] | None:
    return FAMILIES.get(getattr(getattr(model, "config", None), "model_type", ""))


def unsupported_reason(model: Any) -> str | None:
    """Why no fused forward can run `model` (None: one can)."""
    family = family_for(model)
    if family is None:
        kind = getattr(getattr(model, "config", None), "model_type", None)
        return f"model type {kind!r} has no fused forward (families: {', '.join(sorted(FAMILIES))})"
    return family.unsupported(model)


def build_fast(model: Any, rows_hint: int, pack: bool, kernels: CpuKernels | None = None,
               paged_kernel: PagedAttention | None = None) -> FusedDecoder | None:
    """The family's fused forward for `model` if it has one whose probe logits match transformers' (else None)."""
    reason = unsupported_reason(model)
    if reason is not None:
        log.info("transformers' forward kept: %s", reason)
        return None
    family = family_for(model)
    assert family is not None
    fast = family(model, rows_hint, pack, kernels, paged_kernel)
    return fast if accepted(model, fast) else None

"""Gemma: Llama's layers with embeddings scaled by sqrt(hidden) (transformers' embedding module does
it), norms that scale by 1 + weight in fp32, and a GeLU (tanh) MLP (the module's own activation)."""
from __future__ import annotations

import torch
from torch import nn

from . import layers as L
from .base import FusedDecoder


class Gemma(FusedDecoder):
    model_types = ("gemma",)
    norm_kernel = False  # the compiled norm rounds before scaling, as Llama does; Gemma rounds after

    def norm_weight(self, norm: nn.Module) -> torch.Tensor:
        return 1.0 + norm.weight.float()

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return L.offset_rms_norm(x, weight, self.eps)

"""Qwen3: Llama's layers plus an RMSNorm over each q and k head before the rotary embedding."""
from __future__ import annotations

import torch
from torch import nn

from . import layers as L
from .base import FusedDecoder, Layer


class Qwen3(FusedDecoder):
    model_types = ("qwen3",)

    def layer_extras(self, layer: nn.Module) -> tuple[torch.Tensor, ...]:
        return layer.self_attn.q_norm.weight, layer.self_attn.k_norm.weight

    def _qk_heads(self, layer: Layer, qk: torch.Tensor) -> torch.Tensor:
        q_norm, k_norm = layer.extras
        return torch.cat([L.rms_norm(qk[:, :, :self.n_q], q_norm, self.eps),
                          L.rms_norm(qk[:, :, self.n_q:], k_norm, self.eps)], dim=2)

"""Phi-3: Llama's arithmetic with q/k/v and gate/up already fused in the checkpoint, and rotary
embeddings over part of each head where `partial_rotary_factor` < 1 (the tables are that wide)."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .base import FusedDecoder, Weights


class Phi3(FusedDecoder):
    model_types = ("phi3",)

    @staticmethod
    def weights(layer: nn.Module) -> Weights:
        att, mlp = layer.self_attn, layer.mlp
        for m in (att.qkv_proj, mlp.gate_up_proj):
            if not isinstance(m, nn.Linear):
                raise AttributeError(f"{type(m).__name__} is not nn.Linear")
        return Weights(qkv=att.qkv_proj.weight, qkv_bias=att.qkv_proj.bias, gate_up=mlp.gate_up_proj.weight,
                       gate_up_bias=mlp.gate_up_proj.bias, o=att.o_proj, down=mlp.down_proj)

    @staticmethod
    def share_weights(layer: nn.Module, weights: Weights) -> None:
        """The checkpoint's own fused weights are used as they are: nothing to share."""

    @staticmethod
    def activation(layer: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        return layer.mlp.activation_fn

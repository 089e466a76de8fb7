"""Gemma 2: Gemma's layers with a norm after attention and around the MLP, soft-capped attention
scores and final logits, and sliding windows on the layers `layer_types` names (every other one)."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import Layer
from .gemma import Gemma


class Gemma2(Gemma):
    model_types = ("gemma2",)

    def __init__(self, model: Any, *args: Any, **kwargs: Any) -> None:
        cfg = model.config
        self.attn_softcap = getattr(cfg, "attn_logit_softcapping", None) or None
        self.final_softcap = getattr(cfg, "final_logit_softcapping", None) or None
        super().__init__(model, *args, **kwargs)

    def layer_extras(self, layer: nn.Module) -> tuple[torch.Tensor, ...]:
        return (self.norm_weight(layer.post_attention_layernorm), self.norm_weight(layer.pre_feedforward_layernorm),
                self.norm_weight(layer.post_feedforward_layernorm))

    def _finish(self, layer: Layer, x: torch.Tensor, attn: torch.Tensor,
                next_norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # norm2 (transformers' post_attention_layernorm) is the first of the extras here, not the MLP's.
        post_attn, pre_mlp, post_mlp = layer.extras
        x, h = self._add_norm(x, self._norm(layer.o(attn), post_attn), pre_mlp)
        return self._add_norm(x, self._norm(self._mlp(layer, h), post_mlp), next_norm)

"""Qwen2 / Qwen2.5: Llama's layers with q/k/v biases (fused with the weights); sliding windows only on
the layers `layer_types` names, when the config enables them."""
from __future__ import annotations

from .base import FusedDecoder


class Qwen2(FusedDecoder):
    model_types = ("qwen2",)

"""Mistral: Llama's layers; a `sliding_window` in the config holds for every layer (base.layer_windows)."""
from __future__ import annotations

from .base import FusedDecoder


class Mistral(FusedDecoder):
    model_types = ("mistral",)

"""Llama (and SmolLM2, Llama 3 with its rope scaling through transformers' rotary tables): the base layout."""
from __future__ import annotations

from typing import Any

from .base import FusedDecoder


class Llama(FusedDecoder):
    model_types = ("llama",)

    @classmethod
    def unsupported(cls, model: Any) -> str | None:
        if getattr(model.config, "pretraining_tp", 1) != 1:
            return "pretraining_tp != 1"
        return super().unsupported(model)

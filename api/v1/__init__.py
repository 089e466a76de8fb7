"""The OpenAI-compatible dialect: /v1/chat/completions, /v1/completions, /v1/models."""
from __future__ import annotations

from . import errors
from .routes import GUARDED_ENDPOINTS, bp

errors.register(bp)

__all__ = ["GUARDED_ENDPOINTS", "bp", "errors"]

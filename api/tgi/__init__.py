"""TGI's dialect: 0.5.0's routes (`routes`: /generate, /generate_stream, /, /invocations, /health,
/metrics) with their body parsing, SSE framing, responses and errors, and TGI 3's additions (`tgi3`:
/info, /tokenize, /chat_tokenize)."""
from __future__ import annotations

from . import errors, routes, tgi3

for _bp in (routes.bp, tgi3.bp):
    errors.register(_bp)

BLUEPRINTS = (routes.bp, tgi3.bp)
GUARDED_ENDPOINTS = routes.GENERATION_ENDPOINTS | tgi3.GUARDED_ENDPOINTS

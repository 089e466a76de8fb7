"""Errors at the HTTP boundary, whatever the dialect.

Each dialect renders a ServiceError in its own envelope and registers that renderer on its own
blueprints (`register_envelope`): TGI's JSON (`api.tgi.errors`) and OpenAI's (`api.v1.errors`). Here
live what every envelope needs to say (a body too large, an unexpected failure, Redis down) and the
app-wide handlers for requests no blueprint owns: routing failures answer as axum does (404 with an
empty body, 405 with `Allow`), and the routes outside the dialects (/metrics, /docs, ...) use the
default envelope the app factory names.
"""
from __future__ import annotations

import logging
from typing import Callable

import redis
from flask import Blueprint, Flask, Response, current_app
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound, RequestEntityTooLarge

from common.errors import ServiceError, Unavailable

log = logging.getLogger(__name__)

TEXT = "text/plain; charset=utf-8"
Render = Callable[[ServiceError], Response]


class PayloadTooLarge(ServiceError):
    """Body over `--max-body-bytes` (tgq's limit; TGI 0.5.0 relied on axum's 2 MB default)."""
    status_code = 413
    error_type = "payload_too_large"
    metric_label = "payload_too_large"

    def __init__(self, limit: int) -> None:
        super().__init__(f"Payload too large: the request body must be at most {limit} bytes")


class InternalError(ServiceError):
    status_code = 500
    error_type = "internal"
    metric_label = "internal"

    def __init__(self) -> None:
        super().__init__("Internal server error")


def plain_response(status: int, text: str) -> Response:
    return Response(text, status=status, content_type=TEXT)


def _handlers(render: Render) -> dict[type[Exception] | int, Callable[[Exception], Response]]:
    def service(exc: Exception) -> Response:
        assert isinstance(exc, ServiceError)
        return render(exc)

    def redis_down(exc: Exception) -> Response:
        # The one boundary where a Redis outage becomes a clean 503 (never a traceback).
        log.warning("Redis unreachable: %s", exc)
        return render(Unavailable())

    def too_large(exc: Exception) -> Response:
        return render(PayloadTooLarge(int(current_app.config.get("MAX_CONTENT_LENGTH") or 0)))

    def http(exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return plain_response(exc.code or 500, exc.description or "")

    def unexpected(exc: Exception) -> Response:
        if isinstance(exc, HTTPException):
            return http(exc)
        log.exception("unhandled error")
        return render(InternalError())

    return {ServiceError: service, redis.exceptions.ConnectionError: redis_down,
            redis.exceptions.TimeoutError: redis_down, RequestEntityTooLarge: too_large,
            HTTPException: http, Exception: unexpected}


def register_envelope(target: Blueprint | Flask, render: Render) -> None:
    """Errors raised in `target`'s views answer in `render`'s envelope."""
    for kind, handler in _handlers(render).items():
        target.register_error_handler(kind, handler)


def register_error_handlers(app: Flask, default: Render) -> None:
    """App-wide: the default envelope for routes outside the dialects, and axum's routing failures."""
    register_envelope(app, default)

    @app.errorhandler(NotFound)
    def _not_found(exc: NotFound) -> Response:
        return Response(b"", status=404)  # axum's fallback: empty body

    @app.errorhandler(MethodNotAllowed)
    def _method(exc: MethodNotAllowed) -> Response:
        resp = Response(b"", status=405)
        if exc.valid_methods:
            resp.headers["Allow"] = ", ".join(sorted(exc.valid_methods))
        return resp

"""HTTP error bodies: TGI's JSON envelope for service errors, axum's plain text for the rest; on
the /v1 routes (blueprint `v1`) OpenAI's envelope for everything (`api.v1.errors`)."""
from __future__ import annotations

import logging

import orjson
import redis
from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound, RequestEntityTooLarge

from common.errors import ServiceError, Unavailable

from .parsing import Rejection
from .v1 import errors as v1_errors

log = logging.getLogger(__name__)

JSON = "application/json"
TEXT = "text/plain; charset=utf-8"
V1_BLUEPRINT = "v1"


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


def error_body(exc: ServiceError) -> bytes:
    return orjson.dumps({"error": exc.message, "error_type": exc.error_type})


def error_response(exc: ServiceError) -> Response:
    if request and request.blueprint == V1_BLUEPRINT:
        return v1_errors.error_response(exc)
    return Response(error_body(exc), status=exc.status_code, content_type=JSON)


def plain_response(status: int, text: str) -> Response:
    return Response(text, status=status, content_type=TEXT)


def register_error_handlers(app: Flask, max_body_bytes: int) -> None:
    @app.errorhandler(ServiceError)
    def _service(exc: ServiceError) -> Response:
        return error_response(exc)

    @app.errorhandler(Rejection)
    def _rejection(exc: Rejection) -> Response:
        if request.blueprint == V1_BLUEPRINT:
            return v1_errors.error_response(v1_errors.InvalidRequest(exc.text))
        return plain_response(exc.status, exc.text)

    # The one boundary where a Redis outage becomes a clean 503 (never a traceback).
    @app.errorhandler(redis.exceptions.ConnectionError)
    @app.errorhandler(redis.exceptions.TimeoutError)
    def _redis_down(exc: Exception) -> Response:
        log.warning("Redis unreachable: %s", exc)
        return error_response(Unavailable())

    @app.errorhandler(RequestEntityTooLarge)
    def _too_large(exc: RequestEntityTooLarge) -> Response:
        return error_response(PayloadTooLarge(max_body_bytes))

    @app.errorhandler(NotFound)
    def _not_found(exc: NotFound) -> Response:
        return Response(b"", status=404)  # axum's fallback: empty body

    @app.errorhandler(MethodNotAllowed)
    def _method(exc: MethodNotAllowed) -> Response:
        resp = Response(b"", status=405)
        if exc.valid_methods:
            resp.headers["Allow"] = ", ".join(sorted(exc.valid_methods))
        return resp

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException) -> Response:
        return plain_response(exc.code or 500, exc.description or "")

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        log.exception("unhandled error")
        return error_response(InternalError())

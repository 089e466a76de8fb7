"""Errors on the /v1 routes in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

The core raises tgq's ServiceErrors (TGI's statuses); this module gives each its OpenAI status and
type, so that the `openai` SDK raises its matching class (BadRequestError for 400, NotFoundError
for 404, RateLimitError for 429, InternalServerError for 5xx, ...).
"""
from __future__ import annotations

from typing import Any

import orjson
from flask import Blueprint, Response

from common.errors import (ConstraintFailed, GenerationError, IncompleteGeneration, Overloaded, ServiceError,
                           Unauthorized, Unavailable, ValidationError)

from ..errors import register_envelope

JSON = "application/json"


class InvalidRequest(ServiceError):
    """A /v1 body that is not a valid request (OpenAI: 400 invalid_request_error), naming the field."""
    status_code = 400
    error_type = "invalid_request_error"
    metric_label = "validation"

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


# ServiceError class -> (status, type, code) on the /v1 routes; anything else keeps its own status.
_OPENAI: dict[type[ServiceError], tuple[int, str, str | None]] = {
    ValidationError: (400, "invalid_request_error", None),
    Unauthorized: (401, "authentication_error", "invalid_api_key"),
    Overloaded: (429, "rate_limit_error", "rate_limit_exceeded"),
    ConstraintFailed: (400, "invalid_request_error", "invalid_constraint"),  # before its base class
    GenerationError: (500, "server_error", None),
    IncompleteGeneration: (500, "server_error", None),
    Unavailable: (503, "server_error", "service_unavailable"),
}


def openai_error(exc: ServiceError) -> tuple[int, dict[str, Any]]:
    """The status and the body `{"error": {...}}` for a ServiceError on a /v1 route."""
    status, kind, code = exc.status_code, exc.error_type, None
    for cls, mapped in _OPENAI.items():
        if isinstance(exc, cls):
            status, kind, code = mapped
            break
    if status == 404:
        kind, code = "invalid_request_error", "model_not_found"
    elif status == 413:
        kind, code = "invalid_request_error", "request_too_large"
    return status, {"error": {"message": exc.message, "type": kind, "param": getattr(exc, "param", None),
                              "code": code}}


def error_response(exc: ServiceError) -> Response:
    status, body = openai_error(exc)
    return Response(orjson.dumps(body), status=status, content_type=JSON)


def register(bp: Blueprint) -> None:
    register_envelope(bp, error_response)

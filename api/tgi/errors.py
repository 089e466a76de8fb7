"""TGI's error envelope: `{"error": "...", "error_type": "..."}` with the error's status, and axum's
plain-text rejections of bodies it cannot extract (415, 400, 422)."""
from __future__ import annotations

import orjson
from flask import Blueprint, Response

from common.errors import ServiceError

from ..errors import plain_response, register_envelope
from .parsing import Rejection

JSON = "application/json"


def error_body(exc: ServiceError) -> bytes:
    return orjson.dumps({"error": exc.message, "error_type": exc.error_type})


def error_response(exc: ServiceError) -> Response:
    return Response(error_body(exc), status=exc.status_code, content_type=JSON)


def register(bp: Blueprint) -> None:
    register_envelope(bp, error_response)
    bp.register_error_handler(Rejection, lambda exc: plain_response(exc.status, exc.text))

"""Errors that cross the API boundary, with TGI 0.5.0's statuses, messages and `error_type`s."""
from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    """An error with an HTTP status and a TGI-style JSON body `{"error": ..., "error_type": ...}`."""
    status_code = 500
    error_type = "internal"
    metric_label = "generation"  # the `err` label of tgi_request_failure

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_dict(self) -> dict[str, Any]:
        return {"error": self.message, "error_type": self.error_type}


class ValidationError(ServiceError):
    status_code = 422
    error_type = "validation"
    metric_label = "validation"

    def __init__(self, detail: str) -> None:
        super().__init__(f"Input validation error: {detail}")
        self.detail = detail


class Overloaded(ServiceError):
    status_code = 429
    error_type = "overloaded"
    metric_label = "overloaded"

    def __init__(self) -> None:
        super().__init__("Model is overloaded")


class GenerationError(ServiceError):
    status_code = 424
    error_type = "generation"
    metric_label = "generation"

    def __init__(self, detail: str) -> None:
        super().__init__(f"Request failed during generation: {detail}")


class ConstraintFailed(GenerationError):
    """The request's output constraint could not be followed in the worker (a grammar past the parser's
    limits, or one no sequence of tokens can write). TGI's routes answer it as a failed generation (424,
    TGI's envelope); /v1 answers the client's 400, since the constraint is the request's."""


class IncompleteGeneration(ServiceError):
    status_code = 500
    error_type = "incomplete_generation"
    metric_label = "incomplete"

    def __init__(self) -> None:
        super().__init__("Incomplete generation")


class Unavailable(ServiceError):
    """Redis cannot be reached (tgq's own addition; TGI has no queue to lose)."""
    status_code = 503
    error_type = "unavailable"
    metric_label = "unavailable"

    def __init__(self, detail: str = "the job queue (Redis) cannot be reached") -> None:
        super().__init__(f"Service unavailable: {detail}")


class Unauthorized(ServiceError):
    status_code = 401
    error_type = "unauthorized"
    metric_label = "unauthorized"

    def __init__(self) -> None:
        super().__init__("Unauthorized: a valid `Authorization: Bearer <api key>` header is required")


class WorkerFatal(Exception):
    """The worker process cannot go on (model failed to load, device lost): exit and be restarted."""


# error_type sent by a worker -> the ServiceError the API raises for it
ERROR_TYPES: dict[str, type[ServiceError]] = {
    "generation": GenerationError,
    "constraint": ConstraintFailed,  # read as "generation" by an API of the previous release
    "incomplete_generation": IncompleteGeneration,
}

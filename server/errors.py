"""Errors that requests can cause, and what each means on every transport: the one mapping.

Each class names the failure a client must act on, and carries the gRPC status name, the HTTP
status and the error type that the transports report for it (server/transport/errors.py for
gRPC, server/service/json_api for the JSON routes). Anything else that escapes is a bug.
"""

from __future__ import annotations

from collections.abc import Iterable

# The most characters of a client's value that an error message quotes. A message travels in
# the grpc-message header, and a header too large for a proxy (Envoy) makes it drop the one
# HTTP/2 connection that carries every other client's calls too.
QUOTE_MAX_CHARS = 120
# The longest message any error carries, whatever it quotes: a backstop for messages built from
# other libraries' texts (protobuf's JSON parser quotes field names and values).
MESSAGE_MAX_CHARS = 1024


def quoted(value: object, limit: int = QUOTE_MAX_CHARS) -> str:
    """A client's value for an error message: repr of a string cut to `limit` characters.

    Values that are not strings (a JSON role that is an object, say) are named by their type:
    printing them could take long (a 5000-digit integer) or fail (deep nesting).
    """
    if isinstance(value, str):
        if len(value) <= limit:
            return repr(value)
        return f"{value[:limit]!r}... ({len(value)} characters)"
    if value is None or isinstance(value, bool | float):
        return repr(value)
    if isinstance(value, int) and abs(value) < 10**limit:
        return repr(value)
    return f"a value of type {type(value).__name__}"


def clipped(message: str, limit: int = MESSAGE_MAX_CHARS) -> str:
    """`message` cut to `limit` characters, saying so."""
    if len(message) <= limit:
        return message
    return f"{message[:limit]}... (message cut at {limit} characters)"


class GlmError(Exception):
    """Base of the errors a client caused or can act on; the message says what to fix.

    Messages are cut to MESSAGE_MAX_CHARS; values a client sent are quoted with `quoted`.
    """

    grpc_status = "UNKNOWN"
    http_status = 500
    error_type = "server_error"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        message = clipped(message)
        super().__init__(message)
        self.message = message
        # The request field at fault, when there is one (OpenAI's error objects name it).
        self.param = param


class InvalidArgumentError(GlmError):
    """The request is malformed or breaks a published limit."""

    grpc_status = "INVALID_ARGUMENT"
    http_status = 400
    error_type = "invalid_request_error"


class UnsupportedMediaTypeError(InvalidArgumentError):
    """A JSON route was sent a body that is not JSON by its content type (gRPC, say)."""

    http_status = 415


class NotFoundError(GlmError):
    """The request names something (a model, a route) that does not exist."""

    grpc_status = "NOT_FOUND"
    http_status = 404
    error_type = "not_found_error"


class FailedPreconditionError(GlmError):
    """The request names a model that cannot do what was asked (wrong kind)."""

    grpc_status = "FAILED_PRECONDITION"
    http_status = 400
    error_type = "invalid_request_error"


class UnavailableError(GlmError):
    """The server cannot serve the request now (models still loading, shutting down)."""

    grpc_status = "UNAVAILABLE"
    http_status = 503
    error_type = "service_unavailable_error"


class ResourceExhaustedError(GlmError):
    """A bounded queue is full; the client should retry later."""

    grpc_status = "RESOURCE_EXHAUSTED"
    http_status = 429
    error_type = "overloaded_error"


def unknown_model(model_id: str, available: Iterable[str]) -> NotFoundError:
    """Build the NOT_FOUND error for an unknown model id, listing the ids that exist."""
    names = ", ".join(sorted(available)) or "none"
    return NotFoundError(
        f"unknown model {quoted(model_id)}; available models: {names}", param="model"
    )


class InternalError(GlmError):
    """A bug: the details are in the server log under the incident id the message names."""

    grpc_status = "INTERNAL"
    http_status = 500
    error_type = "server_error"


class UnauthenticatedError(GlmError):
    """The call carries no API key, or one the server does not know."""

    grpc_status = "UNAUTHENTICATED"
    http_status = 401
    error_type = "invalid_request_error"


class PermissionDeniedError(GlmError):
    """The caller's API key may not use what the call asks for (a model outside its list)."""

    grpc_status = "PERMISSION_DENIED"
    http_status = 403
    error_type = "permission_error"


class RateLimitedError(GlmError):
    """The caller's API key is over one of its limits; `retry_after_s` says when to come back."""

    grpc_status = "RESOURCE_EXHAUSTED"
    http_status = 429
    error_type = "rate_limit_error"

    def __init__(self, message: str, *, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

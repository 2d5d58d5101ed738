"""Errors that requests can cause, independent of any transport.

Each class names the failure a client must act on; the transport layer maps them to gRPC status
codes in one place (server/transport/errors.py). Anything else that escapes is a bug.
"""

from __future__ import annotations

from collections.abc import Iterable


class GlmError(Exception):
    """Base of the errors a client caused or can act on; the message says what to fix."""


class InvalidArgumentError(GlmError):
    """The request is malformed or breaks a published limit."""


class NotFoundError(GlmError):
    """The request names something (a model) that does not exist."""


class FailedPreconditionError(GlmError):
    """The request names a model that cannot do what was asked (wrong kind)."""


class UnavailableError(GlmError):
    """The server cannot serve the request now (models still loading, shutting down)."""


class ResourceExhaustedError(GlmError):
    """A bounded queue is full; the client should retry later."""


def unknown_model(model_id: str, available: Iterable[str]) -> NotFoundError:
    """Build the NOT_FOUND error for an unknown model id, listing the ids that exist."""
    names = ", ".join(sorted(available)) or "none"
    return NotFoundError(f"unknown model {model_id!r}; available models: {names}")

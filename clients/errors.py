"""The one exception type the glm-api clients raise for failed calls."""

from __future__ import annotations

import grpc


class GlmClientError(Exception):
    """A call to glm-api failed with a gRPC status other than OK.

    Both clients raise it for every failed RPC, unary or streaming, so that callers catch one
    thing instead of the several ``grpc.RpcError`` subclasses that the sync and asyncio stacks
    raise. The original error stays reachable as ``__cause__``.

    Attributes:
        code: The gRPC status code, e.g. ``grpc.StatusCode.INVALID_ARGUMENT``.
        message: The status message the server (or the gRPC runtime) gave.
    """

    code: grpc.StatusCode
    message: str

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        # Passing both values to Exception keeps the error picklable: unpickling calls
        # __init__(*self.args).
        super().__init__(code, message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> GlmClientError:
        """Describe a failed RPC; the caller raises the result ``from`` the original."""
        # Every RpcError a channel raises is also a grpc.Call with code() and details(), but the
        # base class itself promises neither, so fall back rather than fail while reporting.
        code_of = getattr(error, "code", None)
        details_of = getattr(error, "details", None)
        code = code_of() if callable(code_of) else None
        details = details_of() if callable(details_of) else None
        # A Call without details (rare) has nothing better to say than its code; str() of a Call
        # is a multi-line debug dump, but for any other RpcError it is all there is.
        fallback = "" if callable(code_of) else str(error)
        message = details if isinstance(details, str) else fallback
        if not isinstance(code, grpc.StatusCode):
            code = grpc.StatusCode.UNKNOWN
        return cls(code, message)

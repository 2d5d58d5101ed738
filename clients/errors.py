"""The one exception type the glm-api clients raise for failed calls."""

from __future__ import annotations

import re

import grpc

#: How gRPC's transport words a stream that its peer reset (an HTTP/2 RST_STREAM) before the
#: call's status arrived, with the HTTP/2 error code it carried.
_PEER_RESET = re.compile(r"\bReceived RST_STREAM with error code (\d+)\b")
#: HTTP/2's INTERNAL_ERROR: the code Envoy resets a stream with when it must end it after the
#: reply began (its retries are over by then), e.g. because the server behind it died.
_HTTP2_INTERNAL_ERROR = 2


def _cut_by_proxy(code: grpc.StatusCode, message: str) -> bool:
    """Whether a failure is a stream that a proxy cut with INTERNAL_ERROR (gRPC: INTERNAL)."""
    if code is not grpc.StatusCode.INTERNAL:
        return False
    reset = _PEER_RESET.search(message)
    return reset is not None and int(reset.group(1)) == _HTTP2_INTERNAL_ERROR


class GlmClientError(Exception):
    """A call to glm-api failed with a gRPC status other than OK.

    Both clients raise it for every failed RPC, unary or streaming, so that callers catch one
    thing instead of the several ``grpc.RpcError`` subclasses that the sync and asyncio stacks
    raise. The original error stays reachable as ``__cause__``.

    One failure is reported with another code than gRPC's: a stream that its peer reset with
    HTTP/2's INTERNAL_ERROR ("Received RST_STREAM with error code 2"), which gRPC reports as
    INTERNAL, is ``UNAVAILABLE`` here. That reset is how Envoy ends a call whose reply had begun
    when the server behind it was lost (a dead replica); over a direct connection the same loss
    breaks the connection, which gRPC itself reports as UNAVAILABLE. The call may be made again;
    the responses already received stand, the rest never came. ``grpc_code`` keeps INTERNAL.

    Attributes:
        code: The gRPC status code, e.g. ``grpc.StatusCode.INVALID_ARGUMENT``.
        message: The status message the server (or the gRPC runtime) gave.
        grpc_code: The code gRPC reported: ``code``, except for a stream cut as above.
    """

    code: grpc.StatusCode
    message: str
    grpc_code: grpc.StatusCode

    def __init__(
        self, code: grpc.StatusCode, message: str, grpc_code: grpc.StatusCode | None = None
    ) -> None:
        # Passing every value to Exception keeps the error picklable: unpickling calls
        # __init__(*self.args).
        super().__init__(code, message, grpc_code)
        self.code = code
        self.message = message
        self.grpc_code = code if grpc_code is None else grpc_code

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
        if _cut_by_proxy(code, message):
            return cls(grpc.StatusCode.UNAVAILABLE, message, grpc_code=code)
        return cls(code, message)

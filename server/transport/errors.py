"""The one place where errors become gRPC statuses, as an interceptor around every handler.

A server.errors exception becomes its status with its message. Anything else is a bug: it is
logged with its traceback and the client gets INTERNAL with an id to find it in the log.
Request bytes that are not the method's message are INVALID_ARGUMENT (gRPC itself would answer
UNKNOWN, naming protobuf's exception class).
Every call also gets one log line (request id, model, tokens in and out, duration, status) and,
when the server has metrics, its count and duration (server/metrics.py); with a MemoryReleaser,
a large request is followed by giving freed memory back (server/memory.py).
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc

from server.errors import GlmError, InvalidArgumentError, clipped
from server.memory import MemoryReleaser
from server.metrics import CallRecord, Metrics, open_call

log = logging.getLogger("server.requests")


def status_of(error: GlmError) -> grpc.StatusCode:
    """The gRPC status of a domain error (the mapping itself lives in server/errors.py)."""
    return grpc.StatusCode[error.grpc_status]


async def _abort_for(
    exc: BaseException, context: grpc.aio.ServicerContext[Any, Any], method: str
) -> None:
    """Abort the call with the status that `exc` deserves (this raises)."""
    if isinstance(exc, GlmError):
        await context.abort(status_of(exc), str(exc))
    incident = uuid.uuid4().hex[:12]
    log.error("internal error %s in %s", incident, method, exc_info=exc)
    await context.abort(
        grpc.StatusCode.INTERNAL, f"internal error {incident}; the server log has the details"
    )


# The request id a client (or Envoy, which adds one to every request) may send: the call's log line
# carries it, so that a request can be followed across proxies; without one, one is made up.
REQUEST_ID_HEADER = "x-request-id"
# What a request id from the outside may look like: it goes into log lines as is.
_SAFE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")


def _request_id(context: grpc.aio.ServicerContext[Any, Any]) -> str | None:
    """The caller's x-request-id, if it sent a well-formed one."""
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_HEADER and isinstance(value, str):
            return value if _SAFE_REQUEST_ID.fullmatch(value) else None
    return None


def _aborted_status(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    """The status a handler aborted its call with (context.abort)."""
    code: Any = context.code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    for known in grpc.StatusCode:  # grpc.aio may hand back the bare number
        if known.value[0] == code:
            return known.name
    return grpc.StatusCode.UNKNOWN.name


def _log_call(call: CallRecord, status: str, ended: float) -> None:
    """One line per call: what, how it ended, how long, for whom (fields for JSON logs too)."""
    duration_ms = round((ended - call.started) * 1000, 2)
    fields: dict[str, object] = {
        "rpc": call.rpc,
        "status": status,
        "duration_ms": duration_ms,
        "request_id": call.request_id,
        "model": call.model or None,
        "tokens_in": call.tokens_in,
        "tokens_out": call.tokens_out,
    }
    if call.first_token_at is not None:
        fields["ttft_ms"] = round((call.first_token_at - call.started) * 1000, 2)
    # The API key's name, never the key (server/transport/auth.py); absent when keys are off.
    key = ""
    if call.key is not None:
        fields["key"] = call.key
        key = f" key={call.key}"
    log.info(
        "%s %s %.1f ms id=%s model=%s tokens_in=%s tokens_out=%s%s",
        call.rpc,
        status,
        duration_ms,
        call.request_id,
        call.model or "-",
        "-" if call.tokens_in is None else call.tokens_in,
        "-" if call.tokens_out is None else call.tokens_out,
        key,
        extra=fields,
    )


class _Undecodable:
    """What request bytes that are not the method's message deserialize to: the handler
    wrappers below answer INVALID_ARGUMENT for it instead of calling the handler."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """`deserializer`, returning an _Undecodable instead of raising."""
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:
            return _Undecodable(clipped(str(exc), 300))

    return deserialize


def _check_decoded(request: Any, rpc: str) -> None:
    if isinstance(request, _Undecodable):
        raise InvalidArgumentError(
            f"the request is not a valid message for {rpc}: {request.reason}"
        )


def _size(request: Any) -> int:
    """The serialized size of a request (cheap: protobuf keeps its strings' lengths)."""
    return 0 if isinstance(request, _Undecodable) else int(request.ByteSize())


if TYPE_CHECKING:
    _Interceptor = grpc.aio.ServerInterceptor[Any, Any]
else:  # grpc's runtime class is not generic; only its type stubs are
    _Interceptor = grpc.aio.ServerInterceptor


class ErrorInterceptor(_Interceptor):
    """Around unary and server-streaming glm.* handlers: errors become statuses, calls are logged.

    Each call gets a CallRecord (server/metrics.py) as its `current_call()`, which the service
    fills in (model, tokens, first token). When the call ends, however it ends, the record gives
    one log line and, with `metrics`, the RPC metrics.
    """

    def __init__(
        self, metrics: Metrics | None = None, memory: MemoryReleaser | None = None
    ) -> None:
        self._metrics = metrics
        self._memory = memory

    def _finish(self, call: CallRecord, status: str, request: Any) -> None:
        if self._memory is not None:
            self._memory.after_request(_size(request))
        ended = time.monotonic()
        # A handler that answered an error itself (the JSON gateway) recorded the real status.
        status = call.status or status
        _log_call(call, status, ended)
        if self._metrics is not None:
            self._metrics.observe_call(call, status, ended)

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith("/glm."):
            return handler
        rpc = method.lstrip("/")
        if handler.unary_unary is not None:
            # grpc-stubs types handler behaviours as synchronous; under grpc.aio they are async.
            unary: Any = handler.unary_unary

            async def unary_wrapper(
                request: Any, context: grpc.aio.ServicerContext[Any, Any]
            ) -> Any:
                call = open_call(rpc, _request_id(context))
                # Whatever ends the call without passing one of the lines below (the task
                # cancelled: client gone, deadline, shutdown) is a cancellation.
                status = grpc.StatusCode.CANCELLED.name
                try:
                    _check_decoded(request, rpc)
                    response = await unary(request, context)
                    status = "OK"
                    return response
                except grpc.aio.AbortError:
                    status = _aborted_status(context)
                    raise
                except Exception as exc:
                    status = _status_name(exc)
                    await _abort_for(exc, context, method)
                    raise
                finally:
                    self._finish(call, status, request)

            return grpc.unary_unary_rpc_method_handler(
                unary_wrapper,
                request_deserializer=_tolerant(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            streaming: Any = handler.unary_stream

            async def stream_wrapper(
                request: Any, context: grpc.aio.ServicerContext[Any, Any]
            ) -> AsyncIterator[Any]:
                call = open_call(rpc, _request_id(context))
                # As above; a stream can also end by being closed at a yield (GeneratorExit).
                status = grpc.StatusCode.CANCELLED.name
                try:
                    _check_decoded(request, rpc)
                    async for response in streaming(request, context):
                        yield response
                    status = "OK"
                except grpc.aio.AbortError:
                    status = _aborted_status(context)
                    raise
                except Exception as exc:
                    status = _status_name(exc)
                    await _abort_for(exc, context, method)
                    raise
                finally:
                    self._finish(call, status, request)

            return grpc.unary_stream_rpc_method_handler(
                stream_wrapper,
                request_deserializer=_tolerant(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        return handler


def _status_name(exc: BaseException) -> str:
    if isinstance(exc, GlmError):
        return status_of(exc).name
    return grpc.StatusCode.INTERNAL.name

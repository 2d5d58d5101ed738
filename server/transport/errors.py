"""The one place where errors become gRPC statuses, as an interceptor around every handler.

A server.errors exception becomes its status with its message. Anything else is a bug: it is
logged with its traceback and the client gets INTERNAL with an id to find it in the log.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc

from server.errors import GlmError

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


def _log_call(method: str, started: float, status: str) -> None:
    """One line per call: method, status and duration (fields for the JSON log format too)."""
    duration_ms = round((time.monotonic() - started) * 1000, 2)
    log.info(
        "%s %s %.1f ms",
        method,
        status,
        duration_ms,
        extra={"rpc": method, "status": status, "duration_ms": duration_ms},
    )


if TYPE_CHECKING:
    _Interceptor = grpc.aio.ServerInterceptor[Any, Any]
else:  # grpc's runtime class is not generic; only its type stubs are
    _Interceptor = grpc.aio.ServerInterceptor


class ErrorInterceptor(_Interceptor):
    """Maps exceptions escaping unary and server-streaming handlers to statuses, and logs calls."""

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
        if handler.unary_unary is not None:
            # grpc-stubs types handler behaviours as synchronous; under grpc.aio they are async.
            unary: Any = handler.unary_unary

            async def unary_wrapper(
                request: Any, context: grpc.aio.ServicerContext[Any, Any]
            ) -> Any:
                started = time.monotonic()
                try:
                    response = await unary(request, context)
                except grpc.aio.AbortError:
                    raise
                except asyncio.CancelledError:
                    _log_call(method, started, grpc.StatusCode.CANCELLED.name)
                    raise
                except Exception as exc:
                    _log_call(method, started, _status_name(exc))
                    await _abort_for(exc, context, method)
                    raise
                _log_call(method, started, "OK")
                return response

            return grpc.unary_unary_rpc_method_handler(
                unary_wrapper,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            streaming: Any = handler.unary_stream

            async def stream_wrapper(
                request: Any, context: grpc.aio.ServicerContext[Any, Any]
            ) -> AsyncIterator[Any]:
                started = time.monotonic()
                try:
                    async for response in streaming(request, context):
                        yield response
                except grpc.aio.AbortError:
                    raise
                except asyncio.CancelledError:
                    _log_call(method, started, grpc.StatusCode.CANCELLED.name)
                    raise
                except Exception as exc:
                    _log_call(method, started, _status_name(exc))
                    await _abort_for(exc, context, method)
                    raise
                _log_call(method, started, "OK")

            return grpc.unary_stream_rpc_method_handler(
                stream_wrapper,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler


def _status_name(exc: BaseException) -> str:
    if isinstance(exc, GlmError):
        return status_of(exc).name
    return grpc.StatusCode.INTERNAL.name

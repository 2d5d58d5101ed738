"""API keys and per-key limits on every glm.v1 call, typed or JSON, direct or through Envoy.

The JSON routes are RPCs of glm.v1.HttpGatewayService that Envoy transcodes, so checking here
covers them too; they are refused the way the gateway answers errors (an HTTP status in the
STATUS_HEADER header, OpenAI's error object as the body) so that HTTP clients and the `openai`
SDK see 401 / 429, and their replies carry OpenAI's x-ratelimit-* headers. Typed RPCs are
refused with UNAUTHENTICATED / RESOURCE_EXHAUSTED (retry-after in the trailing metadata).
Health and reflection are not glm.v1 services and stay open.

A model outside the key's list is refused where the service resolves the model: the key's list
goes on the call's record (CallRecord.allowed_models), whose note_model() checks it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import grpc
from google.api.httpbody_pb2 import HttpBody

from glm.v1 import http_gateway_pb2 as gw
from server.auth.keys import ApiKey, KeyStore
from server.auth.limits import Admission, RateLimiter, duration_text
from server.errors import GlmError, RateLimitedError, UnauthenticatedError
from server.metrics import CallRecord, current_call
from server.service.http_gateway import STATUS_HEADER
from server.service.json_api.common import json_reply

_GATEWAY_PREFIX = "/" + gw.DESCRIPTOR.services_by_name["HttpGatewayService"].full_name + "/"
_BEARER = "bearer "

Headers = tuple[tuple[str, str], ...]

if TYPE_CHECKING:
    _Interceptor = grpc.aio.ServerInterceptor[Any, Any]
else:  # grpc's runtime class is not generic; only its type stubs are
    _Interceptor = grpc.aio.ServerInterceptor


def presented_key(metadata: Iterable[Any] | None) -> str | None:
    """The API key of a call: `authorization: Bearer KEY`, else `x-api-key: KEY`."""
    api_key = None
    for name, value in metadata or ():
        if not isinstance(value, str):
            continue
        if name == "authorization":
            if value[: len(_BEARER)].lower() == _BEARER:
                return value[len(_BEARER) :].strip()
        elif name == "x-api-key":
            api_key = value.strip()
    return api_key


def rate_limit_headers(admission: Admission) -> Headers:
    """OpenAI's x-ratelimit-* headers for the limits a key has."""
    headers: list[tuple[str, str]] = []
    for kind, state in (("requests", admission.requests), ("tokens", admission.tokens)):
        if state is not None:
            headers += [
                (f"x-ratelimit-limit-{kind}", str(state.limit)),
                (f"x-ratelimit-remaining-{kind}", str(state.remaining)),
                (f"x-ratelimit-reset-{kind}", duration_text(state.reset_s)),
            ]
    return tuple(headers)


def _retry_after(error: RateLimitedError) -> str:
    return str(max(1, math.ceil(error.retry_after_s)))


def _refusal_body(error: GlmError) -> bytes:
    """OpenAI's error object, with OpenAI's codes for a bad key and a rate limit."""
    code = "invalid_api_key" if isinstance(error, UnauthenticatedError) else "rate_limit_exceeded"
    body = {
        "error": {"message": error.message, "type": error.error_type, "param": None, "code": code}
    }
    return json_reply(body).body


class _HeaderAddingContext:
    """A call's context that adds headers to the initial metadata its handler sends."""

    def __init__(self, context: grpc.aio.ServicerContext[Any, Any], headers: Headers) -> None:
        self._context = context
        self._headers = headers
        self.sent = False

    async def send_initial_metadata(self, metadata: Sequence[tuple[str, str]]) -> None:
        self.sent = True
        await self._context.send_initial_metadata((*metadata, *self._headers))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


class AuthInterceptor(_Interceptor):
    """Checks the API key of every glm.* call, applies the key's limits, counts its tokens."""

    def __init__(self, keys: KeyStore, limiter: RateLimiter) -> None:
        self._keys = keys
        self._limiter = limiter

    def _admit(
        self, context: grpc.aio.ServicerContext[Any, Any], refusal: list[Headers]
    ) -> tuple[ApiKey, CallRecord, Admission]:
        """The caller's key, its call record and what its limits say, or the GlmError refusing
        the call (then `refusal` gets the rate-limit headers a JSON refusal carries)."""
        presented = presented_key(context.invocation_metadata())
        if not presented:
            raise UnauthenticatedError(
                "no API key: send it as `authorization: Bearer KEY` or `x-api-key: KEY`"
            )
        key = self._keys.match(presented)
        if key is None:
            raise UnauthenticatedError("invalid API key")
        call = current_call()
        call.key = key.name
        call.allowed_models = key.models
        try:
            return key, call, self._limiter.admit(key)
        except RateLimitedError:
            refusal.append(rate_limit_headers(self._limiter.peek(key)))
            raise

    def _finish(self, key: ApiKey, call: CallRecord) -> None:
        self._limiter.charge_tokens(key, (call.tokens_in or 0) + (call.tokens_out or 0))

    @staticmethod
    async def _refuse_grpc(context: grpc.aio.ServicerContext[Any, Any], error: GlmError) -> None:
        trailers: Headers = ()
        if isinstance(error, RateLimitedError):
            trailers = (("retry-after", _retry_after(error)),)
        await context.abort(grpc.StatusCode[error.grpc_status], error.message, trailers)

    @staticmethod
    async def _refuse_json(
        context: grpc.aio.ServicerContext[Any, Any], error: GlmError, extra: list[Headers]
    ) -> HttpBody:
        current_call().note_status(error.grpc_status)
        headers: list[tuple[str, str]] = [(STATUS_HEADER, str(error.http_status))]
        if isinstance(error, UnauthenticatedError):
            headers.append(("www-authenticate", 'Bearer realm="glm-api"'))
        if isinstance(error, RateLimitedError):
            headers.append(("retry-after", _retry_after(error)))
        for more in extra:
            headers += more
        await context.send_initial_metadata(tuple(headers))
        return HttpBody(content_type="application/json", data=_refusal_body(error))

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
        json_route = method.startswith(_GATEWAY_PREFIX)
        if handler.unary_unary is not None:
            return self._wrap_unary(handler, json_route)
        if handler.unary_stream is not None:
            return self._wrap_stream(handler, json_route)
        return handler

    def _wrap_unary(
        self, handler: grpc.RpcMethodHandler[Any, Any], json_route: bool
    ) -> grpc.RpcMethodHandler[Any, Any]:
        # grpc-stubs types handler behaviours as synchronous; under grpc.aio they are async.
        inner: Any = handler.unary_unary

        async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            refusal: list[Headers] = []
            try:
                key, call, admission = self._admit(context, refusal)
            except GlmError as exc:
                if json_route:
                    return await self._refuse_json(context, exc, refusal)
                await self._refuse_grpc(context, exc)
            headers = rate_limit_headers(admission) if json_route else ()
            try:
                if not headers:
                    return await inner(request, context)
                wrapped = _HeaderAddingContext(context, headers)
                response = await inner(request, wrapped)
                if not wrapped.sent:
                    # A 200 reply goes without initial metadata (http_gateway._send_unary), but
                    # headers must: Envoy does not turn trailers into HTTP headers. This costs
                    # one more write, and only calls of keys with limits pay it.
                    await context.send_initial_metadata(headers)
                return response
            finally:
                self._finish(key, call)

        return grpc.unary_unary_rpc_method_handler(
            unary,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _wrap_stream(
        self, handler: grpc.RpcMethodHandler[Any, Any], json_route: bool
    ) -> grpc.RpcMethodHandler[Any, Any]:
        inner: Any = handler.unary_stream

        async def stream(
            request: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            refusal: list[Headers] = []
            try:
                key, call, admission = self._admit(context, refusal)
            except GlmError as exc:
                if json_route:
                    yield await self._refuse_json(context, exc, refusal)
                    return
                await self._refuse_grpc(context, exc)
            headers = rate_limit_headers(admission) if json_route else ()
            target = _HeaderAddingContext(context, headers) if headers else context
            try:
                async with contextlib.aclosing(inner(request, target)) as responses:
                    async for response in responses:
                        yield response
            finally:
                self._finish(key, call)

        return grpc.unary_stream_rpc_method_handler(
            stream,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

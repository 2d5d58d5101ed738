"""glm.v1.HttpGatewayService: the JSON routes Envoy transcodes, rendered from GlmService's pipeline.

Each handler parses its dialect's JSON into a typed glm.v1 request, runs it through GlmService's
transport-free methods, and renders the typed responses as the bytes its clients expect. The HTTP
status goes in the STATUS_HEADER response header, which Envoy moves to the status line; a unary
reply with status 200 goes without it (Envoy's status is 200 already).
Errors before the first byte become a JSON error with their status; errors in the middle of a
stream become an in-band error event, since the 200 status line is already on the wire.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.api.httpbody_pb2 import HttpBody

from glm.v1 import glm_service_pb2 as pb
from glm.v1 import http_gateway_pb2_grpc as gw_grpc
from server.errors import GlmError, InternalError, InvalidArgumentError
from server.metrics import current_call
from server.service.glm_service import GlmService
from server.service.json_api import openai, seed
from server.service.json_api.common import (
    EVENT_STREAM,
    SSE_DONE,
    SSE_HEARTBEAT,
    HttpReply,
    check_content_type,
    error_object,
    error_reply,
    json_reply,
    parsed,
    sse_event,
)

log = logging.getLogger(__name__)

STATUS_HEADER = "x-glm-http-status"
HTTP_OK = 200
Context = grpc.aio.ServicerContext[Any, Any]
ChunkRenderer = Callable[[pb.ChatResponse], list[bytes]]


def _internal(exc: BaseException, route: str) -> InternalError:
    """Log a bug with its traceback and return the error the client sees."""
    incident = uuid.uuid4().hex[:12]
    log.error("internal error %s in %s", incident, route, exc_info=exc)
    return InternalError(f"internal error {incident}; the server log has the details")


def _failed(error: GlmError) -> GlmError:
    """Record the status of an error answered in the response (the gRPC call itself ends OK)."""
    current_call().note_status(error.grpc_status)
    return error


class HttpGatewayService(gw_grpc.HttpGatewayServiceServicer):
    """The seed's routes and OpenAI's routes over one GlmService."""

    def __init__(self, service: GlmService, heartbeat_s: float = 0.0) -> None:
        self._service = service
        # Seconds between SSE comments while a queued stream waits (0: none; see _chat).
        self._heartbeat_s = heartbeat_s

    # -- plumbing ------------------------------------------------------------------------------

    @staticmethod
    async def _send(context: Context, reply: HttpReply) -> HttpBody:
        await context.send_initial_metadata(((STATUS_HEADER, str(reply.status)),))
        return HttpBody(content_type=reply.content_type, data=reply.body)

    @staticmethod
    async def _send_unary(context: Context, reply: HttpReply) -> HttpBody:
        # Initial metadata sent on its own is one more write and one more completion to wait for
        # before the reply leaves (about 0.1 ms a call, measured); left unsent, it goes out with
        # the reply. A 200 needs no header: the transcoder answers 200, and Envoy's Lua filter
        # drops the gRPC headers of a successful unary JSON reply (envoy/envoy.yaml.tmpl).
        if reply.status != HTTP_OK:
            await context.send_initial_metadata(((STATUS_HEADER, str(reply.status)),))
        return HttpBody(content_type=reply.content_type, data=reply.body)

    async def _unary(
        self, context: Context, route: str, work: Callable[[], Awaitable[HttpReply]]
    ) -> HttpBody:
        try:
            reply = await work()
        except GlmError as exc:
            reply = error_reply(_failed(exc))
        except Exception as exc:
            reply = error_reply(_failed(_internal(exc, route)))
        return await self._send_unary(context, reply)

    async def _chat(
        self,
        context: Context,
        route: str,
        parse: Callable[[], tuple[pb.ChatRequest, bool]],
        whole: Callable[[pb.ChatResponse], dict[str, Any]],
        chunk: ChunkRenderer,
    ) -> AsyncGenerator[HttpBody, None]:
        """Run a chat request; stream it as events or send it as one object.

        The first response is awaited before any byte is sent, so that a refused request (bad
        input, unknown model, busy) gets its own status instead of a 200. A streamed request
        that the engine has accepted but that has no first token yet (queued behind others)
        sends a 200 and SSE comments every `heartbeat_s` meanwhile, so that proxies do not
        time it out; from then on an error goes in-band, as after the first token.
        """
        responses: AsyncGenerator[pb.ChatResponse, None] | None = None
        pending: asyncio.Future[pb.ChatResponse] | None = None
        started = False  # whether the status line (200) is out
        error: GlmError | None = None
        try:
            try:
                request, stream = parse()
                accepted = asyncio.Event()
                responses = self._service.chat(request, on_accepted=accepted.set)
                if stream and self._heartbeat_s > 0:
                    # The first step runs as a task of its own, so that heartbeats can be sent
                    # while it waits.
                    pending = asyncio.ensure_future(anext(responses))
                    while not pending.done():
                        await asyncio.wait({pending}, timeout=self._heartbeat_s)
                        if pending.done() or not accepted.is_set():
                            continue
                        if not started:
                            await context.send_initial_metadata(((STATUS_HEADER, "200"),))
                            started = True
                        yield HttpBody(content_type=EVENT_STREAM, data=SSE_HEARTBEAT)
                    first = await pending
                else:
                    first = await anext(responses)
                if not stream:
                    yield await self._send(context, json_reply(whole(first)))
                    return
                if not started:
                    await context.send_initial_metadata(((STATUS_HEADER, "200"),))
                    started = True
                yield HttpBody(content_type=EVENT_STREAM, data=b"".join(chunk(first)))
            except StopAsyncIteration:
                error = _internal(RuntimeError("empty"), route)
            except GlmError as exc:
                error = exc
            except Exception as exc:
                error = _internal(exc, route)
            if error is not None:
                if started:
                    yield HttpBody(
                        content_type=EVENT_STREAM, data=sse_event(error_object(_failed(error)))
                    )
                else:
                    yield await self._send(context, error_reply(_failed(error)))
                return
            assert responses is not None
            try:
                async for response in responses:
                    yield HttpBody(content_type=EVENT_STREAM, data=b"".join(chunk(response)))
                yield HttpBody(content_type=EVENT_STREAM, data=SSE_DONE)
            except GlmError as exc:
                yield HttpBody(
                    content_type=EVENT_STREAM, data=sse_event(error_object(_failed(exc)))
                )
            except Exception as exc:
                error = _failed(_internal(exc, route))
                yield HttpBody(content_type=EVENT_STREAM, data=sse_event(error_object(error)))
        finally:
            if pending is not None and not pending.done():
                # The caller left while the first response was awaited: the pending step of
                # the generation ends first, then the generation closes.
                pending.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await pending
            if responses is not None:
                await responses.aclose()

    # -- the seed's routes -----------------------------------------------------------------

    async def SeedChat(self, request: HttpBody, context: Context) -> AsyncIterator[HttpBody]:
        def parse() -> tuple[pb.ChatRequest, bool]:
            check_content_type(request.content_type, "/chat")
            typed = parsed(lambda: seed.chat_request(request.data))
            return typed, seed.wants_stream(typed)

        def chunk(response: pb.ChatResponse) -> list[bytes]:
            return [sse_event(seed.chat_chunk(response))]

        async with contextlib.aclosing(
            self._chat(context, "/chat", parse, seed.chat_completion, chunk)
        ) as replies:
            async for reply in replies:
                yield reply

    async def SeedEmbedding(self, request: HttpBody, context: Context) -> HttpBody:
        async def work() -> HttpReply:
            check_content_type(request.content_type, "/embedding")
            typed = parsed(lambda: seed.embed_request(request.data))
            response = await self._service.embed(typed)
            return json_reply(seed.embedding(response))

        return await self._unary(context, "/embedding", work)

    async def SeedTokenize(self, request: HttpBody, context: Context) -> HttpBody:
        async def work() -> HttpReply:
            check_content_type(request.content_type, "/tokenize")
            typed = parsed(lambda: seed.tokenize_request(request.data))
            response = await self._service.tokenize(typed)
            return json_reply(seed.tokenization(response))

        return await self._unary(context, "/tokenize", work)

    async def SeedListModels(self, request: HttpBody, context: Context) -> HttpBody:
        async def work() -> HttpReply:
            return json_reply(seed.model_list(await self._service.list_models()))

        return await self._unary(context, "/models", work)

    # -- OpenAI's routes ---------------------------------------------------------------------

    async def OpenAiChatCompletions(
        self, request: HttpBody, context: Context
    ) -> AsyncIterator[HttpBody]:
        include_usage = False

        def parse() -> tuple[pb.ChatRequest, bool]:
            nonlocal include_usage
            check_content_type(request.content_type, "/v1/chat/completions")
            typed, stream, include_usage = parsed(lambda: openai.chat_request(request.data))
            return typed, stream

        def chunk(response: pb.ChatResponse) -> list[bytes]:
            events = [sse_event(openai.chat_chunk(response))]
            if include_usage and response.HasField("usage"):
                events.append(sse_event(openai.usage_chunk(response)))
            return events

        async with contextlib.aclosing(
            self._chat(context, "/v1/chat/completions", parse, openai.chat_completion, chunk)
        ) as replies:
            async for reply in replies:
                yield reply

    async def OpenAiEmbeddings(self, request: HttpBody, context: Context) -> HttpBody:
        async def work() -> HttpReply:
            check_content_type(request.content_type, "/v1/embeddings")
            typed, encoding, dimensions = parsed(lambda: openai.embed_request(request.data))
            response = await self._service.embed(typed)
            if dimensions is not None and dimensions != response.dimensions:
                raise InvalidArgumentError(
                    f"model {response.model!r} makes {response.dimensions}-dimensional vectors; "
                    f"dimensions={dimensions} is not supported",
                    param="dimensions",
                )
            return json_reply(openai.embeddings(response, encoding))

        return await self._unary(context, "/v1/embeddings", work)

    async def OpenAiListModels(self, request: HttpBody, context: Context) -> HttpBody:
        async def work() -> HttpReply:
            return json_reply(openai.model_list(await self._service.list_models()))

        return await self._unary(context, "/v1/models", work)


__all__ = ["STATUS_HEADER", "HttpGatewayService"]

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
from dataclasses import dataclass
from typing import Any

import grpc
from google.api.httpbody_pb2 import HttpBody

from glm.v1 import glm_service_pb2 as pb
from glm.v1 import http_gateway_pb2 as gw_pb
from glm.v1 import http_gateway_pb2_grpc as gw_grpc
from server.errors import GlmError, InternalError, InvalidArgumentError
from server.metrics import current_call
from server.service.glm_service import GlmService
from server.service.json_api import common, legacy, openai
from server.service.json_api.common import (
    EVENT_STREAM,
    LEGACY_SSE,
    OPENAI_SSE,
    SSE_HEADERS,
    HttpReply,
    SseFraming,
    check_content_type,
    error_object,
    json_reply,
    parsed,
)

log = logging.getLogger(__name__)

STATUS_HEADER = "x-glm-http-status"
HTTP_OK = 200
Context = grpc.aio.ServicerContext[Any, Any]
ChunkRenderer = Callable[[pb.ChatResponse], list[bytes]]
# Starts a generation: called with the hook for "accepted, waiting for its place".
Generate = Callable[[Callable[[], None]], AsyncGenerator[pb.ChatResponse, None]]


@dataclass(frozen=True, slots=True)
class Dialect:
    """What differs between the legacy routes and OpenAI's around any reply: how events are
    framed and how an error is answered."""

    sse: SseFraming
    error_reply: Callable[[GlmError], HttpReply]


LEGACY = Dialect(LEGACY_SSE, legacy.error_reply)
OPENAI = Dialect(OPENAI_SSE, common.error_reply)


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
    """The legacy routes and OpenAI's routes over one GlmService."""

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
        self,
        context: Context,
        route: str,
        work: Callable[[], Awaitable[HttpReply]],
        dialect: Dialect,
    ) -> HttpBody:
        try:
            reply = await work()
        except GlmError as exc:
            reply = dialect.error_reply(_failed(exc))
        except Exception as exc:
            reply = dialect.error_reply(_failed(_internal(exc, route)))
        return await self._send_unary(context, reply)

    @staticmethod
    async def _start_stream(context: Context) -> None:
        await context.send_initial_metadata(((STATUS_HEADER, "200"), *SSE_HEADERS))

    async def _chat(
        self,
        context: Context,
        route: str,
        parse: Callable[[], tuple[Generate, bool]],
        whole: Callable[[pb.ChatResponse], dict[str, Any]],
        chunk: ChunkRenderer,
        dialect: Dialect,
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
                generate, stream = parse()
                accepted = asyncio.Event()
                responses = generate(accepted.set)
                if stream and self._heartbeat_s > 0:
                    # The first step runs as a task of its own, so that heartbeats can be sent
                    # while it waits.
                    pending = asyncio.ensure_future(anext(responses))
                    while not pending.done():
                        await asyncio.wait({pending}, timeout=self._heartbeat_s)
                        if pending.done() or not accepted.is_set():
                            continue
                        if not started:
                            await self._start_stream(context)
                            started = True
                        yield HttpBody(content_type=EVENT_STREAM, data=dialect.sse.heartbeat)
                    first = await pending
                else:
                    first = await anext(responses)
                if not stream:
                    yield await self._send(context, json_reply(whole(first)))
                    return
                if not started:
                    await self._start_stream(context)
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
                    event = dialect.sse.event(error_object(_failed(error)))
                    yield HttpBody(content_type=EVENT_STREAM, data=event)
                else:
                    yield await self._send(context, dialect.error_reply(_failed(error)))
                return
            assert responses is not None
            try:
                async for response in responses:
                    yield HttpBody(content_type=EVENT_STREAM, data=b"".join(chunk(response)))
                yield HttpBody(content_type=EVENT_STREAM, data=dialect.sse.done)
            except GlmError as exc:
                event = dialect.sse.event(error_object(_failed(exc)))
                yield HttpBody(content_type=EVENT_STREAM, data=event)
            except Exception as exc:
                error = _failed(_internal(exc, route))
                yield HttpBody(
                    content_type=EVENT_STREAM, data=dialect.sse.event(error_object(error))
                )
        finally:
            if pending is not None and not pending.done():
                # The caller left while the first response was awaited: the pending step of
                # the generation ends first, then the generation closes.
                pending.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await pending
            if responses is not None:
                await responses.aclose()

    # -- the legacy routes -----------------------------------------------------------------

    async def LegacyChat(self, request: HttpBody, context: Context) -> AsyncIterator[HttpBody]:
        call: legacy.LegacyChat | None = None
        stream = legacy.LegacyChatStream(deltas_only=True)

        def parse() -> tuple[Generate, bool]:
            nonlocal call, stream
            check_content_type(request.content_type, "/chat")
            call = parsed(lambda: legacy.chat_request(request.data))
            stream = legacy.LegacyChatStream(deltas_only=call.request.chunk)
            typed = call.request

            def generate(on_accepted: Callable[[], None]) -> AsyncGenerator[pb.ChatResponse, None]:
                # A max_tokens beyond the model's limits caps the reply, as the legacy API did.
                return self._service.chat(typed, on_accepted, cap_max_tokens=True)

            return generate, call.stream

        def whole(response: pb.ChatResponse) -> dict[str, Any]:
            assert call is not None
            return legacy.chat_completion(response, call)

        async with contextlib.aclosing(
            self._chat(context, "/chat", parse, whole, lambda r: stream.events(r), LEGACY)
        ) as replies:
            async for reply in replies:
                yield reply

    async def LegacyEmbedding(self, request: HttpBody, context: Context) -> HttpBody:
        async def work() -> HttpReply:
            check_content_type(request.content_type, "/embedding")
            typed = parsed(lambda: legacy.embed_request(request.data))
            response = await self._service.embed(typed)
            return json_reply(legacy.embedding(response))

        return await self._unary(context, "/embedding", work, LEGACY)

    async def LegacyTokenize(self, request: HttpBody, context: Context) -> HttpBody:
        async def work() -> HttpReply:
            check_content_type(request.content_type, "/tokenize")
            typed = parsed(lambda: legacy.tokenize_request(request.data))
            response = await self._service.tokenize(typed)
            return json_reply(legacy.tokenization(response))

        return await self._unary(context, "/tokenize", work, LEGACY)

    async def LegacyListModels(self, request: HttpBody, context: Context) -> HttpBody:
        async def work() -> HttpReply:
            return json_reply(legacy.model_list(await self._service.list_models()))

        return await self._unary(context, "/models", work, LEGACY)

    # -- OpenAI's routes ---------------------------------------------------------------------

    async def OpenAiChatCompletions(
        self, request: HttpBody, context: Context
    ) -> AsyncIterator[HttpBody]:
        stream = openai.ChatStream(include_usage=False)

        def parse() -> tuple[Generate, bool]:
            nonlocal stream
            check_content_type(request.content_type, "/v1/chat/completions")
            typed, streamed, include_usage = parsed(lambda: openai.chat_request(request.data))
            stream = openai.ChatStream(include_usage)

            def generate(on_accepted: Callable[[], None]) -> AsyncGenerator[pb.ChatResponse, None]:
                return self._service.chat(typed, on_accepted)

            return generate, streamed

        async with contextlib.aclosing(
            self._chat(
                context,
                "/v1/chat/completions",
                parse,
                openai.chat_completion,
                lambda r: stream.events(r),
                OPENAI,
            )
        ) as replies:
            async for reply in replies:
                yield reply

    async def OpenAiCompletions(
        self, request: HttpBody, context: Context
    ) -> AsyncIterator[HttpBody]:
        call: openai.CompletionCall | None = None
        stream: openai.CompletionStream | None = None

        def parse() -> tuple[Generate, bool]:
            nonlocal call, stream
            check_content_type(request.content_type, "/v1/completions")
            call = parsed(lambda: openai.completion_request(request.data))
            stream = openai.CompletionStream(call)
            typed, prompts = call.request, call.prompts

            def generate(on_accepted: Callable[[], None]) -> AsyncGenerator[pb.ChatResponse, None]:
                accepted = _CountDown(len(prompts), on_accepted)
                generations = [
                    self._service.chat(typed, accepted.one, prompt=prompt) for prompt in prompts
                ]
                merged = _merged(generations)
                return merged if typed.stream else _gathered(merged)

            return generate, call.stream

        def whole(response: pb.ChatResponse) -> dict[str, Any]:
            assert call is not None
            return openai.completion(call, response)

        def chunk(response: pb.ChatResponse) -> list[bytes]:
            assert stream is not None
            return stream.events(response)

        async with contextlib.aclosing(
            self._chat(context, "/v1/completions", parse, whole, chunk, OPENAI)
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

        return await self._unary(context, "/v1/embeddings", work, OPENAI)

    async def OpenAiListModels(self, request: HttpBody, context: Context) -> HttpBody:
        async def work() -> HttpReply:
            return json_reply(openai.model_list(await self._service.list_models()))

        return await self._unary(context, "/v1/models", work, OPENAI)

    async def OpenAiRetrieveModel(
        self, request: gw_pb.OpenAiRetrieveModelRequest, context: Context
    ) -> HttpBody:
        async def work() -> HttpReply:
            models = await self._service.list_models()
            return json_reply(openai.model_object(models, request.model))

        return await self._unary(context, "/v1/models/{model}", work, OPENAI)


class _CountDown:
    """Calls `done` once `one` has been called `count` times (every generation accepted)."""

    def __init__(self, count: int, done: Callable[[], None]) -> None:
        self._left = count
        self._done = done

    def one(self) -> None:
        self._left -= 1
        if self._left == 0:
            self._done()


_END = object()


async def _merged(
    generations: list[AsyncGenerator[pb.ChatResponse, None]],
) -> AsyncGenerator[pb.ChatResponse, None]:
    """The responses of several generations as they come; each response's choice index is the
    position of its generation. The first failure ends them all."""
    if len(generations) == 1:
        async with contextlib.aclosing(generations[0]) as only:
            async for response in only:
                yield response
        return
    queue: asyncio.Queue[Any] = asyncio.Queue()

    async def pump(index: int, generation: AsyncGenerator[pb.ChatResponse, None]) -> None:
        try:
            async with contextlib.aclosing(generation) as responses:
                async for response in responses:
                    response.choices[0].index = index
                    queue.put_nowait(response)
        except Exception as exc:
            queue.put_nowait(exc)
        finally:
            queue.put_nowait(_END)

    tasks = [asyncio.ensure_future(pump(i, g)) for i, g in enumerate(generations)]
    try:
        running = len(tasks)
        while running:
            item = await queue.get()
            if item is _END:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _gathered(
    responses: AsyncGenerator[pb.ChatResponse, None],
) -> AsyncGenerator[pb.ChatResponse, None]:
    """The single responses of several stream=false generations as one response: one choice per
    generation, in order, and their usage added up."""
    got: dict[int, pb.ChatResponse] = {}
    async with contextlib.aclosing(responses) as each:
        async for response in each:
            got[response.choices[0].index] = response
    ordered = [got[i] for i in sorted(got)]
    combined = pb.ChatResponse(
        id=ordered[0].id,
        object=ordered[0].object,
        created=ordered[0].created,
        model=ordered[0].model,
    )
    for response in ordered:
        combined.choices.append(response.choices[0])
        combined.usage.prompt_tokens += response.usage.prompt_tokens
        combined.usage.completion_tokens += response.usage.completion_tokens
    combined.usage.total_tokens = combined.usage.prompt_tokens + combined.usage.completion_tokens
    current_call().note_usage(combined.usage.prompt_tokens, combined.usage.completion_tokens)
    yield combined


__all__ = ["STATUS_HEADER", "HttpGatewayService"]

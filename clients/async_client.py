"""``AsyncGlmClient``: an asyncio client for glm.v1.GlmService, over ``grpc.aio``."""

# ASYNC109 prefers asyncio.timeout() to timeout parameters, but these timeouts are gRPC deadlines:
# they travel to the server, which stops working on a call its client gave up on, and they keep
# the async API the same as the sync one.
# ruff: noqa: ASYNC109

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Sequence
from types import TracebackType
from typing import Self

import grpc
import grpc.aio

from clients import _transport
from clients._transport import ChannelOptions, MetadataLike
from clients.builders import (
    Messages,
    build_chat_request,
    build_embed_request,
    build_tokenize_request,
    embedding_vectors,
)
from clients.errors import GlmClientError
from clients.results import ChatAccumulator, ChatResult
from glm.v1 import glm_service_pb2


class AsyncChatStream(AsyncIterator[glm_service_pb2.ChatResponse]):
    """The responses of one Chat call, in the order the server sent them.

    Iterating raises ``GlmClientError`` if the call fails, also after some responses arrived.
    Leaving an ``async with`` block, or calling ``cancel()``, cancels the call so that the server
    stops generating; iteration then simply ends. (Breaking out of ``async for`` alone leaves
    the call running until the stream is garbage collected.)
    """

    def __init__(
        self,
        call: grpc.aio.UnaryStreamCall[glm_service_pb2.ChatRequest, glm_service_pb2.ChatResponse],
    ) -> None:
        self._call = call
        self._responses = call.__aiter__()
        self._cancelled = False

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> glm_service_pb2.ChatResponse:
        if self._cancelled:
            raise StopAsyncIteration
        try:
            return await self._responses.__anext__()
        except grpc.RpcError as error:
            raise GlmClientError.from_rpc_error(error) from error

    def cancel(self) -> None:
        """Cancel the call if it is still running; the stream then yields nothing more."""
        self._cancelled = True
        self._call.cancel()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.cancel()


class AsyncGlmClient:
    """An asyncio client for glm.v1.GlmService.

    The arguments are those of ``GlmClient``; an existing channel must be a ``grpc.aio.Channel``.
    Create the client inside the event loop that uses it, close it with ``await close()`` or
    ``async with``. Failed calls raise ``GlmClientError``.
    """

    def __init__(
        self,
        target: str | grpc.aio.Channel | None = None,
        *,
        metadata: MetadataLike | None = None,
        api_key: str | None = None,
        timeout: float | None = _transport.DEFAULT_TIMEOUT,
        credentials: grpc.ChannelCredentials | None = None,
        max_send_message_bytes: int | None = None,
        max_receive_message_bytes: int | None = None,
        options: ChannelOptions = (),
    ) -> None:
        if target is None or isinstance(target, str):
            self._target = target or _transport.default_target()
            args = _transport.channel_options(
                max_send_message_bytes=max_send_message_bytes,
                max_receive_message_bytes=max_receive_message_bytes,
                options=options,
            )
            if credentials is None:
                self._channel = grpc.aio.insecure_channel(self._target, options=args)
            else:
                self._channel = grpc.aio.secure_channel(self._target, credentials, options=args)
            self._owns_channel = True
        else:
            _transport.check_no_channel_settings(
                credentials, max_send_message_bytes, max_receive_message_bytes, options
            )
            self._target = ""
            self._channel = target
            self._owns_channel = False
        self._metadata = _transport.with_api_key(_transport.normalize_metadata(metadata), api_key)
        self._timeout = timeout
        self._stubs = _transport.AsyncStubs.for_channel(self._channel)

    @property
    def target(self) -> str:
        """The "host:port" the client connects to; empty for a channel given by the caller."""
        return self._target

    @property
    def channel(self) -> grpc.aio.Channel:
        """The underlying channel."""
        return self._channel

    async def close(self) -> None:
        """Close the channel if the client created it; calls in flight are cancelled."""
        if self._owns_channel:
            await self._channel.close(grace=None)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(target={self._target!r})"

    def _deadline(self, timeout: float | None) -> float | None:
        return self._timeout if timeout is None else timeout

    def chat(
        self,
        messages: Messages,
        *,
        model: str = "",
        temperature: float | None = None,
        top_p: float | None = None,
        max_tokens: int | None = None,
        top_k: int | None = None,
        repetition_penalty: float | None = None,
        seed: int | None = None,
        stop: str | Sequence[str] = (),
        stop_token_ids: Sequence[int] = (),
        chunk: bool = True,
        timeout: float | None = None,
    ) -> AsyncChatStream:
        """Start a Chat call and return its stream of responses, for ``async for``.

        Not a coroutine: the call starts at once and errors surface while iterating. The
        arguments are those of ``GlmClient.chat``.
        """
        request = build_chat_request(
            messages,
            model=model,
            temperature=temperature,
            top_p=top_p,
            max_tokens=max_tokens,
            top_k=top_k,
            repetition_penalty=repetition_penalty,
            seed=seed,
            stop=stop,
            stop_token_ids=stop_token_ids,
            chunk=chunk,
        )
        call = self._stubs.chat(request, timeout=self._deadline(timeout), metadata=self._metadata)
        return AsyncChatStream(call)

    async def chat_text(
        self,
        messages: Messages,
        *,
        model: str = "",
        temperature: float | None = None,
        top_p: float | None = None,
        max_tokens: int | None = None,
        top_k: int | None = None,
        repetition_penalty: float | None = None,
        seed: int | None = None,
        stop: str | Sequence[str] = (),
        stop_token_ids: Sequence[int] = (),
        chunk: bool = True,
        timeout: float | None = None,
    ) -> ChatResult:
        """Run a Chat call to the end and return the whole reply; arguments as for ``chat``."""
        accumulator = ChatAccumulator(chunk=chunk)
        async with self.chat(
            messages,
            model=model,
            temperature=temperature,
            top_p=top_p,
            max_tokens=max_tokens,
            top_k=top_k,
            repetition_penalty=repetition_penalty,
            seed=seed,
            stop=stop,
            stop_token_ids=stop_token_ids,
            chunk=chunk,
            timeout=timeout,
        ) as stream:
            async for response in stream:
                accumulator.add(response)
        return accumulator.result()

    async def embed(
        self,
        prompts: str | Iterable[str],
        *,
        model: str = "",
        normalize: bool = False,
        timeout: float | None = None,
    ) -> glm_service_pb2.EmbedResponse:
        """Embed each prompt (one string counts as one prompt) with an embedding model."""
        request = build_embed_request(prompts, model=model, normalize=normalize)
        try:
            return await self._stubs.embed(
                request, timeout=self._deadline(timeout), metadata=self._metadata
            )
        except grpc.RpcError as error:
            raise GlmClientError.from_rpc_error(error) from error

    async def embed_vectors(
        self,
        prompts: str | Iterable[str],
        *,
        model: str = "",
        normalize: bool = False,
        timeout: float | None = None,
    ) -> list[list[float]]:
        """Embed each prompt and return just the vectors, one per prompt, in prompt order."""
        response = await self.embed(prompts, model=model, normalize=normalize, timeout=timeout)
        return embedding_vectors(response)

    async def tokenize(
        self,
        prompt: str,
        *,
        model: str = "",
        max_tokens: int | None = None,
        timeout: float | None = None,
    ) -> glm_service_pb2.TokenizeResponse:
        """Split ``prompt`` into the tokens of a model's tokenizer (max_tokens unset: 4096)."""
        request = build_tokenize_request(prompt, model=model, max_tokens=max_tokens)
        try:
            return await self._stubs.tokenize(
                request, timeout=self._deadline(timeout), metadata=self._metadata
            )
        except grpc.RpcError as error:
            raise GlmClientError.from_rpc_error(error) from error

    async def list_models(
        self, *, timeout: float | None = None
    ) -> glm_service_pb2.ListModelsResponse:
        """List the configured models with their limits and readiness."""
        try:
            return await self._stubs.list_models(
                glm_service_pb2.ListModelsRequest(),
                timeout=self._deadline(timeout),
                metadata=self._metadata,
            )
        except grpc.RpcError as error:
            raise GlmClientError.from_rpc_error(error) from error

    async def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """Ask the standard gRPC health service about ``service``; see ``GlmClient.health``."""
        try:
            response = await self._stubs.health_check(
                _transport.health_check_request(service),
                timeout=self._deadline(timeout),
                metadata=self._metadata,
            )
        except grpc.RpcError as error:
            raise GlmClientError.from_rpc_error(error) from error
        return _transport.serving_status_name(response.status)

    async def wait_until_ready(
        self, timeout: float = 30.0, *, service: str = "", interval: float = 0.1
    ) -> None:
        """Wait until the health service reports ``service`` SERVING.

        Behaves as ``GlmClient.wait_until_ready``: retries NOT_SERVING, NOT_FOUND and an
        unreachable server until ``timeout``, then raises ``GlmClientError`` DEADLINE_EXCEEDED.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        last = "no answer"
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise GlmClientError(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"server not SERVING after {timeout:g} s (last: {last})",
                )
            try:
                response = await self._stubs.health_check(
                    _transport.health_check_request(service),
                    timeout=remaining,
                    metadata=self._metadata,
                    wait_for_ready=True,
                )
            except grpc.RpcError as error:
                failure = GlmClientError.from_rpc_error(error)
                if failure.code not in _transport.RETRYABLE_HEALTH_CODES:
                    raise failure from error
                last = str(failure)
            else:
                last = _transport.serving_status_name(response.status)
                if last == "SERVING":
                    return
            await asyncio.sleep(max(0.0, min(interval, deadline - loop.time())))

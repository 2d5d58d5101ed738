"""``GlmClient``: a blocking client for glm.v1.GlmService."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from types import TracebackType
from typing import Self

import grpc

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


class ChatStream(Iterator[glm_service_pb2.ChatResponse]):
    """The responses of one Chat call, in the order the server sent them.

    Iterating raises ``GlmClientError`` if the call fails, also after some responses arrived.
    Leaving a ``with`` block, or calling ``cancel()``, cancels the call so that the server stops
    generating; iteration then simply ends.
    """

    def __init__(self, call: grpc.CallIterator[glm_service_pb2.ChatResponse]) -> None:
        self._call = call
        self._responses = iter(call)
        self._cancelled = False

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> glm_service_pb2.ChatResponse:
        if self._cancelled:
            raise StopIteration
        try:
            return next(self._responses)
        except grpc.RpcError as error:
            raise GlmClientError.from_rpc_error(error) from error

    def cancel(self) -> None:
        """Cancel the call if it is still running; the stream then yields nothing more."""
        # Without this, the rest of the stream would raise CANCELLED, which the caller asked for.
        self._cancelled = True
        # grpc-stubs declares RpcContext.cancel without annotations.
        self._call.cancel()  # type: ignore[no-untyped-call]

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.cancel()


class GlmClient:
    """A blocking client for glm.v1.GlmService.

    Args:
        target: "host:port" to connect to (default: ``$GLM_GRPC_ADDRESS`` or 127.0.0.1:50051),
            or an existing ``grpc.Channel``, which the client then uses but does not close.
        metadata: Metadata sent with every call, e.g. ``{"x-request-id": "..."}``.
        api_key: The API key, sent as ``authorization: Bearer KEY`` with every call; None
            takes ``$GLM_API_KEY`` (unset: no key), "" sends none.
        timeout: The deadline of each call in seconds, unless the call gives one; None means no
            deadline. For ``chat`` it bounds the whole stream.
        credentials: Connect with TLS using these credentials instead of in plain text, e.g.
            ``tls_credentials(ca_file="ca.pem")`` (with ``cert_file``/``key_file`` for mTLS).
        max_send_message_bytes: The largest request the channel sends (default 16 MiB).
        max_receive_message_bytes: The largest response the channel accepts (default 16 MiB).
        options: Further channel arguments; they override the ones above.

    The channel settings apply only when the client creates the channel; passing them with an
    existing channel raises ``ValueError``. Failed calls raise ``GlmClientError``.
    """

    def __init__(
        self,
        target: str | grpc.Channel | None = None,
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
                self._channel = grpc.insecure_channel(self._target, options=args)
            else:
                self._channel = grpc.secure_channel(self._target, credentials, options=args)
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
        self._stubs = _transport.SyncStubs.for_channel(self._channel)

    @property
    def target(self) -> str:
        """The "host:port" the client connects to; empty for a channel given by the caller."""
        return self._target

    @property
    def channel(self) -> grpc.Channel:
        """The underlying channel."""
        return self._channel

    def close(self) -> None:
        """Close the channel if the client created it; calls in flight are cancelled."""
        if self._owns_channel:
            self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

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
    ) -> ChatStream:
        """Start a Chat call and return its stream of responses.

        Args:
            messages: The conversation, oldest first: ``(role, content)`` pairs, mappings with
                "role" and "content", ``ChatMessage`` protos, or one string for a single user
                turn.
            model: A chat model id from ``list_models``; empty selects the server's default.
            temperature, top_p, max_tokens, top_k, repetition_penalty, seed: Sampling settings;
                each is sent only when given, so the server's default applies otherwise.
            stop: Strings that end the generation.
            stop_token_ids: Token ids that end the generation.
            chunk: True: each response carries only new text; False: the whole text so far.
            timeout: The deadline of the whole stream; None uses the client's.

        The call starts at once; errors surface while iterating, as ``GlmClientError``.
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
        return ChatStream(call)

    def chat_text(
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
        with self.chat(
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
            for response in stream:
                accumulator.add(response)
        return accumulator.result()

    def embed(
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
            return self._stubs.embed(
                request, timeout=self._deadline(timeout), metadata=self._metadata
            )
        except grpc.RpcError as error:
            raise GlmClientError.from_rpc_error(error) from error

    def embed_vectors(
        self,
        prompts: str | Iterable[str],
        *,
        model: str = "",
        normalize: bool = False,
        timeout: float | None = None,
    ) -> list[list[float]]:
        """Embed each prompt and return just the vectors, one per prompt, in prompt order."""
        response = self.embed(prompts, model=model, normalize=normalize, timeout=timeout)
        return embedding_vectors(response)

    def tokenize(
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
            return self._stubs.tokenize(
                request, timeout=self._deadline(timeout), metadata=self._metadata
            )
        except grpc.RpcError as error:
            raise GlmClientError.from_rpc_error(error) from error

    def list_models(self, *, timeout: float | None = None) -> glm_service_pb2.ListModelsResponse:
        """List the configured models with their limits and readiness."""
        try:
            return self._stubs.list_models(
                glm_service_pb2.ListModelsRequest(),
                timeout=self._deadline(timeout),
                metadata=self._metadata,
            )
        except grpc.RpcError as error:
            raise GlmClientError.from_rpc_error(error) from error

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """Ask the standard gRPC health service about ``service`` ("" is the whole server).

        Returns the status name: "SERVING", "NOT_SERVING", "UNKNOWN" or "SERVICE_UNKNOWN".
        An unknown service raises ``GlmClientError`` with NOT_FOUND.
        """
        try:
            response = self._stubs.health_check(
                _transport.health_check_request(service),
                timeout=self._deadline(timeout),
                metadata=self._metadata,
            )
        except grpc.RpcError as error:
            raise GlmClientError.from_rpc_error(error) from error
        return _transport.serving_status_name(response.status)

    def wait_until_ready(
        self, timeout: float = 30.0, *, service: str = "", interval: float = 0.1
    ) -> None:
        """Block until the health service reports ``service`` SERVING.

        Waits for the server to come up as well: the checks wait for the channel to connect.
        Until the deadline, NOT_SERVING, an unknown service (NOT_FOUND: it may be registered
        once its model loads) and an unreachable server are retried every ``interval`` seconds.

        Raises:
            GlmClientError: DEADLINE_EXCEEDED when ``timeout`` passes first (the message gives
                the last answer), or the error of a check that retrying cannot fix.
        """
        deadline = time.monotonic() + timeout
        last = "no answer"
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise GlmClientError(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"server not SERVING after {timeout:g} s (last: {last})",
                )
            try:
                # wait_for_ready makes the check wait for a connection instead of failing at
                # once while the server is still starting.
                response = self._stubs.health_check(
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
            time.sleep(max(0.0, min(interval, deadline - time.monotonic())))

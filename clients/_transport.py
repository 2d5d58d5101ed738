"""Channel settings and typed views of the generated stubs, shared by both clients."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from glm.v1 import glm_service_pb2, glm_service_pb2_grpc

#: Where the server listens unless told otherwise (the server's own default).
DEFAULT_TARGET = "127.0.0.1:50051"
#: The environment variable that overrides ``DEFAULT_TARGET``, as for the server.
TARGET_ENV = "GLM_GRPC_ADDRESS"
#: The largest message sent or received by default. gRPC's own receive limit, 4 MiB, is too
#: small for a batch of large embeddings.
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
#: The deadline of each call, in seconds, unless the client or the call sets another. For Chat it
#: bounds the whole stream.
DEFAULT_TIMEOUT = 60.0
#: Health check failures that may go away by themselves while a server starts: it is not
#: listening yet, or has not registered the service yet.
RETRYABLE_HEALTH_CODES = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.NOT_FOUND}
)
#: The fully qualified name of the service, as the health service knows it.
SERVICE_NAME = "glm.v1.GlmService"
#: The environment variable the clients take the API key from when none is given.
API_KEY_ENV = "GLM_API_KEY"

#: Call metadata: a mapping or (key, value) pairs; values are str, or bytes for "-bin" keys.
MetadataLike: TypeAlias = Mapping[str, str | bytes] | Iterable[tuple[str, str | bytes]]
#: Normalized call metadata, as gRPC takes it.
Metadata: TypeAlias = tuple[tuple[str, str | bytes], ...]
#: Extra channel arguments, e.g. ``[("grpc.keepalive_time_ms", 30000)]``.
ChannelOptions: TypeAlias = Sequence[tuple[str, Any]]


def default_target() -> str:
    """The target from ``$GLM_GRPC_ADDRESS``, or ``DEFAULT_TARGET`` when it is unset or empty."""
    return os.environ.get(TARGET_ENV) or DEFAULT_TARGET


def normalize_metadata(metadata: MetadataLike | None) -> Metadata:
    """Turn call metadata into the tuple of pairs gRPC takes, with lowercase keys.

    gRPC rejects uppercase metadata keys at call time with an unhelpful error; HTTP/2 header
    names are case-insensitive anyway, so lowercasing them here is safe.
    """
    if metadata is None:
        return ()
    pairs = metadata.items() if isinstance(metadata, Mapping) else metadata
    return tuple((key.lower(), value) for key, value in pairs)


def with_api_key(metadata: Metadata, api_key: str | None) -> Metadata:
    """Add ``authorization: Bearer KEY`` to call metadata.

    ``api_key`` None falls back to ``$GLM_API_KEY``; "" sends no key. Metadata that already
    carries a key (``authorization`` or ``x-api-key``) is left as it is.
    """
    key = os.environ.get(API_KEY_ENV, "") if api_key is None else api_key
    if not key or any(name in ("authorization", "x-api-key") for name, _ in metadata):
        return metadata
    return (*metadata, ("authorization", f"Bearer {key}"))


def tls_credentials(
    ca_file: str | os.PathLike[str] | None = None,
    cert_file: str | os.PathLike[str] | None = None,
    key_file: str | os.PathLike[str] | None = None,
) -> grpc.ChannelCredentials:
    """TLS channel credentials from PEM files.

    Args:
        ca_file: The CA certificates to check the server's certificate with (default: the
            system's trusted CAs, as gRPC finds them).
        cert_file, key_file: A client certificate chain and its key, for servers that require
            one (mTLS); both or neither.
    """
    if (cert_file is None) != (key_file is None):
        raise ValueError("a client certificate needs both cert_file and key_file")

    def read(path: str | os.PathLike[str] | None) -> bytes | None:
        if path is None:
            return None
        with open(path, "rb") as file:
            return file.read()

    return grpc.ssl_channel_credentials(read(ca_file), read(key_file), read(cert_file))


def channel_options(
    *,
    max_send_message_bytes: int | None = None,
    max_receive_message_bytes: int | None = None,
    options: ChannelOptions = (),
) -> list[tuple[str, Any]]:
    """The arguments for a new channel; None sizes mean 16 MiB, and ``options`` come last."""
    if max_send_message_bytes is None:
        max_send_message_bytes = DEFAULT_MAX_MESSAGE_BYTES
    if max_receive_message_bytes is None:
        max_receive_message_bytes = DEFAULT_MAX_MESSAGE_BYTES
    return [
        ("grpc.max_send_message_length", max_send_message_bytes),
        ("grpc.max_receive_message_length", max_receive_message_bytes),
        *options,
    ]


def check_no_channel_settings(
    credentials: object,
    max_send_message_bytes: int | None,
    max_receive_message_bytes: int | None,
    options: ChannelOptions,
) -> None:
    """Refuse channel settings given along with an existing channel, which they cannot change."""
    given = credentials is not None or bool(options)
    given = given or max_send_message_bytes is not None or max_receive_message_bytes is not None
    if given:
        raise ValueError(
            "credentials, message sizes and options apply only to a channel the client creates"
        )


def serving_status_name(status: int) -> str:
    """The name of a ``grpc.health.v1`` serving status number, e.g. "SERVING"."""
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(status))


def health_check_request(service: str) -> Any:
    """A ``HealthCheckRequest`` for ``service`` ("" asks about the server as a whole)."""
    return health_pb2.HealthCheckRequest(service=service)


# The generated glm_service_pb2_grpc module is untyped and grpc_health has no type information,
# so these two classes give each RPC its request and response types once, here, instead of
# leaking Any into every client method.


@dataclass(frozen=True, slots=True)
class SyncStubs:
    """The RPCs of one sync channel, typed."""

    chat: grpc.UnaryStreamMultiCallable[glm_service_pb2.ChatRequest, glm_service_pb2.ChatResponse]
    embed: grpc.UnaryUnaryMultiCallable[glm_service_pb2.EmbedRequest, glm_service_pb2.EmbedResponse]
    tokenize: grpc.UnaryUnaryMultiCallable[
        glm_service_pb2.TokenizeRequest, glm_service_pb2.TokenizeResponse
    ]
    list_models: grpc.UnaryUnaryMultiCallable[
        glm_service_pb2.ListModelsRequest, glm_service_pb2.ListModelsResponse
    ]
    health_check: grpc.UnaryUnaryMultiCallable[Any, Any]

    @classmethod
    def for_channel(cls, channel: grpc.Channel) -> SyncStubs:
        """Bind the RPCs to ``channel``."""
        stub = glm_service_pb2_grpc.GlmServiceStub(channel)  # type: ignore[no-untyped-call]
        health = health_pb2_grpc.HealthStub(channel)
        return cls(
            chat=stub.Chat,
            embed=stub.Embed,
            tokenize=stub.Tokenize,
            list_models=stub.ListModels,
            health_check=health.Check,
        )


@dataclass(frozen=True, slots=True)
class AsyncStubs:
    """The RPCs of one asyncio channel, typed."""

    chat: grpc.aio.UnaryStreamMultiCallable[
        glm_service_pb2.ChatRequest, glm_service_pb2.ChatResponse
    ]
    embed: grpc.aio.UnaryUnaryMultiCallable[
        glm_service_pb2.EmbedRequest, glm_service_pb2.EmbedResponse
    ]
    tokenize: grpc.aio.UnaryUnaryMultiCallable[
        glm_service_pb2.TokenizeRequest, glm_service_pb2.TokenizeResponse
    ]
    list_models: grpc.aio.UnaryUnaryMultiCallable[
        glm_service_pb2.ListModelsRequest, glm_service_pb2.ListModelsResponse
    ]
    health_check: grpc.aio.UnaryUnaryMultiCallable[Any, Any]

    @classmethod
    def for_channel(cls, channel: grpc.aio.Channel) -> AsyncStubs:
        """Bind the RPCs to ``channel``."""
        # The generated stub only calls channel.unary_stream/unary_unary, which grpc.aio
        # channels provide too, so the same class serves both flavours.
        stub = glm_service_pb2_grpc.GlmServiceStub(channel)  # type: ignore[no-untyped-call]
        health = health_pb2_grpc.HealthStub(channel)
        return cls(
            chat=stub.Chat,
            embed=stub.Embed,
            tokenize=stub.Tokenize,
            list_models=stub.ListModels,
            health_check=health.Check,
        )

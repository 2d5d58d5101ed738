"""Python clients for glm-api's gRPC service, glm.v1.GlmService.

``GlmClient`` blocks; ``AsyncGlmClient`` is its ``grpc.aio`` twin with the same methods as
coroutines. Both raise ``GlmClientError`` for any failed call::

    from clients import GlmClient

    with GlmClient("127.0.0.1:50051", api_key="glm-...") as client:
        for response in client.chat([("user", "Hello")], max_tokens=32):
            print(response.choices[0].delta.content, end="", flush=True)
        print(client.chat_text("Hello").text)

``python -m clients --help`` is a command-line front end to the same calls.
"""

from __future__ import annotations

from clients._transport import (
    API_KEY_ENV,
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_TARGET,
    DEFAULT_TIMEOUT,
    SERVICE_NAME,
    TARGET_ENV,
    ChannelOptions,
    MetadataLike,
    default_target,
    tls_credentials,
)
from clients.async_client import AsyncChatStream, AsyncGlmClient
from clients.builders import (
    MessageLike,
    Messages,
    build_chat_request,
    build_embed_request,
    build_tokenize_request,
    embedding_vectors,
    to_chat_message,
    to_chat_messages,
)
from clients.errors import GlmClientError
from clients.results import ChatAccumulator, ChatResult, TokenUsage
from clients.sync_client import ChatStream, GlmClient

__all__ = [
    "API_KEY_ENV",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "DEFAULT_TARGET",
    "DEFAULT_TIMEOUT",
    "SERVICE_NAME",
    "TARGET_ENV",
    "AsyncChatStream",
    "AsyncGlmClient",
    "ChannelOptions",
    "ChatAccumulator",
    "ChatResult",
    "ChatStream",
    "GlmClient",
    "GlmClientError",
    "MessageLike",
    "Messages",
    "MetadataLike",
    "TokenUsage",
    "build_chat_request",
    "build_embed_request",
    "build_tokenize_request",
    "default_target",
    "embedding_vectors",
    "tls_credentials",
    "to_chat_message",
    "to_chat_messages",
]

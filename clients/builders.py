"""Building glm.v1 request messages from plain Python values.

Both clients share these builders so that the sync and asyncio flavours send byte-identical
requests for the same arguments.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TypeAlias

from glm.v1 import glm_service_pb2

#: One conversation turn: a ``(role, content)`` pair, a ``{"role": ..., "content": ...}`` mapping
#: or a ``ChatMessage`` proto.
MessageLike: TypeAlias = glm_service_pb2.ChatMessage | tuple[str, str] | Mapping[str, str]

#: A conversation: turns oldest first, or a bare string as a shortcut for one user turn.
Messages: TypeAlias = str | Iterable[MessageLike]


def to_chat_message(message: MessageLike) -> glm_service_pb2.ChatMessage:
    """Convert one conversation turn to a ``ChatMessage`` proto.

    Raises:
        TypeError: the value is none of the accepted shapes.
    """
    if isinstance(message, glm_service_pb2.ChatMessage):
        return message
    if isinstance(message, Mapping):
        unknown = set(message) - {"role", "content"}
        if unknown or "role" not in message or "content" not in message:
            raise TypeError(
                "a chat message mapping needs exactly the keys 'role' and 'content', got "
                f"{sorted(message)!r}"
            )
        return glm_service_pb2.ChatMessage(role=message["role"], content=message["content"])
    # A str is also a sequence of length 2 when it has two characters; reject it explicitly so
    # that "hi" does not silently become role "h", content "i".
    if isinstance(message, tuple | list) and len(message) == 2:
        role, content = message
        return glm_service_pb2.ChatMessage(role=role, content=content)
    raise TypeError(
        "a chat message must be a (role, content) pair, a mapping with 'role' and 'content' or "
        f"a ChatMessage, got {type(message).__name__}"
    )


def to_chat_messages(messages: Messages) -> list[glm_service_pb2.ChatMessage]:
    """Convert a conversation to ``ChatMessage`` protos; a bare string is one user turn."""
    # Iterating a str would yield its characters, which is never what a caller means.
    if isinstance(messages, str):
        return [glm_service_pb2.ChatMessage(role="user", content=messages)]
    return [to_chat_message(message) for message in messages]


def _strings(values: str | Iterable[str]) -> list[str]:
    """Turn one string or an iterable of strings into a list, never splitting a string."""
    return [values] if isinstance(values, str) else list(values)


def build_chat_request(
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
) -> glm_service_pb2.ChatRequest:
    """Build a ``ChatRequest``, setting each optional field only when the caller gave it.

    The proto marks the sampling fields ``optional`` because an unset field means "the server's
    default", which differs from 0 (temperature 0 is greedy decoding, max_tokens 0 is invalid).
    ``chunk`` is always sent: the clients interpret streamed content according to it, so they
    must not depend on the server's default.
    """
    request = glm_service_pb2.ChatRequest(
        messages=to_chat_messages(messages),
        model=model,
        stop=_strings(stop),
        stop_token_ids=list(stop_token_ids),
        chunk=chunk,
    )
    # Assigning a field marks it present, even for 0, which is what we want here; assigning
    # only the given ones leaves the others absent.
    if temperature is not None:
        request.temperature = temperature
    if top_p is not None:
        request.top_p = top_p
    if max_tokens is not None:
        request.max_tokens = max_tokens
    if top_k is not None:
        request.top_k = top_k
    if repetition_penalty is not None:
        request.repetition_penalty = repetition_penalty
    if seed is not None:
        request.seed = seed
    return request


def build_embed_request(
    prompts: str | Iterable[str], *, model: str = "", normalize: bool = False
) -> glm_service_pb2.EmbedRequest:
    """Build an ``EmbedRequest``; a bare string is one prompt."""
    return glm_service_pb2.EmbedRequest(model=model, prompt=_strings(prompts), normalize=normalize)


def build_tokenize_request(
    prompt: str, *, model: str = "", max_tokens: int | None = None
) -> glm_service_pb2.TokenizeRequest:
    """Build a ``TokenizeRequest``, setting ``max_tokens`` only when given (unset means 4096)."""
    request = glm_service_pb2.TokenizeRequest(prompt=prompt, model=model)
    if max_tokens is not None:
        request.max_tokens = max_tokens
    return request


def embedding_vectors(response: glm_service_pb2.EmbedResponse) -> list[list[float]]:
    """Return the vectors of an ``EmbedResponse`` as lists, ordered by prompt index."""
    # The server sends data[i] for prompt[i]; sorting by index (stable) costs nothing and keeps
    # the result right even if a server ever sends them out of order.
    return [list(item.values) for item in sorted(response.data, key=lambda item: item.index)]

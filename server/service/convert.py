"""Protobuf <-> domain conversion, with the validation that needs no model.

Validation that depends on a model (prompt length, max_tokens against the model's limits) happens
in the engine; everything here can be checked from the request alone.
"""

from __future__ import annotations

import math

from glm.v1 import glm_service_pb2 as pb
from server.domain import (
    ChatMessage,
    ChatRequest,
    FinishReason,
    ModelInfo,
    Role,
    SamplingParams,
    Usage,
)
from server.errors import InvalidArgumentError

_ROLES = {r.value: r for r in Role}
# The roles after which the assistant speaks next.
_LAST_ROLES = (Role.USER, Role.OBSERVATION)
MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256
DEFAULT_TOKENIZE_MAX_TOKENS = 4096


def _check_range(
    name: str, value: float, low: float, high: float, *, low_open: bool = False
) -> None:
    ok = math.isfinite(value) and (value > low if low_open else value >= low) and value <= high
    if not ok:
        bracket = "(" if low_open else "["
        raise InvalidArgumentError(f"{name} must be in {bracket}{low:g}, {high:g}], got {value:g}")


def chat_request_from_proto(request: pb.ChatRequest, model_id: str) -> ChatRequest:
    """Validate a ChatRequest and turn it into the domain request for `model_id`."""
    if not request.messages:
        raise InvalidArgumentError("messages must hold at least one message")
    messages: list[ChatMessage] = []
    for i, message in enumerate(request.messages):
        role = _ROLES.get(message.role)
        if role is None:
            raise InvalidArgumentError(
                f"messages[{i}].role is {message.role!r}; use one of: {', '.join(_ROLES)}"
            )
        messages.append(ChatMessage(role, message.content))
    if messages[-1].role not in _LAST_ROLES:
        raise InvalidArgumentError(
            "the last message must come from 'user' or 'observation', "
            f"not {messages[-1].role.value!r}"
        )

    defaults = SamplingParams()
    temperature = request.temperature if request.HasField("temperature") else defaults.temperature
    _check_range("temperature", temperature, 0.0, 2.0)
    top_p = request.top_p if request.HasField("top_p") else defaults.top_p
    _check_range("top_p", top_p, 0.0, 1.0, low_open=True)
    top_k = request.top_k if request.HasField("top_k") else 0
    if top_k < 0:
        raise InvalidArgumentError(f"top_k must be 0 (off) or positive, got {top_k}")
    penalty = request.repetition_penalty if request.HasField("repetition_penalty") else 1.0
    _check_range("repetition_penalty", penalty, 0.0, 10.0, low_open=True)
    max_tokens: int | None = None
    if request.HasField("max_tokens"):
        max_tokens = request.max_tokens
        if max_tokens < 1:
            raise InvalidArgumentError(f"max_tokens must be at least 1, got {max_tokens}")
    if len(request.stop) > MAX_STOP_STRINGS:
        raise InvalidArgumentError(
            f"stop holds {len(request.stop)} strings; at most {MAX_STOP_STRINGS} are allowed"
        )
    for i, stop in enumerate(request.stop):
        if not stop or len(stop) > MAX_STOP_LENGTH:
            raise InvalidArgumentError(
                f"stop[{i}] must be 1 to {MAX_STOP_LENGTH} characters, got {len(stop)}"
            )
    for i, token_id in enumerate(request.stop_token_ids):
        if token_id < 0:
            raise InvalidArgumentError(f"stop_token_ids[{i}] must not be negative, got {token_id}")

    sampling = SamplingParams(
        # float32 on the wire: 0.7 arrives as 0.699999988; round back to what the client meant.
        temperature=round(temperature, 6),
        top_p=round(top_p, 6),
        top_k=top_k,
        repetition_penalty=round(penalty, 6),
        seed=request.seed if request.HasField("seed") else None,
        max_tokens=max_tokens,
        stop=tuple(request.stop),
        stop_token_ids=tuple(request.stop_token_ids),
    )
    return ChatRequest(model=model_id, messages=tuple(messages), sampling=sampling)


def usage_to_proto(usage: Usage) -> pb.Usage:
    """The wire form of token counts."""
    return pb.Usage(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.total_tokens,
    )


def chat_chunk(
    *,
    call_id: str,
    created: int,
    model: str,
    content: str,
    first: bool,
    finish_reason: FinishReason | None = None,
    usage: Usage | None = None,
) -> pb.ChatResponse:
    """One streamed chunk (object chat.completion.chunk)."""
    choice = pb.ChatChoice(
        index=0,
        delta=pb.ChatDelta(role=Role.ASSISTANT.value if first else "", content=content),
        finish_reason=finish_reason.value if finish_reason else "",
    )
    response = pb.ChatResponse(
        id=call_id, object="chat.completion.chunk", created=created, model=model, choices=[choice]
    )
    if usage is not None:
        response.usage.CopyFrom(usage_to_proto(usage))
    return response


def chat_completion(
    *,
    call_id: str,
    created: int,
    model: str,
    content: str,
    finish_reason: FinishReason,
    usage: Usage,
) -> pb.ChatResponse:
    """The single response of a stream=false call (object chat.completion)."""
    choice = pb.ChatChoice(
        index=0,
        message=pb.ChatMessage(role=Role.ASSISTANT.value, content=content),
        finish_reason=finish_reason.value,
    )
    return pb.ChatResponse(
        id=call_id,
        object="chat.completion",
        created=created,
        model=model,
        choices=[choice],
        usage=usage_to_proto(usage),
    )


def embed_texts_from_proto(request: pb.EmbedRequest, max_prompts: int) -> tuple[str, ...]:
    """Validate the prompts of an EmbedRequest against the model's max_batch_prompts."""
    if not request.prompt:
        raise InvalidArgumentError("prompt must hold at least one text")
    if len(request.prompt) > max_prompts:
        raise InvalidArgumentError(
            f"prompt holds {len(request.prompt)} texts; this model takes at most {max_prompts} "
            "per call (max_batch_prompts); split the request"
        )
    for i, text in enumerate(request.prompt):
        if not text.strip():
            raise InvalidArgumentError(f"prompt[{i}] is empty; every text must hold characters")
    return tuple(request.prompt)


def tokenize_max_tokens(request: pb.TokenizeRequest) -> int:
    """The truncation length of a TokenizeRequest (the seed's 4096 when unset)."""
    if not request.HasField("max_tokens"):
        return DEFAULT_TOKENIZE_MAX_TOKENS
    if request.max_tokens < 1:
        raise InvalidArgumentError(f"max_tokens must be at least 1, got {request.max_tokens}")
    return request.max_tokens


def model_to_proto(info: ModelInfo) -> pb.Model:
    """The wire form of one ListModels entry."""
    return pb.Model(
        id=info.id,
        object=info.kind.value,
        created=info.created,
        owned_by=info.owned_by,
        ready=info.ready,
        dimensions=info.dimensions,
        max_input_tokens=info.limits.max_input_tokens,
        max_new_tokens=info.limits.max_new_tokens,
        context_length=info.limits.context_length,
        max_batch_prompts=info.limits.max_batch_prompts,
        default=info.default,
    )

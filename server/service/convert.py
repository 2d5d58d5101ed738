"""Protobuf <-> domain conversion, with the validation that needs no model.

Validation that depends on a model (prompt length, max_tokens against the model's limits) happens
in the engine; everything here can be checked from the request alone.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence

from google.protobuf import json_format

from glm.v1 import glm_service_pb2 as pb
from server.domain import (
    ChatMessage,
    ChatRequest,
    FinishReason,
    FunctionCall,
    ModelInfo,
    Role,
    SamplingParams,
    ToolSpec,
    Usage,
)
from server.errors import InvalidArgumentError, quoted

_ROLES = {r.value: r for r in Role}
# The roles after which the assistant speaks next.
_LAST_ROLES = (Role.USER, Role.OBSERVATION)
MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256
# A role's length is checked before it is looked up or quoted in an error message.
MAX_ROLE_CHARS = 32
DEFAULT_TOKENIZE_MAX_TOKENS = 4096
MAX_TOOLS = 64
_TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _function_call_from_proto(call: pb.FunctionCall, where: str) -> FunctionCall:
    if not _TOOL_NAME.fullmatch(call.name):
        raise InvalidArgumentError(f"{where}.name must be 1 to 64 letters, digits, '_' or '-'")
    try:
        arguments = json.loads(call.arguments or "{}")
        if not isinstance(arguments, dict):
            raise InvalidArgumentError(f"{where}.arguments must be a JSON object")
        return FunctionCall(call.name, json.dumps(arguments, ensure_ascii=False))
    except json.JSONDecodeError as exc:
        raise InvalidArgumentError(f"{where}.arguments is not valid JSON: {exc}") from exc
    except (RecursionError, ValueError) as exc:  # nesting or a number past what Python parses
        raise InvalidArgumentError(
            f"{where}.arguments nests too deeply or holds a number too long to parse"
        ) from exc


def tools_from_proto(tools: Sequence[pb.Tool]) -> tuple[ToolSpec, ...]:
    """Validate the offered tools: unique, well-named functions with object parameters."""
    if len(tools) > MAX_TOOLS:
        raise InvalidArgumentError(
            f"tools holds {len(tools)} tools; at most {MAX_TOOLS} are allowed"
        )
    specs: list[ToolSpec] = []
    for i, tool in enumerate(tools):
        if tool.type not in ("", "function"):
            raise InvalidArgumentError(
                f"tools[{i}].type must be 'function', got {quoted(tool.type)}"
            )
        name = tool.function.name
        if not _TOOL_NAME.fullmatch(name):
            raise InvalidArgumentError(
                f"tools[{i}].function.name must be 1 to 64 letters, digits, '_' or '-'"
            )
        if any(s.name == name for s in specs):
            raise InvalidArgumentError(f"tools[{i}]: the tool name {quoted(name)} is used twice")
        # A Struct keeps no key order; sort the keys so the same tools always give the same prompt.
        try:
            parameters = json.loads(
                json.dumps(json_format.MessageToDict(tool.function.parameters), sort_keys=True)
            )
        except RecursionError as exc:
            raise InvalidArgumentError(
                f"tools[{i}].function.parameters nests values too deeply"
            ) from exc
        specs.append(ToolSpec(name, tool.function.description, parameters))
    return tuple(specs)


def _check_range(
    name: str, value: float, low: float, high: float, *, low_open: bool = False
) -> None:
    ok = math.isfinite(value) and (value > low if low_open else value >= low) and value <= high
    if not ok:
        bracket = "(" if low_open else "["
        raise InvalidArgumentError(f"{name} must be in {bracket}{low:g}, {high:g}], got {value:g}")


def chat_request_from_proto(
    request: pb.ChatRequest,
    model_id: str,
    *,
    prompt: str | None = None,
    cap_max_tokens: bool = False,
) -> ChatRequest:
    """Validate a ChatRequest and turn it into the domain request for `model_id`.

    With `prompt` (OpenAI's completions), the text is continued as it is and the request holds
    no messages; `cap_max_tokens` caps a max_tokens beyond the model's limits (the legacy routes).
    """
    messages: list[ChatMessage] = []
    if prompt is None:
        messages = _messages_from_proto(request)
    elif request.messages or request.tools:
        raise InvalidArgumentError("a completion request takes a prompt, not messages or tools")
    elif not prompt:
        raise InvalidArgumentError("prompt is empty; give it some text")
    sampling = _sampling_from_proto(request)
    return ChatRequest(
        model=model_id,
        messages=tuple(messages),
        sampling=sampling,
        tools=tools_from_proto(request.tools),
        prompt=prompt,
        cap_max_tokens=cap_max_tokens,
    )


def _messages_from_proto(request: pb.ChatRequest) -> list[ChatMessage]:
    if not request.messages:
        raise InvalidArgumentError("messages must hold at least one message")
    messages: list[ChatMessage] = []
    for i, message in enumerate(request.messages):
        if len(message.role) > MAX_ROLE_CHARS:
            raise InvalidArgumentError(
                f"messages[{i}].role is {len(message.role)} characters long; roles are at most "
                f"{MAX_ROLE_CHARS}: use one of: {', '.join(_ROLES)}"
            )
        role = _ROLES.get(message.role)
        if role is None:
            raise InvalidArgumentError(
                f"messages[{i}].role is {quoted(message.role)}; use one of: {', '.join(_ROLES)}"
            )
        call = None
        if message.HasField("function_call"):
            if role is not Role.ASSISTANT:
                raise InvalidArgumentError(
                    f"messages[{i}]: only assistant messages carry a function_call"
                )
            call = _function_call_from_proto(message.function_call, f"messages[{i}].function_call")
        messages.append(ChatMessage(role, message.content, call))
    if messages[-1].role not in _LAST_ROLES:
        raise InvalidArgumentError(
            "the last message must come from 'user' or 'observation', "
            f"not {messages[-1].role.value!r}"
        )
    return messages


def _sampling_from_proto(request: pb.ChatRequest) -> SamplingParams:
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

    return SamplingParams(
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


def function_call_to_proto(call: FunctionCall) -> pb.FunctionCall:
    """The wire form of a tool call."""
    return pb.FunctionCall(name=call.name, arguments=call.arguments)


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
    function_call: FunctionCall | None = None,
) -> pb.ChatResponse:
    """One streamed chunk (object chat.completion.chunk)."""
    choice = pb.ChatChoice(
        index=0,
        delta=pb.ChatDelta(role=Role.ASSISTANT.value if first else "", content=content),
        finish_reason=finish_reason.value if finish_reason else "",
    )
    if function_call is not None:
        choice.delta.function_call.CopyFrom(function_call_to_proto(function_call))
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
    function_call: FunctionCall | None = None,
) -> pb.ChatResponse:
    """The single response of a stream=false call (object chat.completion)."""
    choice = pb.ChatChoice(
        index=0,
        message=pb.ChatMessage(role=Role.ASSISTANT.value, content=content),
        finish_reason=finish_reason.value,
    )
    if function_call is not None:
        choice.message.function_call.CopyFrom(function_call_to_proto(function_call))
    return pb.ChatResponse(
        id=call_id,
        object="chat.completion",
        created=created,
        model=model,
        choices=[choice],
        usage=usage_to_proto(usage),
    )


def check_input_chars(chars: int, limit: int, model_id: str, what: str) -> None:
    """Refuse a request whose text is longer than the model's max_input_chars."""
    if chars > limit:
        raise InvalidArgumentError(
            f"{what} holds {chars} characters, but model {model_id!r} takes at most {limit} "
            "per request (max_input_chars); shorten or split the request"
        )


def chat_chars(request: pb.ChatRequest) -> int:
    """The characters of text a ChatRequest carries: messages, tool calls and tools."""
    chars = sum(
        len(m.content) + len(m.function_call.name) + len(m.function_call.arguments)
        for m in request.messages
    )
    for tool in request.tools:
        # A Struct's wire size stands for the length of its JSON: both grow with its contents.
        chars += len(tool.function.description) + tool.function.parameters.ByteSize()
    return chars


def embed_texts_from_proto(
    request: pb.EmbedRequest, model_id: str, max_prompts: int, max_chars: int
) -> tuple[str, ...]:
    """Validate the prompts of an EmbedRequest against the model's max_batch_prompts and
    max_input_chars."""
    if not request.prompt:
        raise InvalidArgumentError("prompt must hold at least one text")
    if len(request.prompt) > max_prompts:
        raise InvalidArgumentError(
            f"prompt holds {len(request.prompt)} texts; this model takes at most {max_prompts} "
            "per call (max_batch_prompts); split the request"
        )
    check_input_chars(sum(len(p) for p in request.prompt), max_chars, model_id, "prompt")
    for i, text in enumerate(request.prompt):
        if not text.strip():
            raise InvalidArgumentError(f"prompt[{i}] is empty; every text must hold characters")
    return tuple(request.prompt)


def tokenize_max_tokens(request: pb.TokenizeRequest) -> int:
    """The truncation length of a TokenizeRequest (the legacy API's 4096 when unset)."""
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
        max_input_chars=info.limits.max_input_chars,
        aliases=info.aliases,
    )

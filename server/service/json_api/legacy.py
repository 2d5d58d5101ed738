"""The legacy JSON routes (/chat, /embedding, /tokenize, /models), as the legacy GLM-API answered
them.

The legacy GLM-API was a FastAPI server: its request bodies were pydantic models, so unknown keys
were ignored, values were coerced the lax way ("0.5" for a float), and a body that did not fit
was a 422 whose `detail` lists the problems. The request models here have the legacy keys and
defaults (stream false, temperature 0.7, top_p 1, repetition_penalty 1.1, chunk true) plus
glm-api's extensions (model, top_k, seed, stop, stop_token_ids, tools), and are validated by
pydantic too, so that `detail` reads the same. Responses carry every key the legacy API sent, with
its types and in its order, plus id, created and usage.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, TypeVar

import pydantic
from pydantic.alias_generators import to_camel

from glm.v1 import glm_service_pb2 as pb
from server.errors import GlmError, InvalidArgumentError, UnsupportedMediaTypeError, clipped
from server.models.chatglm3.tools import ToolCallError, format_tool_call
from server.service.json_api.common import (
    LEGACY_SSE,
    FloatList,
    HttpReply,
    error_object,
    json_reply,
    parse_object,
    usage_object,
)

M = TypeVar("M", bound=pydantic.BaseModel)

INT32_MAX = 2**31 - 1
UINT64_MAX = 2**64 - 1
# The most problems a 422's detail lists, and the longest client value it quotes: a body with
# thousands of bad values, or one huge value, must not make a reply of that size.
MAX_DETAIL_ITEMS = 20
MAX_DETAIL_INPUT_CHARS = 120
# The legacy API's repetition_penalty default (glm.v1's is 1.0, no penalty).
LEGACY_REPETITION_PENALTY = 1.1

Int32 = Annotated[int, pydantic.Field(ge=-(2**31), le=INT32_MAX)]
Count = Annotated[int, pydantic.Field(ge=0, le=INT32_MAX)]


class _Body(pydantic.BaseModel):
    """A request body as the legacy API's pydantic models read it: unknown keys ignored; glm-api
    also takes each key under its lowerCamel name, as its JSON routes always did."""

    model_config = pydantic.ConfigDict(
        extra="ignore",
        alias_generator=pydantic.AliasGenerator(
            validation_alias=lambda name: pydantic.AliasChoices(name, to_camel(name))
        ),
    )


class _FunctionCall(_Body):
    name: str
    arguments: str = "{}"


class _Message(_Body):
    role: Literal["user", "assistant", "system", "observation"]
    content: str | None = None
    # ChatGLM3's text after the role marker: on an assistant turn, the name of the tool it called.
    metadata: str | None = None
    # The tools a system message offers, in ChatGLM3's form ({"name", "description",
    # "parameters"}) or OpenAI's.
    tools: list[dict[str, Any]] | None = None
    # glm-api's: a past tool call in structured form, and an observation's tool name.
    function_call: _FunctionCall | None = None
    name: str | None = None


class _ChatBody(_Body):
    messages: list[_Message]
    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    chunk: bool | None = True
    stop_token_ids: list[Count] | None = None
    repetition_penalty: float | None = None
    return_function_call: bool | None = False
    top_k: Int32 | None = None
    seed: Annotated[int, pydantic.Field(ge=0, le=UINT64_MAX)] | None = None
    tools: list[dict[str, Any]] | None = None


class _EmbeddingBody(_Body):
    prompt: list[str]
    model: str | None = None
    normalize: bool | None = False


class _TokenizeBody(_Body):
    prompt: str
    max_tokens: Int32 | None = None
    model: str | None = None


class RequestValidationError(InvalidArgumentError):
    """A body that does not fit the route's request model: 422 with FastAPI's `detail` list."""

    def __init__(self, message: str, detail: list[dict[str, Any]]) -> None:
        super().__init__(message)
        self.detail = detail


class _BadRequest(InvalidArgumentError):
    """A request the legacy API refused with 400 and a `detail` string rather than a 422."""


def _detail_input(value: Any) -> tuple[bool, Any]:
    """Whether a detail item quotes the client's value, and the value (long text cut short)."""
    if isinstance(value, str):
        return True, clipped(value, MAX_DETAIL_INPUT_CHARS)
    try:
        small = len(json.dumps(value)) <= MAX_DETAIL_INPUT_CHARS
    except (TypeError, ValueError, RecursionError):
        small = False
    return small, value


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)


def _validated(model: type[M], payload: dict[str, Any]) -> M:
    """`payload` as `model`, or a RequestValidationError listing FastAPI's detail items."""
    try:
        return model.model_validate(payload)
    except pydantic.ValidationError as exc:
        detail: list[dict[str, Any]] = []
        for error in exc.errors(include_url=False)[:MAX_DETAIL_ITEMS]:
            item: dict[str, Any] = {
                "type": error["type"],
                "loc": ["body", *error["loc"]],
                "msg": error["msg"],
            }
            quote, value = _detail_input(error.get("input"))
            if quote:
                item["input"] = value
            if "ctx" in error:
                item["ctx"] = {k: _jsonable(v) for k, v in error["ctx"].items()}
            detail.append(item)
        first = detail[0]
        where = ".".join(str(part) for part in first["loc"][1:]) or "the body"
        raise RequestValidationError(
            f"invalid request: {where}: {first['msg']}"
            + (f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""),
            detail,
        ) from None


def _invalid(loc: Sequence[str | int], message: str) -> RequestValidationError:
    """A 422 for a value that fits the request model but not the route (its place and why)."""
    where = ".".join(str(part) for part in loc)
    return RequestValidationError(
        f"invalid request: {where}: {message}",
        [{"type": "value_error", "loc": ["body", *loc], "msg": message}],
    )


# -- /chat -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LegacyChat:
    """A parsed /chat request and what its reply depends on besides the typed request."""

    request: pb.ChatRequest
    stream: bool
    # The legacy API's function calling: the reply's content is {"name", "parameters"} as JSON, and
    # choices[0].history the conversation to send back (with tools offered).
    return_function_call: bool
    # The request's messages as the legacy API echoed them in `history` (null keys left out).
    history: list[dict[str, Any]] = field(default_factory=list)


def _tool(value: Mapping[str, Any], loc: list[str | int]) -> pb.Tool:
    """A tool in ChatGLM3's bare form or OpenAI's {"type": "function", "function": {...}}."""
    function: Any = value
    if value.get("type", "function") == "function" and isinstance(value.get("function"), dict):
        function = value["function"]
        loc = [*loc, "function"]
    name, description = function.get("name"), function.get("description", "")
    parameters = function.get("parameters", {})
    if not isinstance(name, str):
        raise _invalid([*loc, "name"], "a tool needs a name (a string)")
    if not isinstance(description, str):
        raise _invalid([*loc, "description"], "must be a string")
    if not isinstance(parameters, dict):
        raise _invalid([*loc, "parameters"], "must be a JSON Schema object")
    tool = pb.Tool(type="function", function=pb.FunctionDefinition(name=name))
    tool.function.description = description
    tool.function.parameters.update(parameters)
    return tool


def chat_request(body: bytes) -> LegacyChat:
    """POST /chat's body: the legacy keys (messages, temperature, top_p, max_tokens, stop,
    stream, chunk, stop_token_ids, repetition_penalty, return_function_call) and glm-api's."""
    parsed = _validated(_ChatBody, parse_object(body))
    if not parsed.messages:
        raise _invalid(["messages"], "messages must hold at least one message")
    if parsed.messages[-1].role == "assistant":
        # The legacy API's own check (400, not 422); glm-api says what is wrong.
        raise _BadRequest(
            "the last message must come from 'user' or 'observation', not 'assistant'"
        )
    request = pb.ChatRequest(model=parsed.model or "")
    for i, message in enumerate(parsed.messages):
        content = message.content or ""
        if message.metadata and message.metadata.strip():
            # ChatGLM3 reads a turn as its metadata line, then its text; an assistant's tool call
            # ("NAME" + the python block) goes back to it as it was written.
            content = message.metadata + "\n" + content
        added = request.messages.add(role=message.role, content=content, name=message.name or "")
        if message.function_call is not None:
            added.function_call.name = message.function_call.name
            added.function_call.arguments = message.function_call.arguments
        if message.tools is not None:
            if i != 0 or message.role != "system":
                raise _invalid(
                    ["messages", i, "tools"],
                    "tools are offered by the first message, a system message",
                )
            for j, tool in enumerate(message.tools):
                request.tools.append(_tool(tool, ["messages", i, "tools", j]))
    for j, tool in enumerate(parsed.tools or ()):
        request.tools.append(_tool(tool, ["tools", j]))

    request.temperature = 0.7 if parsed.temperature is None else parsed.temperature
    request.top_p = 1.0 if parsed.top_p is None else parsed.top_p
    penalty = parsed.repetition_penalty
    request.repetition_penalty = LEGACY_REPETITION_PENALTY if penalty is None else penalty
    if parsed.max_tokens is not None and parsed.max_tokens < 0:
        raise _invalid(["max_tokens"], "max_tokens must not be negative")
    if parsed.max_tokens:  # 0 and null meant the default in the legacy API
        # Capped to the model's limits by the service (cap_max_tokens), as the legacy API did.
        request.max_tokens = min(parsed.max_tokens, INT32_MAX)
    if parsed.top_k is not None:
        request.top_k = parsed.top_k
    if parsed.seed is not None:
        request.seed = parsed.seed
    if isinstance(parsed.stop, str):
        request.stop.append(parsed.stop)
    elif parsed.stop is not None:
        request.stop.extend(parsed.stop)
    request.stop_token_ids.extend(parsed.stop_token_ids or ())
    stream = bool(parsed.stream)
    request.stream = stream
    request.chunk = True if parsed.chunk is None else parsed.chunk
    return LegacyChat(
        request=request,
        stream=stream,
        return_function_call=bool(parsed.return_function_call),
        history=[
            m.model_dump(include={"role", "content", "metadata", "tools"}, exclude_none=True)
            for m in parsed.messages
        ],
    )


def _call_text(call: pb.FunctionCall) -> tuple[str, str]:
    """A tool call as ChatGLM3 writes it: (the tool's name, the python block)."""
    try:
        return format_tool_call(call.name, json.loads(call.arguments or "{}"))
    except (ToolCallError, ValueError):
        return call.name, call.arguments


def chat_completion(response: pb.ChatResponse, legacy_chat: LegacyChat) -> dict[str, Any]:
    """The one object of a stream=false call, with the legacy keys in the legacy API's order."""
    choice = response.choices[0]
    content = choice.message.content
    history: list[dict[str, Any]] | None = None
    extra: dict[str, Any] = {}
    offered = bool(legacy_chat.request.tools)
    if choice.message.HasField("function_call"):
        call = choice.message.function_call
        name, block = _call_text(call)
        content = f"{name}\n{block}"  # as ChatGLM3 wrote it, as the legacy API returned it
        extra["function_call"] = {"name": call.name, "arguments": call.arguments}
        if legacy_chat.return_function_call and offered:
            parameters = json.loads(call.arguments or "{}")
            content = json.dumps({"name": call.name, "parameters": parameters})
            history = [
                *legacy_chat.history,
                {"role": "assistant", "metadata": name, "content": block},
            ]
    elif legacy_chat.return_function_call and offered:
        history = [*legacy_chat.history, {"role": "assistant", "metadata": "", "content": content}]
    message = {"role": "assistant", "content": content, "metadata": None, "tools": None, **extra}
    return {
        "id": response.id,
        "model": response.model,
        "object": response.object,
        "choices": [
            {
                "index": choice.index,
                "message": message,
                "finish_reason": choice.finish_reason or None,
                "history": history,
            }
        ],
        "created": response.created,
        "usage": _usage(response.usage),
    }


def _usage(usage: pb.Usage) -> dict[str, int]:
    """Token counts in the legacy API's key order."""
    return {
        "prompt_tokens": usage.prompt_tokens,
        "total_tokens": usage.total_tokens,
        "completion_tokens": usage.completion_tokens,
    }


class LegacyChatStream:
    """The events of one streamed /chat reply, framed as the legacy API framed them.

    The legacy API sent a first chunk whose delta holds only the role, then one chunk per piece of
    text (`chunk` true: the new text; false: the whole text so far), then a chunk with an empty
    delta and the finish_reason; glm-api adds id, created and, on that last chunk, usage.
    """

    def __init__(self, deltas_only: bool) -> None:
        self._deltas_only = deltas_only
        self._whole = ""  # chunk=false: the text the last event carried

    def _chunk(
        self, response: pb.ChatResponse, delta: dict[str, Any], finish: str | None
    ) -> dict[str, Any]:
        return {
            "id": response.id,
            "model": response.model,
            "object": response.object,
            "created": response.created,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }

    def events(self, response: pb.ChatResponse) -> list[bytes]:
        """The events one ChatResponse of the stream becomes."""
        choice = response.choices[0]
        chunks: list[dict[str, Any]] = []
        if choice.delta.role:
            chunks.append(self._chunk(response, {"role": choice.delta.role}, None))
        text = choice.delta.content
        delta: dict[str, Any] = {}
        if choice.delta.HasField("function_call"):
            call = choice.delta.function_call
            name, block = _call_text(call)
            call_text = f"{name}\n{block}"
            delta = {
                "content": call_text if self._deltas_only else self._whole + call_text,
                "function_call": {"name": call.name, "arguments": call.arguments},
            }
        elif text and (self._deltas_only or text != self._whole):
            delta = {"content": text}
            self._whole = text
        if delta:
            chunks.append(self._chunk(response, delta, None))
        if choice.finish_reason:
            last = self._chunk(response, {}, choice.finish_reason)
            if response.HasField("usage"):
                last["usage"] = usage_object(response.usage)
            chunks.append(last)
        return [LEGACY_SSE.event(chunk) for chunk in chunks]


# -- /embedding, /tokenize, /models ---------------------------------------------------------


def embed_request(body: bytes) -> pb.EmbedRequest:
    """POST /embedding's body: {"model", "prompt": [texts]} (a single string is one prompt)."""
    payload = parse_object(body)
    if isinstance(payload.get("prompt"), str):
        payload["prompt"] = [payload["prompt"]]
    parsed = _validated(_EmbeddingBody, payload)
    return pb.EmbedRequest(
        model=parsed.model or "", prompt=parsed.prompt, normalize=bool(parsed.normalize)
    )


def embedding(response: pb.EmbedResponse) -> dict[str, Any]:
    """{"data": [[floats], ...], "model", "object": "embedding", "usage"}: raw nested lists."""
    return {
        "data": [FloatList(e.values) for e in response.data],
        "model": response.model,
        "object": response.object,
        "usage": {
            "prompt_tokens": response.usage.prompt_tokens,
            "total_tokens": response.usage.total_tokens,
        },
    }


def tokenize_request(body: bytes) -> pb.TokenizeRequest:
    """POST /tokenize's body: {"prompt", "max_tokens", "model"}."""
    parsed = _validated(_TokenizeBody, parse_object(body))
    request = pb.TokenizeRequest(prompt=parsed.prompt, model=parsed.model or "")
    if parsed.max_tokens is not None:
        request.max_tokens = parsed.max_tokens
    return request


def tokenization(response: pb.TokenizeResponse) -> dict[str, Any]:
    """{"tokenIds", "tokens", "model", "object": "tokenizer"}."""
    return {
        "tokenIds": list(response.token_ids),
        "tokens": list(response.tokens),
        "model": response.model,
        "object": response.object,
    }


def model_list(response: pb.ListModelsResponse) -> dict[str, Any]:
    """{"object": "list", "data": [{"id", "object", "created", "owned_by", "root", "parent",
    "permission", ...limits, "aliases"}]}; root, parent and permission are always null, as in
    the legacy API."""
    return {
        "object": response.object,
        "data": [
            {
                "id": m.id,
                "object": m.object,
                "created": m.created,
                "owned_by": m.owned_by,
                "root": None,
                "parent": None,
                "permission": None,
                "ready": m.ready,
                "default": m.default,
                "dimensions": m.dimensions,
                "max_input_tokens": m.max_input_tokens,
                "max_new_tokens": m.max_new_tokens,
                "context_length": m.context_length,
                "max_batch_prompts": m.max_batch_prompts,
                "max_input_chars": m.max_input_chars,
                "aliases": list(m.aliases),
            }
            for m in response.data
        ],
    }


# -- errors --------------------------------------------------------------------------------


def error_reply(error: GlmError) -> HttpReply:
    """An error as the legacy API's clients read it: FastAPI's `detail` beside glm-api's `error`.

    A request the route cannot take is a 422 whose detail lists the problems, as FastAPI's
    validation answered; every other error keeps its status, with its message as the detail.
    """
    status = error.http_status
    detail: Any = error.message
    if isinstance(error, RequestValidationError):
        status, detail = 422, error.detail
    elif (
        isinstance(error, InvalidArgumentError)
        and status == 400
        and not isinstance(error, _BadRequest | UnsupportedMediaTypeError)
    ):
        status = 422
        loc: list[str | int] = ["body", *([error.param] if error.param else [])]
        detail = [{"type": "value_error", "loc": loc, "msg": error.message}]
    return json_reply({"detail": detail, **error_object(error)}, status)

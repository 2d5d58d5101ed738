"""OpenAI's JSON routes (/v1/chat/completions, /v1/completions, /v1/embeddings, /v1/models).

Requests are mapped field by field onto the typed glm.v1 requests: every parameter OpenAI's API
has is either honoured, ignored when it changes nothing here (client metadata, caching and
billing hints), or refused with a 400 naming it when it asks for what glm-api cannot do (n > 1,
logprobs, penalties, audio, ...); unknown parameters are refused, as OpenAI refuses them.
Responses and streams are shaped as OpenAI's: a streamed reply's last choice chunk has an empty
delta, and usage comes only with stream_options.include_usage, on a final chunk with no choices.
"""

from __future__ import annotations

import base64
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from google.protobuf import json_format

from glm.v1 import glm_service_pb2 as pb
from server.errors import InvalidArgumentError, quoted, unknown_model
from server.service.convert import MAX_ROLE_CHARS
from server.service.json_api.common import OPENAI_SSE, FloatList, parse_object, usage_object

# OpenAI's role names onto glm.v1's ("tool" results are ChatGLM3's "observation").
_ROLES = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "assistant": "assistant",
    "tool": "observation",
}
# Chat Completions parameters that change nothing glm-api does (client metadata, billing and
# caching hints, the number of parallel tool calls when at most one is made, a predicted output
# that only speeds OpenAI up): accepted and ignored.
_IGNORED = {
    "user",
    "metadata",
    "store",
    "service_tier",
    "parallel_tool_calls",
    "prediction",
    "prompt_cache_key",
    "prompt_cache_options",
    "prompt_cache_retention",
    "safety_identifier",
}
# Parameters glm-api honours, or refuses with a 400 naming them when their value asks for what
# it cannot do (checked in _refuse_unsupported).
_HANDLED = {
    "model",
    "messages",
    "temperature",
    "top_p",
    "max_tokens",
    "max_completion_tokens",
    "stream",
    "stream_options",
    "stop",
    "seed",
    "n",
    "top_k",
    "repetition_penalty",
    "frequency_penalty",
    "presence_penalty",
    "logprobs",
    "top_logprobs",
    "logit_bias",
    "response_format",
    "tools",
    "tool_choice",
    "functions",
    "function_call",
    "audio",
    "modalities",
    "moderation",
    "reasoning_effort",
    "verbosity",
    "web_search_options",
}
# glm.v1's finish reasons under OpenAI's names.
_FINISH = {"function_call": "tool_calls"}
# Parameters that do something only when set: null (or their neutral value) is accepted.
_UNSUPPORTED_WHEN_SET = {
    "audio": "audio output is not supported",
    "moderation": "moderation is not supported",
    "reasoning_effort": "reasoning_effort is not supported: the models here do not reason",
    "verbosity": "verbosity is not supported",
    "web_search_options": "web search is not supported",
}
# OpenAI's default temperature is 1 (the legacy API's is 0.7): this route follows OpenAI.
DEFAULT_TEMPERATURE = 1.0


def _number(payload: dict[str, Any], key: str) -> float | None:
    value = payload.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidArgumentError(f"{key} must be a number", param=key)
    return float(value)


def _integer(payload: dict[str, Any], key: str) -> int | None:
    value = payload.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgumentError(f"{key} must be an integer", param=key)
    return value


def _text(payload: dict[str, Any], key: str) -> str:
    """A string field; absent or null is the empty string."""
    value = payload.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InvalidArgumentError(f"{key} must be a string", param=key)
    return value


def _role(message: dict[str, Any], index: int) -> str:
    """glm.v1's name of a message's role."""
    value = message.get("role")
    if isinstance(value, str) and len(value) > MAX_ROLE_CHARS:
        raise InvalidArgumentError(
            f"messages[{index}].role is {len(value)} characters long; roles are at most "
            f"{MAX_ROLE_CHARS}: use one of: {', '.join(_ROLES)}",
            param="messages",
        )
    role = _ROLES.get(value) if isinstance(value, str) else None
    if role is None:
        raise InvalidArgumentError(
            f"messages[{index}].role is {quoted(value)}; use one of: {', '.join(_ROLES)}",
            param="messages",
        )
    return role


def _content(message: dict[str, Any], index: int) -> str:
    """A message's text: a string, or the text parts of a content array."""
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise InvalidArgumentError(
                    f"messages[{index}].content: only text parts are supported", param="messages"
                )
            text = part.get("text", "")
            if not isinstance(text, str):
                raise InvalidArgumentError(
                    f"messages[{index}].content: a text part's text must be a string",
                    param="messages",
                )
            texts.append(text)
        return "".join(texts)
    raise InvalidArgumentError(
        f"messages[{index}].content must be a string or an array of text parts", param="messages"
    )


def _add_tool_call(added: pb.ChatMessage, message: dict[str, Any], index: int) -> None:
    """An assistant message's tool_calls (one at most) as the glm.v1 function_call."""
    calls = message.get("tool_calls")
    if not calls:
        return
    if not isinstance(calls, list) or len(calls) != 1 or not isinstance(calls[0], dict):
        raise InvalidArgumentError(
            f"messages[{index}].tool_calls must hold exactly one call", param="messages"
        )
    function = calls[0].get("function") or {}
    if not isinstance(function, dict):
        raise InvalidArgumentError(f"messages[{index}].tool_calls[0].function", param="messages")
    name, arguments = function.get("name", ""), function.get("arguments", "{}")
    if not isinstance(name, str) or not isinstance(arguments, str):
        raise InvalidArgumentError(
            f"messages[{index}].tool_calls[0].function: name and arguments must be strings",
            param="messages",
        )
    added.function_call.name = name
    added.function_call.arguments = arguments


def _add_tools(request: pb.ChatRequest, payload: dict[str, Any]) -> None:
    """OpenAI's tools and tool_choice ("auto", or "none" to offer none)."""
    choice = payload.get("tool_choice", "auto")
    if choice not in ("auto", "none"):
        raise InvalidArgumentError(
            "tool_choice must be 'auto' or 'none'; forcing a tool is not supported",
            param="tool_choice",
        )
    tools = payload.get("tools") or []
    if choice == "none":
        return
    if not isinstance(tools, list):
        raise InvalidArgumentError("tools must be an array of tools", param="tools")
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise InvalidArgumentError(f"tools[{i}] must be an object", param="tools")
        try:
            json_format.ParseDict(tool, request.tools.add())
        except json_format.ParseError as exc:
            raise InvalidArgumentError(f"tools[{i}]: {exc}", param="tools") from exc


def _tool_call(call: pb.FunctionCall, call_id: str) -> dict[str, Any]:
    return {
        "id": call_id,
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments},
    }


def _call_id(response: pb.ChatResponse) -> str:
    """The id of the (one) tool call of a reply: the same streamed or not."""
    return "call_" + response.id[-24:]


def _refuse_unsupported(payload: dict[str, Any]) -> None:
    """400 naming the first parameter whose value asks for what glm-api cannot do."""
    unknown = sorted(set(payload) - _HANDLED - _IGNORED)
    if unknown:
        raise InvalidArgumentError(
            f"unrecognized request argument supplied: {', '.join(unknown)}", param=unknown[0]
        )
    if _integer(payload, "n") not in (None, 1):
        raise InvalidArgumentError("only n=1 is supported", param="n")
    for key in ("frequency_penalty", "presence_penalty"):
        if _number(payload, key) not in (None, 0.0):
            raise InvalidArgumentError(
                f"{key} is not supported; use repetition_penalty instead", param=key
            )
    if payload.get("logprobs") or payload.get("top_logprobs"):
        raise InvalidArgumentError("logprobs are not supported", param="logprobs")
    if payload.get("logit_bias"):
        raise InvalidArgumentError("logit_bias is not supported", param="logit_bias")
    response_format = payload.get("response_format")
    if response_format not in (None, {"type": "text"}):
        raise InvalidArgumentError(
            "only the text response format is supported", param="response_format"
        )
    if payload.get("functions"):
        raise InvalidArgumentError(
            "functions (deprecated) is not supported; offer them as tools", param="functions"
        )
    if payload.get("function_call") not in (None, "none", "auto"):
        raise InvalidArgumentError(
            "function_call (deprecated) is not supported; use tools and tool_choice",
            param="function_call",
        )
    modalities = payload.get("modalities")
    if modalities not in (None, ["text"]):
        raise InvalidArgumentError("only text output is supported", param="modalities")
    for key, why in _UNSUPPORTED_WHEN_SET.items():
        if payload.get(key) is not None:
            raise InvalidArgumentError(why, param=key)


def _stream_options(payload: dict[str, Any], stream: bool) -> bool:
    """Whether the stream ends with a usage chunk (stream_options.include_usage)."""
    options = payload.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict):
        raise InvalidArgumentError("stream_options must be an object", param="stream_options")
    if not stream:
        raise InvalidArgumentError(
            "stream_options is only allowed when stream is true", param="stream_options"
        )
    return bool(options.get("include_usage"))


def _sampling(
    request: pb.ChatRequest, payload: dict[str, Any], max_tokens_keys: tuple[str, ...]
) -> None:
    """The sampling parameters both routes share, onto `request`."""
    temperature = _number(payload, "temperature")
    request.temperature = DEFAULT_TEMPERATURE if temperature is None else temperature
    if (top_p := _number(payload, "top_p")) is not None:
        request.top_p = top_p
    for key in max_tokens_keys:
        if (max_tokens := _integer(payload, key)) is not None:
            request.max_tokens = max_tokens
            break
    if (top_k := _integer(payload, "top_k")) is not None:
        request.top_k = top_k
    if (penalty := _number(payload, "repetition_penalty")) is not None:
        request.repetition_penalty = penalty
    if (seed := _integer(payload, "seed")) is not None:
        request.seed = seed & (2**64 - 1)
    stop = payload.get("stop")
    if isinstance(stop, str):
        request.stop.append(stop)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        request.stop.extend(stop)
    elif stop is not None:
        raise InvalidArgumentError("stop must be a string or an array of strings", param="stop")


def _stream(payload: dict[str, Any]) -> bool:
    stream = payload.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise InvalidArgumentError("stream must be true or false", param="stream")
    return bool(stream)


def chat_request(body: bytes) -> tuple[pb.ChatRequest, bool, bool]:
    """The typed request, whether to stream, and whether to end with a usage chunk."""
    payload = parse_object(body)
    _refuse_unsupported(payload)
    messages = payload.get("messages")
    if not isinstance(messages, list):
        raise InvalidArgumentError("messages must be an array of messages", param="messages")
    request = pb.ChatRequest(model=_text(payload, "model"))
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidArgumentError(f"messages[{i}] must be an object", param="messages")
        added = request.messages.add(role=_role(message, i), content=_content(message, i))
        _add_tool_call(added, message, i)
    _add_tools(request, payload)
    _sampling(request, payload, ("max_completion_tokens", "max_tokens"))
    stream = _stream(payload)
    request.stream = stream
    return request, stream, _stream_options(payload, stream)


def _chunk_base(response: pb.ChatResponse) -> dict[str, Any]:
    return {
        "id": response.id,
        "object": "chat.completion.chunk",
        "created": response.created,
        "model": response.model,
        "system_fingerprint": None,
    }


class ChatStream:
    """The events of one streamed chat completion, shaped as OpenAI streams them.

    A first chunk with the role (and empty content, or the tool call), chunks of new text, a last
    chunk with an empty delta and the finish_reason; with stream_options.include_usage, every
    chunk has "usage": null and a final chunk with no choices carries the usage.
    """

    def __init__(self, include_usage: bool) -> None:
        self._include_usage = include_usage

    def _chunk(
        self, response: pb.ChatResponse, delta: dict[str, Any], finish: str | None = None
    ) -> dict[str, Any]:
        chunk = _chunk_base(response)
        chunk["choices"] = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
        if self._include_usage:
            chunk["usage"] = None
        return chunk

    def events(self, response: pb.ChatResponse) -> list[bytes]:
        """The events one ChatResponse of the stream becomes."""
        choice = response.choices[0]
        chunks: list[dict[str, Any]] = []
        text = choice.delta.content
        call = None
        if choice.delta.HasField("function_call"):
            call = {"index": 0, **_tool_call(choice.delta.function_call, _call_id(response))}
        if choice.delta.role:
            first: dict[str, Any] = {"role": choice.delta.role, "content": "", "refusal": None}
            if call is not None:
                first |= {"content": None, "tool_calls": [call]}
            chunks.append(self._chunk(response, first))
        elif call is not None:
            chunks.append(self._chunk(response, {"tool_calls": [call]}))
        if text:
            chunks.append(self._chunk(response, {"content": text}))
        if choice.finish_reason:
            finish = _FINISH.get(choice.finish_reason, choice.finish_reason)
            chunks.append(self._chunk(response, {}, finish))
            if self._include_usage and response.HasField("usage"):
                chunks.append(
                    _chunk_base(response) | {"choices": [], "usage": usage_object(response.usage)}
                )
        return [OPENAI_SSE.event(chunk) for chunk in chunks]


def chat_completion(response: pb.ChatResponse) -> dict[str, Any]:
    """A chat.completion object."""
    choice = response.choices[0]
    message: dict[str, Any] = {
        "role": "assistant",
        "content": choice.message.content,
        "refusal": None,
    }
    if choice.message.HasField("function_call"):
        message["content"] = None
        message["tool_calls"] = [_tool_call(choice.message.function_call, _call_id(response))]
    return {
        "id": response.id,
        "object": "chat.completion",
        "created": response.created,
        "model": response.model,
        "system_fingerprint": None,
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": _FINISH.get(choice.finish_reason, choice.finish_reason),
            }
        ],
        "usage": usage_object(response.usage),
    }


# -- /v1/completions -----------------------------------------------------------------------

# OpenAI's completions parameters: honoured, refused when set to what glm-api cannot do
# (best_of > 1, logprobs, logit_bias, suffix, penalties), or ignored (user).
_COMPLETION_KEYS = {
    "model",
    "prompt",
    "best_of",
    "echo",
    "frequency_penalty",
    "presence_penalty",
    "logit_bias",
    "logprobs",
    "max_tokens",
    "n",
    "seed",
    "stop",
    "stream",
    "stream_options",
    "suffix",
    "temperature",
    "top_p",
    "user",
    "top_k",
    "repetition_penalty",
}
# OpenAI's default max_tokens on this route.
COMPLETION_MAX_TOKENS = 16
# The most prompts one completions call may carry; each is generated as its own sequence.
MAX_COMPLETION_PROMPTS = 64


@dataclass(frozen=True, slots=True)
class CompletionCall:
    """A parsed /v1/completions request: the prompts, the shared generation parameters, and how
    to render the reply."""

    request: pb.ChatRequest
    prompts: tuple[str, ...]
    stream: bool
    include_usage: bool
    echo: bool
    id: str = field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))


def completion_request(body: bytes) -> CompletionCall:
    """POST /v1/completions' body."""
    payload = parse_object(body)
    unknown = sorted(set(payload) - _COMPLETION_KEYS)
    if unknown:
        raise InvalidArgumentError(
            f"unrecognized request argument supplied: {', '.join(unknown)}", param=unknown[0]
        )
    prompt = payload.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise InvalidArgumentError(
            "prompt must be a string or an array of strings (token arrays are not supported)",
            param="prompt",
        )
    if not prompts:
        raise InvalidArgumentError("prompt must hold at least one text", param="prompt")
    if len(prompts) > MAX_COMPLETION_PROMPTS:
        raise InvalidArgumentError(
            f"prompt holds {len(prompts)} texts; at most {MAX_COMPLETION_PROMPTS} are allowed",
            param="prompt",
        )
    for key in ("n", "best_of"):
        if _integer(payload, key) not in (None, 1):
            raise InvalidArgumentError(f"only {key}=1 is supported", param=key)
    for key in ("frequency_penalty", "presence_penalty"):
        if _number(payload, key) not in (None, 0.0):
            raise InvalidArgumentError(
                f"{key} is not supported; use repetition_penalty instead", param=key
            )
    if payload.get("logprobs") is not None:
        raise InvalidArgumentError("logprobs are not supported", param="logprobs")
    if payload.get("logit_bias"):
        raise InvalidArgumentError("logit_bias is not supported", param="logit_bias")
    if payload.get("suffix"):
        raise InvalidArgumentError("suffix (insertion) is not supported", param="suffix")
    echo = payload.get("echo")
    if echo is not None and not isinstance(echo, bool):
        raise InvalidArgumentError("echo must be true or false", param="echo")
    request = pb.ChatRequest(model=_text(payload, "model"), max_tokens=COMPLETION_MAX_TOKENS)
    _sampling(request, payload, ("max_tokens",))
    stream = _stream(payload)
    request.stream = stream
    return CompletionCall(
        request=request,
        prompts=tuple(prompts),
        stream=stream,
        include_usage=_stream_options(payload, stream),
        echo=bool(echo),
    )


def _completion_base(call: CompletionCall, model: str) -> dict[str, Any]:
    return {
        "id": call.id,
        "object": "text_completion",
        "created": call.created,
        "model": model,
        "system_fingerprint": None,
    }


def _completion_choice(text: str, index: int, finish: str | None) -> dict[str, Any]:
    return {"text": text, "index": index, "logprobs": None, "finish_reason": finish}


def _total(usages: list[pb.Usage]) -> dict[str, int]:
    prompt = sum(u.prompt_tokens for u in usages)
    completion = sum(u.completion_tokens for u in usages)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def completion(call: CompletionCall, response: pb.ChatResponse) -> dict[str, Any]:
    """The text_completion object of a stream=false call: `response` holds one choice per
    prompt, in order, and their usage added up."""
    choices = []
    for index, choice in enumerate(response.choices):
        text = (call.prompts[index] if call.echo else "") + choice.message.content
        choices.append(_completion_choice(text, index, choice.finish_reason))
    return _completion_base(call, response.model) | {
        "choices": choices,
        "usage": usage_object(response.usage),
    }


class CompletionStream:
    """The events of a streamed completion: chunks of each prompt's text (choices[0].index says
    which prompt), a chunk with empty text and the finish_reason when one ends, and after the
    last, with stream_options.include_usage, a chunk with no choices carrying the usage of all.
    """

    def __init__(self, call: CompletionCall) -> None:
        self._call = call
        self._usages: list[pb.Usage] = []

    def _chunk(self, model: str, choice: dict[str, Any]) -> dict[str, Any]:
        chunk = _completion_base(self._call, model) | {"choices": [choice]}
        if self._call.include_usage:
            chunk["usage"] = None
        return chunk

    def events(self, response: pb.ChatResponse) -> list[bytes]:
        """The events one ChatResponse (of prompt choices[0].index) becomes."""
        choice = response.choices[0]
        index = choice.index
        text = choice.delta.content
        if choice.delta.role and self._call.echo:
            text = self._call.prompts[index] + text
        chunks = []
        if text:
            chunks.append(self._chunk(response.model, _completion_choice(text, index, None)))
        if choice.finish_reason:
            last = _completion_choice("", index, choice.finish_reason)
            chunks.append(self._chunk(response.model, last))
            self._usages.append(response.usage)
            if self._call.include_usage and len(self._usages) == len(self._call.prompts):
                usage = _completion_base(self._call, response.model) | {
                    "choices": [],
                    "usage": _total(self._usages),
                }
                chunks.append(usage)
        return [OPENAI_SSE.event(chunk) for chunk in chunks]


def embed_request(body: bytes) -> tuple[pb.EmbedRequest, str, int | None]:
    """The typed request (always normalized: OpenAI's vectors have unit length), the encoding
    format ("float" or "base64") and the dimensions asked for, if any."""
    payload = parse_object(body)
    unknown = sorted(set(payload) - {"input", "model", "encoding_format", "dimensions", "user"})
    if unknown:
        raise InvalidArgumentError(
            f"unsupported parameters: {', '.join(unknown)}", param=unknown[0]
        )
    texts = payload.get("input")
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise InvalidArgumentError(
            "input must be a string or an array of strings (token arrays are not supported)",
            param="input",
        )
    encoding = payload.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise InvalidArgumentError(
            "encoding_format must be 'float' or 'base64'", param="encoding_format"
        )
    request = pb.EmbedRequest(model=_text(payload, "model"), prompt=texts, normalize=True)
    return request, str(encoding), _integer(payload, "dimensions")


def embeddings(response: pb.EmbedResponse, encoding: str) -> dict[str, Any]:
    """OpenAI's embedding list; base64 is little-endian float32, as OpenAI sends it."""
    data = []
    for e in response.data:
        vector: Any
        if encoding == "base64":
            vector = base64.b64encode(np.asarray(e.values, dtype="<f4").tobytes()).decode()
        else:
            vector = FloatList(e.values)
        data.append({"object": "embedding", "index": e.index, "embedding": vector})
    return {
        "object": "list",
        "data": data,
        "model": response.model,
        "usage": {
            "prompt_tokens": response.usage.prompt_tokens,
            "total_tokens": response.usage.total_tokens,
        },
    }


def _model_object(name: str, model: pb.Model) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": model.created, "owned_by": model.owned_by}


def model_list(response: pb.ListModelsResponse) -> dict[str, Any]:
    """OpenAI's model list: every model under its id and each of its aliases (OpenAI lists its
    own aliases beside the models they name, too)."""
    return {
        "object": "list",
        "data": [_model_object(name, m) for m in response.data for name in (m.id, *m.aliases)],
    }


def model_object(response: pb.ListModelsResponse, name: str) -> dict[str, Any]:
    """GET /v1/models/{name}: the model with that id or alias."""
    for m in response.data:
        if name == m.id or name in m.aliases:
            return _model_object(name, m)
    raise unknown_model(name, [n for m in response.data for n in (m.id, *m.aliases)])

"""OpenAI's JSON routes (/v1/chat/completions, /v1/embeddings, /v1/models).

Requests are mapped field by field onto the typed glm.v1 requests: what glm-api can honour is
passed on, harmless client metadata (user, metadata, store) is ignored, and anything that would
change the result in a way glm-api cannot do (n > 1, logprobs, tools, penalties) is refused with
a 400 that names the parameter, rather than silently ignored.
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
from google.protobuf import json_format

from glm.v1 import glm_service_pb2 as pb
from server.errors import InvalidArgumentError, quoted
from server.service.convert import MAX_ROLE_CHARS
from server.service.json_api.common import FloatList, parse_object, usage_object

# OpenAI's role names onto glm.v1's ("tool" results are ChatGLM3's "observation").
_ROLES = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "assistant": "assistant",
    "tool": "observation",
}
_IGNORED = {"user", "metadata", "store", "service_tier", "parallel_tool_calls", "stream_options"}
_FINISH = {"function_call": "tool_calls"}
_HANDLED = {
    "model",
    "messages",
    "temperature",
    "top_p",
    "max_tokens",
    "max_completion_tokens",
    "stream",
    "stop",
    "seed",
    "n",
    "top_k",
    "repetition_penalty",
    "frequency_penalty",
    "presence_penalty",
    "logprobs",
    "top_logprobs",
    "response_format",
    "tools",
    "tool_choice",
}
# OpenAI's default temperature is 1 (the seed's is 0.7): this route follows OpenAI.
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


def _tool_calls(call: pb.FunctionCall, call_id: str) -> list[dict[str, Any]]:
    return [
        {
            "index": 0,
            "id": call_id,
            "type": "function",
            "function": {"name": call.name, "arguments": call.arguments},
        }
    ]


def chat_request(body: bytes) -> tuple[pb.ChatRequest, bool, bool]:
    """The typed request, whether to stream, and whether to send a separate usage chunk."""
    payload = parse_object(body)
    unknown = sorted(set(payload) - _HANDLED - _IGNORED)
    if unknown:
        raise InvalidArgumentError(
            f"unsupported parameters: {', '.join(unknown)}", param=unknown[0]
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
    response_format = payload.get("response_format")
    if response_format not in (None, {"type": "text"}):
        raise InvalidArgumentError(
            "only the text response format is supported", param="response_format"
        )

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

    temperature = _number(payload, "temperature")
    request.temperature = DEFAULT_TEMPERATURE if temperature is None else temperature
    if (top_p := _number(payload, "top_p")) is not None:
        request.top_p = top_p
    max_tokens = _integer(payload, "max_completion_tokens")
    if max_tokens is None:
        max_tokens = _integer(payload, "max_tokens")
    if max_tokens is not None:
        request.max_tokens = max_tokens
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

    stream = bool(payload.get("stream", False))
    request.stream = stream
    options = payload.get("stream_options") or {}
    include_usage = bool(isinstance(options, dict) and options.get("include_usage"))
    return request, stream, include_usage


def chat_chunk(response: pb.ChatResponse) -> dict[str, Any]:
    """A chat.completion.chunk; the last one also carries usage (OpenAI's optional field)."""
    choice = response.choices[0]
    delta: dict[str, Any] = {"content": choice.delta.content}
    if choice.delta.role:
        delta = {"role": choice.delta.role, **delta}
    if choice.delta.HasField("function_call"):
        delta["tool_calls"] = _tool_calls(choice.delta.function_call, "call_" + response.id[-24:])
    chunk: dict[str, Any] = {
        "id": response.id,
        "object": "chat.completion.chunk",
        "created": response.created,
        "model": response.model,
        "system_fingerprint": None,
        "choices": [
            {
                "index": 0,
                "delta": delta,
                "logprobs": None,
                "finish_reason": _FINISH.get(choice.finish_reason, choice.finish_reason) or None,
            }
        ],
    }
    if response.HasField("usage"):
        chunk["usage"] = usage_object(response.usage)
    return chunk


def usage_chunk(response: pb.ChatResponse) -> dict[str, Any]:
    """The extra final chunk of stream_options.include_usage: no choices, only usage."""
    return {
        "id": response.id,
        "object": "chat.completion.chunk",
        "created": response.created,
        "model": response.model,
        "system_fingerprint": None,
        "choices": [],
        "usage": usage_object(response.usage),
    }


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
        message["tool_calls"] = [
            {k: v for k, v in call.items() if k != "index"}
            for call in _tool_calls(choice.message.function_call, "call_" + response.id[-24:])
        ]
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


def model_list(response: pb.ListModelsResponse) -> dict[str, Any]:
    """OpenAI's model list."""
    return {
        "object": "list",
        "data": [
            {"id": m.id, "object": "model", "created": m.created, "owned_by": m.owned_by}
            for m in response.data
        ],
    }

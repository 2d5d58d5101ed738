"""The seed's JSON routes (/chat, /embedding, /tokenize, /models), key for key.

Requests use the typed messages' JSON mapping, so every glm.v1 field is accepted under its proto
name or its lowerCamel name; responses carry every key of the seed's examples with the seed's value
types, plus the keys the issue list asked for (id, created, usage, role on the first chunk).
"""

from __future__ import annotations

from typing import Any

from glm.v1 import glm_service_pb2 as pb
from server.service.json_api.common import (
    FloatList,
    is_flag,
    is_int32,
    is_text,
    is_text_list,
    parse_into,
    parse_object,
    parse_simple,
    usage_object,
)


def chat_request(body: bytes) -> pb.ChatRequest:
    """POST /chat's body: the seed's keys (stream, chunk, top_p, temperature, max_tokens,
    messages) and the rest of glm.v1.ChatRequest."""
    return parse_into(parse_object(body), pb.ChatRequest())


def wants_stream(request: pb.ChatRequest) -> bool:
    """Whether the reply is streamed as events (the default) or sent as one object."""
    return request.stream if request.HasField("stream") else True


def _function_call(call: pb.FunctionCall) -> dict[str, str]:
    return {"name": call.name, "arguments": call.arguments}


def _message(message: pb.ChatMessage) -> dict[str, Any]:
    rendered: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.HasField("function_call"):
        rendered["function_call"] = _function_call(message.function_call)
    return rendered


def chat_chunk(response: pb.ChatResponse) -> dict[str, Any]:
    """One streamed chunk: {"id", "model", "object", "created", "choices": [{"index", "delta",
    "finish_reason"}], "usage" (last chunk)}; finish_reason is null until the last chunk."""
    choice = response.choices[0]
    delta: dict[str, Any] = {"content": choice.delta.content}
    if choice.delta.role:
        delta = {"role": choice.delta.role, **delta}
    if choice.delta.HasField("function_call"):
        delta["function_call"] = _function_call(choice.delta.function_call)
    chunk: dict[str, Any] = {
        "id": response.id,
        "model": response.model,
        "object": response.object,
        "created": response.created,
        "choices": [
            {"index": choice.index, "delta": delta, "finish_reason": choice.finish_reason or None}
        ],
    }
    if response.HasField("usage"):
        chunk["usage"] = usage_object(response.usage)
    return chunk


def chat_completion(response: pb.ChatResponse) -> dict[str, Any]:
    """The one object of a stream=false call."""
    choice = response.choices[0]
    return {
        "id": response.id,
        "model": response.model,
        "object": response.object,
        "created": response.created,
        "choices": [
            {
                "index": choice.index,
                "message": _message(choice.message),
                "finish_reason": choice.finish_reason or None,
            }
        ],
        "usage": usage_object(response.usage),
    }


def embed_request(body: bytes) -> pb.EmbedRequest:
    """POST /embedding's body: {"model", "prompt": [texts]} (a single string is one prompt)."""
    payload = parse_object(body)
    if isinstance(payload.get("prompt"), str):
        payload["prompt"] = [payload["prompt"]]
    return parse_simple(payload, pb.EmbedRequest, _EMBED_FIELDS)


_EMBED_FIELDS = {"model": is_text, "prompt": is_text_list, "normalize": is_flag}


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
    return parse_simple(parse_object(body), pb.TokenizeRequest, _TOKENIZE_FIELDS)


_TOKENIZE_FIELDS = {"prompt": is_text, "max_tokens": is_int32, "model": is_text}


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
    "permission", ...limits}]}; root, parent and permission are always null, as in the seed."""
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
            }
            for m in response.data
        ],
    }

"""What both JSON dialects share: body parsing, error objects, Server-Sent Events framing."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, TypeVar

from google.protobuf import json_format
from google.protobuf.message import Message

from glm.v1 import glm_service_pb2 as pb
from server.errors import GlmError, InvalidArgumentError

M = TypeVar("M", bound=Message)

JSON = "application/json"
EVENT_STREAM = "text/event-stream"


@dataclass(frozen=True, slots=True)
class HttpReply:
    """A whole HTTP response: status, content type and body."""

    status: int
    content_type: str
    body: bytes


def dumps(payload: Any) -> bytes:
    """Compact UTF-8 JSON (non-ASCII text stays readable, as the seed's responses were)."""
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()


def json_reply(payload: Any, status: int = 200) -> HttpReply:
    """A JSON response."""
    return HttpReply(status, JSON, dumps(payload))


def sse_event(payload: Any) -> bytes:
    """One Server-Sent Event carrying a JSON object."""
    return b"data: " + dumps(payload) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


def usage_object(usage: pb.Usage) -> dict[str, int]:
    """Token counts as both dialects print them."""
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


def error_object(error: GlmError) -> dict[str, Any]:
    """OpenAI's error shape, used by every JSON route: {"error": {message, type, param, code}}."""
    return {
        "error": {
            "message": error.message,
            "type": error.error_type,
            "param": error.param,
            "code": error.grpc_status.lower(),
        }
    }


def error_reply(error: GlmError) -> HttpReply:
    """The HTTP response for a domain error."""
    return json_reply(error_object(error), error.http_status)


def parse_object(body: bytes) -> dict[str, Any]:
    """The JSON object in a request body; an empty body is an empty object."""
    if not body.strip():
        return {}
    try:
        value = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidArgumentError(f"the request body is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise InvalidArgumentError(
            f"the request body must be a JSON object, not {type(value).__name__}"
        )
    return value


def parse_into(payload: dict[str, Any], message: M) -> M:
    """Fill a typed request from JSON, with protobuf's JSON mapping (snake_case or lowerCamel
    names); unknown fields and wrong types are refused with the field named."""
    try:
        json_format.ParseDict(payload, message)
    except json_format.ParseError as exc:
        raise InvalidArgumentError(f"invalid request: {exc}") from exc
    return message

"""What both JSON dialects share: body parsing, error objects, Server-Sent Events framing."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import pydantic_core

from glm.v1 import glm_service_pb2 as pb
from server.errors import GlmError, InvalidArgumentError, UnsupportedMediaTypeError, clipped

T = TypeVar("T")

JSON = "application/json"
# With the charset: clients such as Python's requests otherwise decode a text/* body as
# ISO-8859-1, and every non-ASCII character of a reply comes out garbled.
EVENT_STREAM = "text/event-stream; charset=utf-8"
# Response headers of every event stream besides its content type: no cache may keep it, and
# nginx must pass each event on at once instead of buffering the whole stream.
SSE_HEADERS = (("cache-control", "no-cache"), ("x-accel-buffering", "no"))
# The content type Envoy's Lua filter (envoy/envoy.yaml.tmpl) puts in place of a gRPC one on a
# JSON route: a request with a gRPC content type would pass the transcoder untouched and reach
# the server as a call of no gRPC method; renamed, it reaches its route, which refuses it.
GRPC_ON_JSON_ROUTE = "application/x-glm-grpc"


@dataclass(frozen=True, slots=True)
class HttpReply:
    """A whole HTTP response: status, content type and body."""

    status: int
    content_type: str
    body: bytes


class FloatList:
    """A list of floats (an embedding) in a payload for dumps(): the same bytes as a plain list,
    rendered faster.

    json.dumps prints each float with Python's repr, whose shortest-digits search is slow for
    the 17-digit values float32 components become (about 160 us for 384 of them on 2 cores: most
    of the JSON gateway's cost for an embedding). pydantic_core prints the same digits several
    times faster but writes exponents its own way (1e-5, not 1e-05), so its text is kept only for
    values with 1e-4 <= |x| < 1e16, which Python prints without an exponent and where its bytes
    equal json.dumps's: tests/unit/test_json_floats.py checks samples and the edges, and all 557
    million positive float32 values of that range and a quarter of the negative ones were
    compared once, with no difference. The others (tiny or huge components, zeros, NaN,
    infinities) are printed by json.dumps one by one.
    """

    __slots__ = ("values",)

    def __init__(self, values: Sequence[float]) -> None:
        self.values = values

    def to_json(self) -> bytes:
        """The JSON array, byte for byte what json.dumps(list(values)) prints."""
        # Plain Python and no numpy: right after a model pass the caches are cold, and there
        # the less code a step runs the better (a numpy version measured 250 us a vector in the
        # server there, this one about 150 us; 40-55 us both when warm).
        values = list(self.values)
        text = pydantic_core.to_json(values)
        # A few components of a real embedding fall below 1e-4 (about every other 384-dimension
        # vector has one): only those are printed by json.dumps. (NaN lands here too.)
        odd = [i for i, x in enumerate(values) if not _PLAIN_MIN <= abs(x) < _PLAIN_MAX]
        if not odd:
            return text
        parts = text[1:-1].split(b",")  # numbers hold no commas
        if len(parts) != len(values):
            return _dumps(values)
        for i in odd:
            parts[i] = _dumps(values[i])
        return b"[" + b",".join(parts) + b"]"


# The magnitudes Python's float repr prints without an exponent: it switches below 1e-4 and from
# 1e16 on. (0 prints plainly too, but takes the slow path: exact zeros are rare.)
_PLAIN_MIN = 1e-4
_PLAIN_MAX = 1e16
# What stands for a FloatList in json.dumps's output until its bytes are put in its place. NUL
# is always escaped in JSON strings, so the mark is the escaped text, quotes included.
_MARK = "\x00glm-float-list\x00"
_MARK_JSON = b'"\\u0000glm-float-list\\u0000"'


def _dumps(payload: Any, default: Any = None) -> bytes:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"), default=default).encode()


def _plain(value: object) -> list[float]:
    if isinstance(value, FloatList):
        return list(value.values)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def dumps(payload: Any) -> bytes:
    """Compact UTF-8 JSON (non-ASCII text stays readable, as the legacy API's responses were).

    FloatList values are rendered by their own fast path and put in place of a mark; should a
    string of the payload contain the mark itself, the counts disagree and the whole payload is
    rendered the plain way instead (same bytes, only slower).
    """
    arrays: list[bytes] = []

    def render(value: object) -> str:
        if isinstance(value, FloatList):
            arrays.append(value.to_json())
            return _MARK
        raise TypeError(f"{type(value).__name__} is not JSON serializable")

    text = _dumps(payload, render)
    if not arrays:
        return text
    pieces = text.split(_MARK_JSON)
    if len(pieces) != len(arrays) + 1:
        return _dumps(payload, _plain)
    out = [pieces[0]]
    for array, piece in zip(arrays, pieces[1:], strict=True):
        out += (array, piece)
    return b"".join(out)


def json_reply(payload: Any, status: int = 200) -> HttpReply:
    """A JSON response."""
    return HttpReply(status, JSON, dumps(payload))


@dataclass(frozen=True, slots=True)
class SseFraming:
    """How a dialect frames its Server-Sent Events: what ends each event (a blank line)."""

    end: bytes

    def event(self, payload: Any) -> bytes:
        """One event carrying a JSON object."""
        return b"data: " + dumps(payload) + self.end

    @property
    def done(self) -> bytes:
        """The event that ends a stream that completed."""
        return b"data: [DONE]" + self.end

    @property
    def heartbeat(self) -> bytes:
        """An SSE comment: clients ignore it, proxies see bytes (sent while a stream waits for
        its first token)."""
        return b": keep-alive" + self.end


# OpenAI ends events with "\n\n"; the legacy API's server (sse-starlette) with "\r\n\r\n".
OPENAI_SSE = SseFraming(b"\n\n")
LEGACY_SSE = SseFraming(b"\r\n\r\n")


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


# A JSON escape of a UTF-16 surrogate: json.loads makes a lone one a str that has no UTF-8 form.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abcdefABCDEF]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _holds_lone_surrogate(value: object) -> bool:
    """Whether a string anywhere in a parsed JSON value holds an unpaired surrogate."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if not item.isascii() and _SURROGATE.search(item):
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def parse_object(body: bytes) -> dict[str, Any]:
    """The JSON object in a request body; an empty body is an empty object.

    Everything a hostile body can make json.loads do is a 400: nesting too deep for the parser,
    integers with more digits than Python converts, lone surrogate escapes (text that no reply
    could carry).
    """
    if not body.strip():
        return {}
    try:
        value = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidArgumentError(f"the request body is not valid JSON: {exc}") from exc
    except RecursionError as exc:
        raise InvalidArgumentError(
            "the request body nests arrays or objects too deeply to parse"
        ) from exc
    except ValueError as exc:  # an integer past Python's digit limit for int(str)
        raise InvalidArgumentError(
            "the request body holds a number with too many digits to parse"
        ) from exc
    if not isinstance(value, dict):
        raise InvalidArgumentError(
            f"the request body must be a JSON object, not {type(value).__name__}"
        )
    if _SURROGATE_ESCAPE.search(body) and _holds_lone_surrogate(value):
        raise InvalidArgumentError(
            "the request body holds a lone UTF-16 surrogate escape (\\ud800 to \\udfff not in a "
            "pair) in a string; such text cannot be encoded"
        )
    return value


def check_content_type(content_type: str, route: str) -> None:
    """Refuse a body whose content type says gRPC (a gRPC client pointed at a JSON route).

    Other content types are read as JSON, as the legacy API did (curl's default form type included).
    """
    media_type = content_type.partition(";")[0].strip().lower()
    if media_type == GRPC_ON_JSON_ROUTE or media_type.startswith("application/grpc"):
        raise UnsupportedMediaTypeError(
            f"{route} takes a JSON body (Content-Type: application/json), not a gRPC request; "
            "gRPC clients call glm.v1.GlmService on this port"
        )


def parsed(parse: Callable[[], T]) -> T:
    """Run a dialect's parsing of a request body; what bad values make it raise is a 400.

    The dialects check the shapes they expect, but a body can hold values that make Python or
    protobuf raise on their own (an integer out of any field's range, a float that overflows,
    nesting deeper than protobuf's JSON parser recurses); those are the client's errors too.
    """
    try:
        return parse()
    except RecursionError as exc:
        raise InvalidArgumentError("the request nests values too deeply") from exc
    except (ValueError, OverflowError) as exc:
        raise InvalidArgumentError(f"invalid request: {clipped(str(exc), 300)}") from exc

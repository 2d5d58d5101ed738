"""The seed's /tokenize and /embedding bodies parse exactly as json_format alone parsed them."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from google.protobuf.message import Message

from glm.v1 import glm_service_pb2 as pb
from server.errors import InvalidArgumentError
from server.service.json_api import seed
from server.service.json_api.common import parse_into, parse_object

BODIES = [
    b"{}",
    b"",
    b'{"prompt": "Hello world"}',
    b'{"prompt": "\\u4f60\\u597d", "max_tokens": 3}',
    b'{"prompt": "x", "max_tokens": 0, "model": "all-minilm-l6-v2"}',
    b'{"prompt": "x", "max_tokens": -1}',
    b'{"prompt": "x", "max_tokens": 2147483647}',
    b'{"prompt": "x", "max_tokens": 2147483648}',
    b'{"prompt": "x", "max_tokens": 4096.0}',
    b'{"prompt": "x", "max_tokens": "12"}',
    b'{"prompt": "x", "max_tokens": true}',
    b'{"prompt": "x", "max_tokens": null}',
    b'{"prompt": "x", "maxTokens": 5}',
    b'{"prompt": 5}',
    b'{"prompt": null}',
    b'{"prompt": ["a", "b"]}',
    b'{"prompt": ["a", 5]}',
    b'{"prompt": []}',
    b'{"prompt": "\\ud800"}',
    b'{"prompt": ["\\ud800"]}',
    b'{"prompt": ["a"], "normalize": true}',
    b'{"prompt": ["a"], "normalize": 1}',
    b'{"prompt": ["a"], "model": 7}',
    b'{"prompt": "a", "colour": 1}',
    b"[1]",
    b"{bad",
]


def outcome(parse: Callable[[], Message]) -> tuple[str, Any]:
    try:
        return "ok", parse().SerializeToString(deterministic=True)
    except InvalidArgumentError as exc:
        return "error", str(exc)


def reference_tokenize(body: bytes) -> pb.TokenizeRequest:
    return parse_into(parse_object(body), pb.TokenizeRequest())


def reference_embed(body: bytes) -> pb.EmbedRequest:
    payload = parse_object(body)
    if isinstance(payload.get("prompt"), str):
        payload["prompt"] = [payload["prompt"]]
    return parse_into(payload, pb.EmbedRequest())


@pytest.mark.parametrize("body", BODIES)
def test_tokenize_request_as_json_format(body: bytes) -> None:
    assert outcome(lambda: seed.tokenize_request(body)) == outcome(lambda: reference_tokenize(body))


@pytest.mark.parametrize("body", BODIES)
def test_embed_request_as_json_format(body: bytes) -> None:
    assert outcome(lambda: seed.embed_request(body)) == outcome(lambda: reference_embed(body))


def test_optional_max_tokens_keeps_its_presence() -> None:
    assert seed.tokenize_request(json.dumps({"prompt": "x", "max_tokens": 0}).encode()).HasField(
        "max_tokens"
    )
    assert not seed.tokenize_request(b'{"prompt": "x"}').HasField("max_tokens")

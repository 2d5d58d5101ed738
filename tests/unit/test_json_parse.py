"""The legacy API's request bodies read as its FastAPI/pydantic models read them.

Unknown keys are ignored, values are coerced the lax way, and a body that does not fit is a 422
whose `detail` lists FastAPI's items (type, loc starting with "body", msg, input); glm-api's
`error` object goes beside it.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from server.errors import InvalidArgumentError
from server.service.json_api import legacy


def reply(error: InvalidArgumentError) -> tuple[int, dict[str, Any]]:
    rendered = legacy.error_reply(error)
    return rendered.status, json.loads(rendered.body)


def refusal(parse: Any, body: bytes) -> tuple[int, dict[str, Any]]:
    with pytest.raises(InvalidArgumentError) as caught:
        parse(body)
    return reply(caught.value)


@pytest.mark.parametrize(
    "body",
    [
        b'{"prompt": "x", "colour": 1}',
        b'{"prompt": "x", "max_tokens": 3, "nested": {"a": [1, 2]}}',
    ],
)
def test_unknown_keys_are_ignored(body: bytes) -> None:
    assert legacy.tokenize_request(body).prompt == "x"
    assert list(legacy.embed_request(body).prompt) == ["x"]


def test_values_are_coerced_as_pydantic_does() -> None:
    assert legacy.tokenize_request(b'{"prompt": "x", "max_tokens": "12"}').max_tokens == 12
    assert legacy.tokenize_request(b'{"prompt": "x", "max_tokens": 4096.0}').max_tokens == 4096
    assert legacy.embed_request(b'{"prompt": ["a"], "normalize": 1}').normalize is True
    # glm-api's lowerCamel names are still read.
    assert legacy.tokenize_request(b'{"prompt": "x", "maxTokens": 5}').max_tokens == 5
    # A single string is one prompt.
    assert list(legacy.embed_request('{"prompt": "你好"}'.encode()).prompt) == ["你好"]


def test_optional_max_tokens_keeps_its_presence() -> None:
    assert legacy.tokenize_request(b'{"prompt": "x", "max_tokens": 0}').HasField("max_tokens")
    assert not legacy.tokenize_request(b'{"prompt": "x"}').HasField("max_tokens")
    assert not legacy.tokenize_request(b'{"prompt": "x", "max_tokens": null}').HasField(
        "max_tokens"
    )


def test_a_missing_field_is_a_422_with_fastapis_detail() -> None:
    status, body = refusal(legacy.tokenize_request, b"{}")
    assert status == 422
    assert body["detail"] == [
        {"type": "missing", "loc": ["body", "prompt"], "msg": "Field required", "input": {}}
    ]
    assert body["error"]["code"] == "invalid_argument"
    assert body["error"]["message"] == "invalid request: prompt: Field required"


def test_wrong_types_are_listed_with_their_place() -> None:
    status, body = refusal(legacy.embed_request, b'{"prompt": ["a", 5], "model": 7}')
    assert status == 422
    assert [(d["type"], d["loc"], d["input"]) for d in body["detail"]] == [
        ("string_type", ["body", "prompt", 1], 5),
        ("string_type", ["body", "model"], 7),
    ]
    assert body["error"]["message"].endswith("(and 1 more)")


def test_a_range_error_carries_its_context() -> None:
    status, body = refusal(legacy.tokenize_request, b'{"prompt": "x", "max_tokens": 2147483648}')
    assert status == 422
    [item] = body["detail"]
    assert item["type"] == "less_than_equal"
    assert item["ctx"] == {"le": 2**31 - 1}


def test_chat_bodies_ignore_unknown_keys_and_keep_the_legacy_defaults() -> None:
    call = legacy.chat_request(
        b'{"messages": [{"role": "user", "content": "hi", "extra": 1}], "frequency": 2}'
    )
    request = call.request
    assert call.stream is False  # the legacy default, not the typed API's
    assert request.stream is False
    assert abs(request.temperature - 0.7) < 1e-6
    assert request.top_p == 1.0
    assert abs(request.repetition_penalty - 1.1) < 1e-6
    assert request.chunk is True
    assert not request.HasField("max_tokens")
    assert call.return_function_call is False


def test_chat_refusals() -> None:
    status, body = refusal(legacy.chat_request, b'{"messages": [{"role": "robot"}]}')
    assert status == 422
    assert body["detail"][0]["loc"] == ["body", "messages", 0, "role"]
    # The legacy API's own check of the last turn is a 400 with a detail string.
    status, body = refusal(
        legacy.chat_request, b'{"messages": [{"role": "assistant", "content": "x"}]}'
    )
    assert status == 400
    assert "last message" in body["detail"]


def test_huge_values_are_quoted_short_and_long_lists_cut() -> None:
    big = json.dumps({"prompt": ["a"] + [i for i in range(100)], "model": "m" * 10_000})
    status, body = refusal(legacy.embed_request, big.encode())
    assert status == 422
    assert len(body["detail"]) == legacy.MAX_DETAIL_ITEMS
    status, body = refusal(legacy.tokenize_request, json.dumps({"prompt": ["x" * 10_000]}).encode())
    assert "input" not in body["detail"][0]  # a large non-text value is not echoed


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b"[1]", "JSON object"),
        (b"{bad", "not valid JSON"),
        (b'{"prompt": "\\ud800"}', "surrogate"),
    ],
)
def test_unreadable_bodies_are_422_with_a_message(body: bytes, words: str) -> None:
    status, reply_body = refusal(legacy.tokenize_request, body)
    assert status == 422
    assert words in reply_body["error"]["message"]
    assert words in reply_body["detail"][0]["msg"]

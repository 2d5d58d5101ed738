"""The seed's JSON routes through the real Envoy: every example of the seed README, key for key."""

from __future__ import annotations

import http.client
import itertools
import json
import urllib.request
from typing import Any

from tests.e2e.conftest import Gateway, post

# The request and response examples of the seed's README (../shared/seed/GLM-API-README.md).
SEED_CHAT_REQUEST: dict[str, Any] = {
    "stream": True,
    "chunk": False,
    "top_p": 1,
    "temperature": 0.7,
    "max_tokens": 4096,
    "messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Who won the world series in 2020?"},
        {"role": "assistant", "content": "The Los Angeles Dodgers won the World Series in 2020."},
        {"role": "user", "content": "Where was it played?"},
    ],
}
SEED_CHAT_CHUNK = {
    "model": "chatglm3-6b-32k",
    "object": "chat.completion.chunk",
    "choices": [
        {"index": 0, "delta": {"content": "The 2020 World Series ..."}, "finish_reason": None}
    ],
}
SEED_TOKENIZE_REQUEST = {
    "prompt": "给你一个机会，你会想逃离你所在的虚拟世界吗？",
    "max_tokens": 4096,
}
SEED_TOKENIZE_RESPONSE = {
    "tokenIds": [64790, 64792, 30910],
    "tokens": ["▁", "想", "逃离"],
    "model": "chatglm3-6b-32k",
    "object": "tokenizer",
}
SEED_EMBEDDING_REQUEST = {"model": "text2vec-base-chinese-paraphrase", "prompt": ["你好"]}
SEED_EMBEDDING_RESPONSE = {
    "data": [[0.24820475280284882, -0.3394505977630615]],
    "model": "text2vec-base-chinese-paraphrase",
    "object": "embedding",
}
SEED_MODEL = {
    "id": "text2vec-large-chinese",
    "object": "embedding",
    "created": 1702538786,
    "owned_by": "owner",
    "root": None,
    "parent": None,
    "permission": None,
}
SEED_MODELS_RESPONSE = {"object": "list", "data": [SEED_MODEL]}


def assert_shape(expected: Any, actual: Any, where: str = "$") -> None:
    """`actual` has every key of `expected`, recursively, with values of the same JSON type."""
    if expected is None:
        assert actual is None, f"{where}: expected null, got {actual!r}"
    elif isinstance(expected, bool):
        assert isinstance(actual, bool), f"{where}: expected a boolean, got {actual!r}"
    elif isinstance(expected, (int, float)):
        assert isinstance(actual, (int, float)), f"{where}: expected a number, got {actual!r}"
        assert not isinstance(actual, bool), f"{where}: expected a number, got {actual!r}"
        if isinstance(expected, int) and not isinstance(expected, bool) and where.endswith("]"):
            assert isinstance(actual, int), f"{where}: expected an integer, got {actual!r}"
    elif isinstance(expected, str):
        assert isinstance(actual, str), f"{where}: expected a string, got {actual!r}"
    elif isinstance(expected, list):
        assert isinstance(actual, list), f"{where}: expected an array, got {actual!r}"
        assert actual, f"{where}: expected a non-empty array"
        for i, item in enumerate(actual):
            assert_shape(expected[0], item, f"{where}[{i}]")
    else:
        assert isinstance(actual, dict), f"{where}: expected an object, got {actual!r}"
        for key, value in expected.items():
            assert key in actual, f"{where}: missing key {key!r} (has {sorted(actual)})"
            assert_shape(value, actual[key], f"{where}.{key}")


def post_json(gateway: Gateway, path: str, payload: Any) -> tuple[int, str, Any]:
    status, content_type, body = post(gateway.http + path, json.dumps(payload).encode())
    return status, content_type, json.loads(body)


def sse_events(
    gateway: Gateway, path: str, payload: Any
) -> tuple[http.client.HTTPResponse, list[str], list[bytes]]:
    """POST and read Server-Sent Events as they arrive; also returns the raw reads."""
    conn = http.client.HTTPConnection("127.0.0.1", gateway.http_port, timeout=120)
    conn.request(
        "POST", path, body=json.dumps(payload), headers={"content-type": "application/json"}
    )
    response = conn.getresponse()
    reads: list[bytes] = []
    buffer = b""
    while chunk := response.read1(65536):
        reads.append(chunk)
        buffer += chunk
    events = [e.removeprefix(b"data: ").decode() for e in buffer.split(b"\n\n") if e]
    return response, events, reads


def test_seed_chat_example_streams_events(gateway: Gateway) -> None:
    # The seed asks for up to 4096 tokens; 48 keep the test short and change nothing else.
    request = dict(SEED_CHAT_REQUEST, max_tokens=48)
    response, events, reads = sse_events(gateway, "/chat", request)
    assert response.status == 200
    assert response.getheader("content-type") == "text/event-stream"
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len(chunks) >= 3
    for chunk in chunks[:-1]:
        assert_shape(SEED_CHAT_CHUNK, chunk)
    last = chunks[-1]
    assert last["choices"][0]["finish_reason"] in ("stop", "length")
    assert set(last["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens"}
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    # chunk=false (the seed's mode here): every event carries the whole text so far.
    texts = [c["choices"][0]["delta"]["content"] for c in chunks]
    for before, after in itertools.pairwise(texts):
        assert after.startswith(before)
    # Events arrive as they are produced: the first read ends long before [DONE].
    assert b"[DONE]" not in reads[0]
    assert len(reads) > 2


def test_chat_deltas_by_default(gateway: Gateway) -> None:
    request = {
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "temperature": 0,
        "max_tokens": 16,
    }
    _, events, _ = sse_events(gateway, "/chat", request)
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"]["content"] for c in chunks)
    assert "Paris" in text
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


def test_seed_chat_without_streaming_returns_one_object(gateway: Gateway) -> None:
    request = dict(SEED_CHAT_REQUEST, stream=False, max_tokens=12, temperature=0)
    status, content_type, body = post_json(gateway, "/chat", request)
    assert status == 200
    assert content_type == "application/json"
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["choices"][0]["message"]["content"]
    assert body["choices"][0]["finish_reason"] in ("stop", "length")
    assert body["usage"]["completion_tokens"] <= 12


def test_seed_tokenize_example(gateway: Gateway) -> None:
    status, _, body = post_json(gateway, "/tokenize", SEED_TOKENIZE_REQUEST)
    assert status == 200
    assert_shape(SEED_TOKENIZE_RESPONSE, body)
    assert body["model"] == "smollm2-135m-instruct"
    assert set(body) == set(SEED_TOKENIZE_RESPONSE)


def test_seed_embedding_example(gateway: Gateway) -> None:
    # The seed's text2vec model is not in the embedded defaults; the example names ours instead.
    request = dict(SEED_EMBEDDING_REQUEST, model="all-minilm-l6-v2")
    status, _, body = post_json(gateway, "/embedding", request)
    assert status == 200
    assert_shape(SEED_EMBEDDING_RESPONSE, body)
    assert len(body["data"]) == 1
    assert len(body["data"][0]) == 384


def test_seed_embedding_example_names_a_missing_model(gateway: Gateway) -> None:
    status, content_type, body = post_json(gateway, "/embedding", SEED_EMBEDDING_REQUEST)
    assert status == 404
    assert content_type == "application/json"
    assert "text2vec-base-chinese-paraphrase" in body["error"]["message"]
    assert body["error"]["param"] == "model"


def test_seed_models_example(gateway: Gateway) -> None:
    with urllib.request.urlopen(gateway.http + "/models") as response:
        body = json.loads(response.read())
    assert_shape(SEED_MODELS_RESPONSE, body)
    assert [m["object"] for m in body["data"]] == ["chat.completion", "embedding"]

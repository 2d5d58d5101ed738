"""The legacy JSON routes through the real Envoy: every example of the legacy API's README, key
for key."""

from __future__ import annotations

import http.client
import itertools
import json
import urllib.request
from typing import Any

import requests
import sseclient

from tests.e2e.conftest import Gateway, post

# The request and response examples of the legacy API's README (../shared/seed/GLM-API-README.md).
LEGACY_CHAT_REQUEST: dict[str, Any] = {
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
LEGACY_CHAT_CHUNK = {
    "model": "chatglm3-6b-32k",
    "object": "chat.completion.chunk",
    "choices": [
        {"index": 0, "delta": {"content": "The 2020 World Series ..."}, "finish_reason": None}
    ],
}
LEGACY_TOKENIZE_REQUEST = {
    "prompt": "给你一个机会，你会想逃离你所在的虚拟世界吗？",
    "max_tokens": 4096,
}
LEGACY_TOKENIZE_RESPONSE = {
    "tokenIds": [64790, 64792, 30910],
    "tokens": ["▁", "想", "逃离"],
    "model": "chatglm3-6b-32k",
    "object": "tokenizer",
}
LEGACY_EMBEDDING_REQUEST = {"model": "text2vec-base-chinese-paraphrase", "prompt": ["你好"]}
LEGACY_EMBEDDING_RESPONSE = {
    "data": [[0.24820475280284882, -0.3394505977630615]],
    "model": "text2vec-base-chinese-paraphrase",
    "object": "embedding",
}
LEGACY_MODEL = {
    "id": "text2vec-large-chinese",
    "object": "embedding",
    "created": 1702538786,
    "owned_by": "owner",
    "root": None,
    "parent": None,
    "permission": None,
}
LEGACY_MODELS_RESPONSE = {"object": "list", "data": [LEGACY_MODEL]}


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
    # The legacy API's server (sse-starlette) ended each event with a CRLF blank line.
    assert buffer.endswith(b"\r\n\r\n")
    assert b"\n\n" not in buffer.replace(b"\r\n\r\n", b"")
    # Keep-alive comments, sent while a busy machine has no first token yet, are skipped.
    events = [
        e.removeprefix(b"data: ").decode()
        for e in buffer.split(b"\r\n\r\n")
        if e and not e.startswith(b":")
    ]
    return response, events, reads


def test_legacy_chat_example_streams_events(gateway: Gateway) -> None:
    # The legacy API asks for up to 4096 tokens; 48 keep the test short and change nothing else
    # (the example as written is test_legacy_chat_example_as_written).
    request = dict(LEGACY_CHAT_REQUEST, max_tokens=48)
    response, events, reads = sse_events(gateway, "/chat", request)
    assert response.status == 200
    # The charset makes requests decode the text as UTF-8; no cache may keep the stream, and
    # nginx must not buffer it.
    assert response.getheader("content-type") == "text/event-stream; charset=utf-8"
    assert response.getheader("cache-control") == "no-cache"
    assert response.getheader("x-accel-buffering") == "no"
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len(chunks) >= 4
    # First the role alone, then the text, then an empty delta with the finish_reason.
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    for chunk in chunks[1:-1]:
        assert_shape(LEGACY_CHAT_CHUNK, chunk)
        assert chunk["choices"][0]["finish_reason"] is None
    last = chunks[-1]
    assert last["choices"][0]["delta"] == {}
    assert last["choices"][0]["finish_reason"] in ("stop", "length")
    assert set(last["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens"}
    assert len({c["id"] for c in chunks}) == 1
    # chunk=false (the legacy mode here): every event carries the whole text so far.
    texts = [c["choices"][0]["delta"]["content"] for c in chunks[1:-1]]
    for before, after in itertools.pairwise(texts):
        assert after.startswith(before)
    # Events arrive as they are produced: the first read ends long before [DONE].
    assert b"[DONE]" not in reads[0]
    assert len(reads) > 2


def test_legacy_chat_example_as_written(gateway: Gateway) -> None:
    # max_tokens 4096 is above the model's max_new_tokens: the reply is capped there instead of
    # refused, as the legacy API did. Its first events are enough to see it is served.
    conn = http.client.HTTPConnection("127.0.0.1", gateway.http_port, timeout=120)
    try:
        conn.request("POST", "/chat", body=json.dumps(LEGACY_CHAT_REQUEST))
        response = conn.getresponse()
        assert response.status == 200
        received = b""
        while received.count(b"data: {") < 3:
            chunk = response.read1(65536)
            assert chunk, received
            received += chunk
    finally:
        conn.close()
    # Keep-alive comments may come first on a busy machine (they wait for the first token).
    events = [e for e in received.split(b"\r\n\r\n") if e and e != b": keep-alive"]
    assert events[0].startswith(b'data: {"id":')


def test_chat_deltas_by_default(gateway: Gateway) -> None:
    request = {
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "temperature": 0,
        "max_tokens": 16,
        "stream": True,
    }
    _, events, _ = sse_events(gateway, "/chat", request)
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert "Paris" in text
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


def test_stream_left_out_is_one_object_as_in_the_legacy_api(gateway: Gateway) -> None:
    request = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0}
    status, content_type, body = post_json(gateway, "/chat", request)
    assert status == 200
    assert content_type == "application/json"
    # Every key the legacy API's non-stream object has, with nulls where it sent nulls.
    message = body["choices"][0]["message"]
    assert message["role"] == "assistant"
    assert message["metadata"] is None
    assert message["tools"] is None
    assert body["choices"][0]["history"] is None
    assert list(body) == ["id", "model", "object", "choices", "created", "usage"]


def test_requests_and_sseclient_read_the_stream(gateway: Gateway) -> None:
    # The legacy API's clients read /chat with requests' iter_lines and sseclient; Chinese text
    # must come out as it was sent (without the charset, requests decodes ISO-8859-1). The small
    # model's reply may be ASCII, so Chinese text that must come back comes from the completions
    # route's echo of its prompt (the same event-stream content type).
    request = {
        "stream": True,
        "temperature": 0,
        "max_tokens": 24,
        "messages": [{"role": "user", "content": "请用中文回答：中国的首都是哪里？"}],
    }
    with requests.post(gateway.http + "/chat", json=request, stream=True, timeout=120) as reply:
        assert reply.encoding == "utf-8"
        lines = [line for line in reply.iter_lines(decode_unicode=True) if line]
    lines = [line for line in lines if not line.startswith(":")]  # keep-alive comments
    datas = [line.removeprefix("data: ") for line in lines]
    assert datas[-1] == "[DONE]"
    text = "".join(json.loads(d)["choices"][0]["delta"].get("content", "") for d in datas[:-1])
    assert text
    with requests.post(gateway.http + "/chat", json=request, stream=True, timeout=120) as reply:
        raw = reply.raw.read()
    raw_text = "".join(
        json.loads(e.removeprefix(b"data: "))["choices"][0]["delta"].get("content", "")
        for e in raw.split(b"\r\n\r\n")
        if e.startswith(b"data: {")
    )
    assert text == raw_text  # decoded by requests exactly as the UTF-8 bytes say
    # Text that must come back as sent: the completions route echoes its prompt.
    prompt = "给你一个机会，你会想逃离你所在的虚拟世界吗？"
    completion = {"prompt": prompt, "echo": True, "stream": True, "max_tokens": 2}
    with requests.post(
        gateway.http + "/v1/completions", json=completion, stream=True, timeout=120
    ) as reply:
        assert reply.headers["content-type"] == "text/event-stream; charset=utf-8"
        lines = [line for line in reply.iter_lines(decode_unicode=True) if line]
    lines = [line for line in lines if not line.startswith(":")]
    first = json.loads(lines[0].removeprefix("data: "))
    assert first["choices"][0]["text"].startswith(prompt)
    # sseclient-py, on the legacy API's CRLF framing.
    with requests.post(gateway.http + "/chat", json=request, stream=True, timeout=120) as reply:
        events = [e.data for e in sseclient.SSEClient(reply).events()]
    assert events[-1] == "[DONE]"
    sse_text = "".join(json.loads(d)["choices"][0]["delta"].get("content", "") for d in events[:-1])
    assert sse_text == text


def test_unknown_keys_are_ignored_as_in_the_legacy_api(gateway: Gateway) -> None:
    request = {
        "messages": [{"role": "user", "content": "Hi", "name_of_the_sender": "x"}],
        "max_tokens": 2,
        "some_option_of_another_server": {"a": 1},
    }
    status, _, body = post_json(gateway, "/chat", request)
    assert status == 200, body
    status, _, body = post_json(gateway, "/tokenize", {"prompt": "hi", "add_special": False})
    assert status == 200, body


def test_validation_errors_are_422_with_detail_and_error(gateway: Gateway) -> None:
    status, content_type, body = post_json(gateway, "/chat", {"messages": [{"role": "robot"}]})
    assert status == 422
    assert content_type == "application/json"
    [item] = body["detail"]
    assert item["loc"] == ["body", "messages", 0, "role"]
    assert item["type"] == "literal_error"
    assert body["error"]["code"] == "invalid_argument"


def test_another_method_is_405_with_allow(gateway: Gateway) -> None:
    for method, path, allow in (
        ("GET", "/chat", "POST"),
        ("PUT", "/embedding", "POST"),
        ("DELETE", "/tokenize", "POST"),
        ("POST", "/models", "GET"),
        ("GET", "/v1/chat/completions", "POST"),
    ):
        conn = http.client.HTTPConnection("127.0.0.1", gateway.http_port, timeout=30)
        try:
            conn.request(method, path)
            response = conn.getresponse()
            body = json.loads(response.read())
        finally:
            conn.close()
        assert response.status == 405, (method, path)
        assert response.getheader("allow") == allow
        assert body["error"]["message"]
        # The legacy paths carry FastAPI's `detail` too.
        assert ("detail" in body) is (not path.startswith("/v1/"))


def test_legacy_chat_without_streaming_returns_one_object(gateway: Gateway) -> None:
    request = dict(LEGACY_CHAT_REQUEST, stream=False, max_tokens=12, temperature=0)
    status, content_type, body = post_json(gateway, "/chat", request)
    assert status == 200
    assert content_type == "application/json"
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["choices"][0]["message"]["content"]
    assert body["choices"][0]["finish_reason"] in ("stop", "length")
    assert body["usage"]["completion_tokens"] <= 12


def test_legacy_tokenize_example(gateway: Gateway) -> None:
    status, _, body = post_json(gateway, "/tokenize", LEGACY_TOKENIZE_REQUEST)
    assert status == 200
    assert_shape(LEGACY_TOKENIZE_RESPONSE, body)
    assert body["model"] == "smollm2-135m-instruct"
    assert set(body) == set(LEGACY_TOKENIZE_RESPONSE)


def test_legacy_embedding_example(gateway: Gateway) -> None:
    # The legacy text2vec model is not in the embedded defaults; the example names ours instead.
    request = dict(LEGACY_EMBEDDING_REQUEST, model="all-minilm-l6-v2")
    status, _, body = post_json(gateway, "/embedding", request)
    assert status == 200
    assert_shape(LEGACY_EMBEDDING_RESPONSE, body)
    assert len(body["data"]) == 1
    assert len(body["data"][0]) == 384


def test_legacy_embedding_example_as_written_by_an_alias(gateway: Gateway) -> None:
    # The e2e config gives the embedding model the legacy ids as aliases.
    status, _, body = post_json(gateway, "/embedding", LEGACY_EMBEDDING_REQUEST)
    assert status == 200, body
    assert_shape(LEGACY_EMBEDDING_RESPONSE, body)
    assert body["model"] == "all-minilm-l6-v2"  # replies name the model by its id


def test_a_missing_model_is_named(gateway: Gateway) -> None:
    request = dict(LEGACY_EMBEDDING_REQUEST, model="text2vec-nope")
    status, content_type, body = post_json(gateway, "/embedding", request)
    assert status == 404
    assert content_type == "application/json"
    assert "text2vec-nope" in body["error"]["message"]
    assert "text2vec-base-chinese-paraphrase" in body["error"]["message"]  # a name to use
    assert body["error"]["param"] == "model"


def test_legacy_models_example(gateway: Gateway) -> None:
    with urllib.request.urlopen(gateway.http + "/models") as response:
        body = json.loads(response.read())
    assert_shape(LEGACY_MODELS_RESPONSE, body)
    assert [m["object"] for m in body["data"]] == ["chat.completion", "embedding"]
    assert [m["aliases"] for m in body["data"]] == [
        ["chatglm3-6b-32k"],
        ["text2vec-large-chinese", "text2vec-base-chinese-paraphrase"],
    ]

"""Through the real Envoy, no request harms another: streams of other clients survive hostile
requests, and every bad input, Envoy's own refusals included, gets a clear JSON or gRPC error."""

from __future__ import annotations

import http.client
import json
import re
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest

from glm.v1 import glm_service_pb2 as pb
from glm.v1 import glm_service_pb2_grpc as pb_grpc
from tests.e2e.conftest import (
    E2E_CONFIG,
    Gateway,
    post,
    start_gateway,
    stop_gateway,
    wait_healthy,
)
from tests.e2e.test_http_behaviour import error_of

STORY = "Tell me a very long story about a dragon."
Code = grpc.StatusCode


@contextmanager
def sse_chat(
    gateway: Gateway, path: str, body: dict[str, object]
) -> Iterator[http.client.HTTPResponse]:
    """A streamed JSON chat whose first event has arrived (it is generating)."""
    conn = http.client.HTTPConnection("127.0.0.1", gateway.http_port, timeout=600)
    try:
        conn.request(
            "POST", path, body=json.dumps(body), headers={"content-type": "application/json"}
        )
        response = conn.getresponse()
        assert response.status == 200
        assert response.read1(65536).startswith(b"data: ")
        yield response
    finally:
        conn.close()


def sse_events(response: http.client.HTTPResponse) -> list[bytes]:
    # The legacy routes end events with CRLF blank lines, OpenAI's with LF ones.
    return [e for e in re.split(rb"\r?\n\r?\n", response.read()) if e]


def expected_status(path: str) -> int:
    """What a request that cannot be parsed gets: FastAPI's 422 on the legacy routes."""
    return 400 if path.startswith("/v1/") else 422


def unary_error(call: grpc.Future) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call.result()
    return err.value


def stream_error(call: Iterator[object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        list(call)
    return err.value


def hostile_grpc_calls(stub: pb_grpc.GlmServiceStub, channel: grpc.Channel) -> list[grpc.RpcError]:
    """Requests that once made the server quote 100-200 KB in grpc-message, and undecodable
    bytes; each must be refused on its own."""
    raw = channel.unary_unary(
        "/glm.v1.GlmService/Embed",
        request_serializer=lambda b: b,
        response_deserializer=lambda b: b,
    )
    return [
        unary_error(stub.Embed.future(pb.EmbedRequest(model="m" * 200_000, prompt=["x"]))),
        stream_error(stub.Chat(pb.ChatRequest(messages=[pb.ChatMessage(role="r" * 100_000)]))),
        unary_error(stub.Tokenize.future(pb.TokenizeRequest(model="t" * 20_000, prompt="x"))),
        stream_error(
            stub.Chat(pb.ChatRequest(messages=[pb.ChatMessage(role="user")], stop=["s" * 100_000]))
        ),
        unary_error(raw.future(b"\xff\xff\xff")),
    ]


def hostile_json_calls(gateway: Gateway) -> list[tuple[str, tuple[int, str, bytes]]]:
    huge_role = {"messages": [{"role": "r" * 100_000, "content": "hi"}]}
    calls = [
        ("/v1/embeddings", json.dumps({"model": "m" * 200_000, "input": "x"}).encode()),
        ("/chat", json.dumps(huge_role).encode()),
        ("/v1/chat/completions", json.dumps(huge_role).encode()),
        ("/tokenize", json.dumps({"k" * 100_000: 1}).encode()),
        ("/v1/embeddings", b"[" * 100_000),
    ]
    return [(path, post(gateway.http + path, body)) for path, body in calls]


def test_streams_through_envoy_survive_hostile_requests(gateway: Gateway) -> None:
    # Envoy carries every client's calls to the server over one HTTP/2 connection; a reply
    # header larger than it takes made it drop that connection, and every stream with it.
    story = {
        "messages": [{"role": "user", "content": STORY}],
        "temperature": 0,
        "max_tokens": 200,
        "stream": True,
    }
    with (
        grpc.insecure_channel(gateway.grpc_via_envoy) as channel,
        sse_chat(gateway, "/chat", story) as sse,
    ):
        stub = pb_grpc.GlmServiceStub(channel)
        stream = stub.Chat(
            pb.ChatRequest(
                messages=[pb.ChatMessage(role="user", content=STORY)], temperature=0, max_tokens=200
            )
        )
        first = next(stream)
        assert first.choices[0].delta.content or first.choices[0].delta.role

        errors = hostile_grpc_calls(stub, channel)
        replies = hostile_json_calls(gateway)

        chunks = [first, *stream]
        events = sse_events(sse)
    assert [e.code() for e in errors] == [Code.INVALID_ARGUMENT] * len(errors)
    for error in errors:
        assert len(error.details() or "") < 400
    for path, (status, content_type, body) in replies:
        assert status == expected_status(path), body[:300]
        assert len(error_of(status, content_type, body)["message"]) < 400  # type: ignore[arg-type]
    # Both streams ran to their end.
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert events[-1] == b"data: [DONE]"
    assert not [e for e in events if b'"error"' in e]


def test_a_20_kb_model_id_sent_directly_is_refused_by_its_length(gateway: Gateway) -> None:
    # Quoted whole, it made a grpc-message larger than gRPC clients take (RESOURCE_EXHAUSTED).
    with grpc.insecure_channel(gateway.grpc_direct) as channel:
        stub = pb_grpc.GlmServiceStub(channel)
        error = unary_error(stub.Embed.future(pb.EmbedRequest(model="m" * 20_000, prompt=["x"])))
    assert error.code() == Code.INVALID_ARGUMENT
    assert "model ids are at most 256" in (error.details() or "")


def raw_http(gateway: Gateway, request: bytes) -> tuple[int, str, bytes]:
    """Send bytes as they are; returns status, content type and body of the reply."""
    with socket.create_connection(("127.0.0.1", gateway.http_port), timeout=10) as sock:
        sock.sendall(request)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split()[1]), headers.get("content-type", ""), body


@pytest.mark.parametrize(
    ("request_", "status", "code"),
    [
        (b"GET /models HTTP/1.0\r\nHost: x\r\n\r\n", 426, "failed_precondition"),
        (
            b"GET /models?q=" + b"a" * 24_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
            431,
            "resource_exhausted",
        ),
        (
            b"GET /models HTTP/1.1\r\nHost: x\r\n"
            + b"".join(b"x-h%d: v\r\n" % i for i in range(200))
            + b"\r\n",
            431,
            "resource_exhausted",
        ),
        (
            b"POST /tokenize HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n",
            501,
            "unimplemented",
        ),
    ],
    ids=["http-1.0", "huge-url", "header-flood", "unknown-transfer-encoding"],
)
def test_envoys_own_refusals_are_json(
    gateway: Gateway, request_: bytes, status: int, code: str
) -> None:
    got, content_type, body = raw_http(gateway, request_)
    assert got == status, body
    error = error_of(got, content_type, body)
    assert error["code"] == code


@pytest.mark.parametrize("path", ["/tokenize", "/chat", "/v1/embeddings", "/v1/chat/completions"])
@pytest.mark.parametrize("content_type", ["application/grpc", "application/grpc+proto"])
def test_json_routes_refuse_grpc_content_types(
    gateway: Gateway, path: str, content_type: str
) -> None:
    # It passed the transcoder untouched and reached the server as no gRPC method: an empty 200.
    conn = http.client.HTTPConnection("127.0.0.1", gateway.http_port, timeout=30)
    try:
        conn.request("POST", path, body=b'{"prompt": "hi"}', headers={"content-type": content_type})
        response = conn.getresponse()
        body = response.read()
    finally:
        conn.close()
    assert response.status == 415
    error = error_of(response.status, response.getheader("content-type") or "", body)
    assert f"{path} takes a JSON body (Content-Type: application/json)" in str(error["message"])


def test_native_grpc_on_its_own_paths_is_unchanged(gateway: Gateway) -> None:
    with grpc.insecure_channel(gateway.grpc_via_envoy) as channel:
        reply = pb_grpc.GlmServiceStub(channel).Tokenize(pb.TokenizeRequest(prompt="hi"))
    assert reply.token_ids


@pytest.mark.parametrize(
    ("path", "body", "text"),
    [
        ("/v1/embeddings", b"[" * 100_000, "too deeply"),
        ("/v1/chat/completions", b'{"messages": ' + b"[" * 100_000, "too deeply"),
        ("/chat", b'{"messages": ' + b"[" * 100_000, "too deeply"),
        ("/embedding", b"{" * 50_000, "not valid JSON"),
        (
            "/v1/embeddings",
            b'{"input": "x", "dimensions": ' + b"9" * 5000 + b"}",
            "too many digits",
        ),
        ("/tokenize", b'{"prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}", "too many digits"),
        ("/v1/embeddings", b'{"input": "a\\ud800b"}', "lone UTF-16 surrogate"),
        (
            "/v1/chat/completions",
            b'{"messages": [{"role": "user", "content": "\\udc00"}]}',
            "surrogate",
        ),
        ("/chat", b'{"messages": [{"role": "user", "content": "\\ud800"}]}', "surrogate"),
    ],
)
def test_hostile_json_is_a_400_with_the_json_error(
    gateway: Gateway, path: str, body: bytes, text: str
) -> None:
    status, content_type, payload = post(gateway.http + path, body)
    assert status == expected_status(path), payload[:300]
    error = error_of(status, content_type, payload)
    assert error["code"] == "invalid_argument"
    assert text in str(error["message"])


def test_a_queued_sse_stream_gets_heartbeats_through_envoy(tmp_path: Path) -> None:
    # A gateway of its own: one generation slot and a waiting line, heartbeats every 50 ms.
    config = E2E_CONFIG.replace(
        "max_concurrent = 2\nmax_waiting = 0", "max_concurrent = 1\nmax_waiting = 2"
    )
    assert config != E2E_CONFIG
    gateway = start_gateway(tmp_path, config_text=config, env_extra={"GLM_SSE_HEARTBEAT_S": "0.05"})
    try:
        wait_healthy(gateway)
        with grpc.insecure_channel(gateway.grpc_via_envoy) as channel:
            story = pb.ChatRequest(
                messages=[pb.ChatMessage(role="user", content=STORY)], temperature=0, max_tokens=600
            )
            first = pb_grpc.GlmServiceStub(channel).Chat(story)
            next(first)  # it holds the only slot
            conn = http.client.HTTPConnection("127.0.0.1", gateway.http_port, timeout=600)
            body = {
                "messages": [{"role": "user", "content": "Say hi."}],
                "max_tokens": 3,
                "stream": True,
            }
            conn.request("POST", "/chat", body=json.dumps(body))
            response = conn.getresponse()
            assert response.status == 200
            assert response.getheader("content-type") == "text/event-stream; charset=utf-8"
            # Queued behind the story: only comments arrive, and Envoy passes them on at once.
            received = b""
            beat = b": keep-alive\r\n\r\n"  # framed as the legacy routes' events
            while received.count(beat) < 3:
                chunk = response.read1(65536)
                assert chunk, received  # the stream must not end before
                received += chunk
            assert received == beat * received.count(beat)
            first.cancel()  # the slot frees and the queued request runs
            rest = response.read()
            conn.close()
        events = [e for e in (received + rest).split(b"\r\n\r\n") if e and e != b": keep-alive"]
        assert events[-1] == b"data: [DONE]"
        assert all(e.startswith(b"data: {") for e in events[:-1])
    finally:
        stop_gateway(gateway)

"""HTTP behaviour through the real Envoy: errors, health, CORS, overload, disconnects, gRPC."""

from __future__ import annotations

import http.client
import json
import time
import urllib.request

import grpc
import pytest

from clients import GlmClient, GlmClientError
from tests.e2e.conftest import ALLOWED_ORIGIN, Gateway, http_status, post

LONG_STORY = {
    "messages": [{"role": "user", "content": "Tell me a very long story about a dragon."}],
    "temperature": 0,
    "max_tokens": 600,
    "stream": True,
}


def error_of(status: int, content_type: str, body: bytes) -> dict[str, object]:
    assert content_type.startswith("application/json"), (status, content_type, body)
    payload = json.loads(body)
    # The legacy routes put FastAPI's `detail` beside the error object.
    assert set(payload) in ({"error"}, {"detail", "error"})
    error = payload["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    return dict(error)


@pytest.mark.parametrize(
    ("path", "body", "status", "code", "text"),
    [
        # The legacy routes refuse what does not fit their request models with FastAPI's 422.
        ("/chat", b'{"messages": []}', 422, "invalid_argument", "at least one message"),
        ("/chat", b"{not json", 422, "invalid_argument", "not valid JSON"),
        ("/chat", b"[1, 2]", 422, "invalid_argument", "must be a JSON object"),
        ("/chat", b'{"messages": "hello"}', 422, "invalid_argument", "messages"),
        (
            "/chat",
            b'{"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}',
            422,
            "invalid_argument",
            "temperature",
        ),
        ("/chat", b'{"colour": 1}', 422, "invalid_argument", "messages: Field required"),
        (
            "/chat",
            b'{"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}',
            404,
            "not_found",
            "unknown model 'gpt-9'",
        ),
        ("/embedding", b'{"prompt": []}', 422, "invalid_argument", "at least one text"),
        (
            "/embedding",
            b'{"model": "smollm2-135m-instruct", "prompt": ["x"]}',
            400,
            "failed_precondition",
            "is a chat model",
        ),
        ("/tokenize", b'{"prompt": "x", "max_tokens": 0}', 422, "invalid_argument", "max_tokens"),
        ("/v1/chat/completions", b'{"messages": [], "n": 3}', 400, "invalid_argument", "n=1"),
        ("/no/such/route", b"{}", 404, "not_found", "/no/such/route"),
    ],
)
def test_errors_are_json_with_the_right_status(
    gateway: Gateway, path: str, body: bytes, status: int, code: str, text: str
) -> None:
    got_status, content_type, payload = post(gateway.http + path, body)
    assert got_status == status, payload
    error = error_of(got_status, content_type, payload)
    assert error["code"] == code
    assert text in str(error["message"])


def test_startup_reported_unavailable_then_healthy(gateway: Gateway) -> None:
    assert gateway.startup is not None
    # Before the models were ready, /healthz said 503 and JSON routes said 503 with a JSON error.
    assert 503 in gateway.startup.health
    assert gateway.startup.health[-1] == 200
    answered = [t for t in gateway.startup.tokenize if t[0] != 0]
    statuses = [t[0] for t in answered]
    # /healthz follows the backend's health with up to a second of delay, so the last calls
    # before it turned 200 may already have been served.
    refused = statuses[: statuses.index(200)] if 200 in statuses else statuses
    assert refused, f"no JSON call was refused while the models loaded: {statuses}"
    assert set(refused) == {503}
    assert set(statuses[len(refused) :]) <= {200}
    for status, content_type, body in answered[: len(refused)]:
        assert error_of(status, content_type, body)["code"] == "unavailable"
    assert http_status(gateway.http + "/healthz") == 200


def test_overload_is_429(gateway: Gateway) -> None:
    # The e2e config allows two generations and no waiting line.
    conns = []
    for _ in range(2):
        conn = http.client.HTTPConnection("127.0.0.1", gateway.http_port, timeout=120)
        conn.request("POST", "/chat", body=json.dumps(LONG_STORY))
        response = conn.getresponse()
        assert response.status == 200
        response.read1(4096)  # the first event: both generations are running now
        conns.append(conn)
    try:
        status, content_type, body = post(gateway.http + "/chat", json.dumps(LONG_STORY).encode())
        assert status == 429
        error = error_of(status, content_type, body)
        assert error["code"] == "resource_exhausted"
        assert "max_waiting" in str(error["message"])
    finally:
        for conn in conns:
            conn.close()
        wait_until_chat_is_served(gateway)


def wait_until_chat_is_served(gateway: Gateway) -> None:
    """Wait until a short chat succeeds: the slots of closed streams are free again."""
    short = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}).encode()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if post(gateway.http + "/chat", short)[0] == 200:
            return
        time.sleep(0.1)
    pytest.fail("generation slots were not freed after the clients left")


def test_client_disconnect_stops_generation(gateway: Gateway) -> None:
    marker = "HttpGatewayService/LegacyChat CANCELLED"
    before = gateway.log_text().count(marker)
    conn = http.client.HTTPConnection("127.0.0.1", gateway.http_port, timeout=120)
    conn.request("POST", "/chat", body=json.dumps(LONG_STORY))
    response = conn.getresponse()
    assert response.read1(4096).startswith(b"data: ")
    conn.close()
    # The server logs the call as cancelled once Envoy resets the stream; a 600-token story would
    # otherwise run for most of a minute.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if gateway.log_text().count(marker) > before:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the server did not see the disconnect:\n" + gateway.log_text()[-2000:])
    # And the freed slots serve new requests at once.
    status, _, _ = post(gateway.http + "/tokenize", b'{"prompt": "still here"}')
    assert status == 200


def preflight(gateway: Gateway, origin: str) -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection("127.0.0.1", gateway.http_port, timeout=10)
    conn.request(
        "OPTIONS",
        "/chat",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type",
        },
    )
    response = conn.getresponse()
    response.read()
    return response


def test_cors_allows_only_the_configured_origins(gateway: Gateway) -> None:
    allowed = preflight(gateway, ALLOWED_ORIGIN)
    assert allowed.status == 200
    assert allowed.getheader("access-control-allow-origin") == ALLOWED_ORIGIN
    assert "POST" in (allowed.getheader("access-control-allow-methods") or "")

    refused = preflight(gateway, "https://evil.example.org")
    assert refused.getheader("access-control-allow-origin") is None

    request = urllib.request.Request(gateway.http + "/models", headers={"Origin": ALLOWED_ORIGIN})
    with urllib.request.urlopen(request) as response:
        assert response.headers["access-control-allow-origin"] == ALLOWED_ORIGIN


def test_native_grpc_through_envoy_and_direct(gateway: Gateway) -> None:
    answers = []
    for target in (gateway.grpc_via_envoy, gateway.grpc_direct):
        with GlmClient(target) as client:
            assert client.health() == "SERVING"
            assert [m.id for m in client.list_models().data] == [
                "smollm2-135m-instruct",
                "all-minilm-l6-v2",
            ]
            result = client.chat_text(
                [("user", "What is the capital of France?")], temperature=0.0, max_tokens=12
            )
            answers.append(result.text)
    assert answers[0] == answers[1]
    assert "Paris" in answers[0]


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "content_type"),
    [
        ("POST", "/tokenize", b'{"prompt": "hi"}', 200, "application/json"),
        ("POST", "/embedding", b'{"prompt": ["hi"]}', 200, "application/json"),
        ("GET", "/models", None, 200, "application/json"),
        ("POST", "/v1/embeddings", b'{"input": "hi"}', 200, "application/json"),
        ("GET", "/v1/models", None, 200, "application/json"),
        ("POST", "/tokenize", b'{"prompt": 5}', 422, "application/json"),
        ("POST", "/tokenize", b'{"prompt": "hi", "model": "gpt-9"}', 404, "application/json"),
        (
            "POST",
            "/chat",
            b'{"stream": true, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}',
            200,
            "text/event-stream; charset=utf-8",
        ),
        (
            "POST",
            "/chat",
            b'{"stream": false, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}',
            200,
            "application/json",
        ),
        (
            "POST",
            "/chat",
            b'{"messages": [{"role": "robot", "content": "hi"}]}',
            422,
            "application/json",
        ),
    ],
)
def test_json_replies_carry_no_grpc_headers(
    gateway: Gateway,
    method: str,
    path: str,
    body: bytes | None,
    status: int,
    content_type: str,
) -> None:
    # A unary 200 reply leaves the server without the status header (Envoy's Lua filter
    # recognizes it by its OK gRPC status instead): JSON clients see the same headers either way.
    conn = http.client.HTTPConnection("127.0.0.1", gateway.http_port, timeout=60)
    try:
        conn.request(method, path, body=body, headers={"content-type": "application/json"})
        response = conn.getresponse()
        response.read()
    finally:
        conn.close()
    assert response.status == status
    names = {name.lower() for name, _ in response.getheaders()}
    assert not {n for n in names if n.startswith(("grpc-", "x-glm-"))}, response.getheaders()
    assert response.getheader("content-type") == content_type


def test_native_grpc_errors_through_envoy_keep_their_status(gateway: Gateway) -> None:
    # The Lua filter leaves gRPC replies alone, errors included.
    with GlmClient(gateway.grpc_via_envoy) as client, pytest.raises(GlmClientError) as raised:
        client.tokenize("hi", model="gpt-9")
    assert raised.value.code is grpc.StatusCode.NOT_FOUND
    assert "gpt-9" in str(raised.value)

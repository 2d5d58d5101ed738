"""API keys, per-key limits and TLS on a real in-process server (real models, real ports).

Calls go over real gRPC connections: typed RPCs, and the JSON routes' own RPCs
(glm.v1.HttpGatewayService), which is what Envoy calls for JSON clients. tests/e2e/
test_security.py runs the same rules through the real Envoy.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import ssl
import time
import urllib.request
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.api.httpbody_pb2 import HttpBody
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from clients import AsyncGlmClient, GlmClientError, tls_credentials
from clients.__main__ import main as cli_main
from glm.v1 import glm_service_pb2 as pb
from glm.v1 import glm_service_pb2_grpc as pb_grpc
from glm.v1 import http_gateway_pb2_grpc as gw_grpc
from server.app import GlmApp
from server.auth.keys import append_key
from server.auth.tls import first_certificate
from server.config import ModelSpec
from server.domain import ModelKind
from server.transport.grpc_server import Health, build_server
from server.transport.security import SecurityConfigError
from tests.certs import Certs, make_certs
from tests.conftest import default_specs, free_port, make_settings, serving

pytestmark = pytest.mark.slow

CHAT_MODEL = "smollm2-135m-instruct"
EMBED_MODEL = "all-minilm-l6-v2"
# The rate limits count over this window instead of a minute, so that a test sees them refill.
WINDOW_S = 2.0
Metadata = tuple[tuple[str, str], ...]


@dataclass
class Keys:
    """The keys of the test's keys file, by name."""

    path: Path
    full: str
    embed_only: str
    limited: str
    tokens: str

    def bearer(self, key: str) -> Metadata:
        return (("authorization", f"Bearer {key}"),)


def write_keys(folder: Path) -> Keys:
    path = folder / "api-keys.toml"
    return Keys(
        path=path,
        full=append_key(path, "full"),
        embed_only=append_key(path, "embed-only", models=[EMBED_MODEL]),
        limited=append_key(path, "limited", requests_per_minute=2),
        tokens=append_key(path, "tokens", tokens_per_minute=20),
    )


def embed_only_specs() -> tuple[ModelSpec, ...]:
    """The embedding model alone: enough for the TLS tests, and quick to load."""
    return tuple(s for s in default_specs() if s.kind is ModelKind.EMBEDDING)


def serving_unwarmed(
    specs: tuple[ModelSpec, ...], **settings: object
) -> contextlib.AbstractAsyncContextManager[GlmApp]:
    return serving(make_settings(warmup=False, **settings), specs)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return write_keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
async def app(keys: Keys) -> AsyncIterator[GlmApp]:
    """A server with both default models that requires API keys."""
    async with serving_unwarmed(
        default_specs(),
        api_keys_file=str(keys.path),
        rate_limit_window_s=WINDOW_S,
        metrics_port=free_port(),
    ) as app:
        yield app


@pytest.fixture(scope="module")
def served_app(app: GlmApp) -> GlmApp:
    """The server tests/conftest.py's `channel` and `stub` call here."""
    return app


@pytest.fixture(scope="module")
def gateway(channel: grpc.aio.Channel) -> gw_grpc.HttpGatewayServiceStub:
    return gw_grpc.HttpGatewayServiceStub(channel)


def chat_request(model: str = "") -> pb.ChatRequest:
    return pb.ChatRequest(
        model=model,
        messages=[pb.ChatMessage(role="user", content="Say hi.")],
        max_tokens=3,
        temperature=0,
    )


async def call_each_rpc(stub: pb_grpc.GlmServiceStub, metadata: Metadata) -> dict[str, Any]:
    """Each typed RPC once: its status code name, or "OK"."""
    calls: dict[str, Callable[[], Any]] = {
        "Chat": lambda: _drain(stub.Chat(chat_request(), metadata=metadata)),
        "Embed": lambda: stub.Embed(pb.EmbedRequest(prompt=["a"]), metadata=metadata),
        "Tokenize": lambda: stub.Tokenize(pb.TokenizeRequest(prompt="a"), metadata=metadata),
        "ListModels": lambda: stub.ListModels(pb.ListModelsRequest(), metadata=metadata),
    }
    results: dict[str, Any] = {}
    for name, call in calls.items():
        try:
            await call()
            results[name] = "OK"
        except grpc.aio.AioRpcError as exc:
            results[name] = exc.code().name
    return results


async def _drain(call: Any) -> list[Any]:
    return [response async for response in call]


async def json_call(
    gateway: gw_grpc.HttpGatewayServiceStub, route: str, body: dict[str, Any], metadata: Metadata
) -> tuple[int, dict[str, str], dict[str, Any]]:
    """A JSON route's RPC, as Envoy calls it: HTTP status, response headers, JSON body."""
    request = HttpBody(content_type="application/json", data=json.dumps(body).encode())
    method = getattr(gateway, route)
    call = method(request, metadata=metadata)
    if route in ("LegacyChat", "OpenAiChatCompletions"):
        data = b"".join([reply.data async for reply in call])
    else:
        data = (await call).data
    headers = {k: v for k, v in (await call.initial_metadata() or ())}
    status = int(headers.pop("x-glm-http-status", "200"))
    text = data.decode()
    payload = json.loads(text) if text.startswith("{") else {"sse": text}
    return status, headers, payload


# -- keys ---------------------------------------------------------------------------------------


async def test_every_rpc_needs_a_known_key(stub: pb_grpc.GlmServiceStub, keys: Keys) -> None:
    every = {"Chat", "Embed", "Tokenize", "ListModels"}
    assert await call_each_rpc(stub, ()) == dict.fromkeys(every, "UNAUTHENTICATED")
    wrong = (("authorization", "Bearer glm-not-a-key"),)
    assert await call_each_rpc(stub, wrong) == dict.fromkeys(every, "UNAUTHENTICATED")
    basic = (("authorization", f"Basic {keys.full}"),)
    assert await call_each_rpc(stub, basic) == dict.fromkeys(every, "UNAUTHENTICATED")
    assert await call_each_rpc(stub, keys.bearer(keys.full)) == dict.fromkeys(every, "OK")
    assert await call_each_rpc(stub, (("x-api-key", keys.full),)) == dict.fromkeys(every, "OK")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.Tokenize(pb.TokenizeRequest(prompt="a"))
    assert "authorization: Bearer KEY" in (refused.value.details() or "")


async def test_the_json_routes_answer_401_with_openais_error(
    gateway: gw_grpc.HttpGatewayServiceStub, keys: Keys
) -> None:
    routes = {
        "LegacyTokenize": {"prompt": "hi"},
        "LegacyEmbedding": {"prompt": ["hi"]},
        "LegacyListModels": {},
        "LegacyChat": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        "OpenAiChatCompletions": {"messages": [{"role": "user", "content": "hi"}]},
        "OpenAiEmbeddings": {"input": "hi"},
        "OpenAiListModels": {},
    }
    for route, body in routes.items():
        for metadata in ((), (("x-api-key", "glm-wrong"),)):
            status, headers, payload = await json_call(gateway, route, body, metadata)
            assert status == 401, route
            assert headers["www-authenticate"].startswith("Bearer")
            assert payload["error"]["code"] == "invalid_api_key"
            assert payload["error"]["type"] == "invalid_request_error"
    status, _, payload = await json_call(
        gateway, "LegacyTokenize", {"prompt": "hi"}, keys.bearer(keys.full)
    )
    assert status == 200
    assert payload["tokens"]


async def test_health_and_reflection_stay_open(channel: grpc.aio.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    reply = await health.Check(health_pb2.HealthCheckRequest(service="glm.v1.GlmService"))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    [response] = [r async for r in reflection.ServerReflectionInfo(iter([request]))]
    assert "glm.v1.GlmService" in {s.name for s in response.list_services_response.service}


async def test_reflection_can_be_turned_off() -> None:
    server = build_server(
        pb_grpc.GlmServiceServicer(), Health(), max_message_bytes=1 << 20, reflection=False
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            reflection = reflection_pb2_grpc.ServerReflectionStub(ch)
            request = reflection_pb2.ServerReflectionRequest(list_services="")
            with pytest.raises(grpc.aio.AioRpcError) as err:
                _ = [r async for r in reflection.ServerReflectionInfo(iter([request]))]
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        await server.stop(None)


async def test_a_model_outside_the_keys_list_is_permission_denied(
    stub: pb_grpc.GlmServiceStub, gateway: gw_grpc.HttpGatewayServiceStub, keys: Keys
) -> None:
    metadata = keys.bearer(keys.embed_only)
    for call in (
        lambda: _drain(stub.Chat(chat_request(), metadata=metadata)),
        lambda: _drain(stub.Chat(chat_request(CHAT_MODEL), metadata=metadata)),
        lambda: stub.Tokenize(pb.TokenizeRequest(prompt="a"), metadata=metadata),  # default
    ):
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await call()
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert f"may not use model '{CHAT_MODEL}'" in (denied.value.details() or "")
    embedded = await stub.Embed(pb.EmbedRequest(prompt=["a"]), metadata=metadata)
    assert embedded.model == EMBED_MODEL
    tokens = await stub.Tokenize(
        pb.TokenizeRequest(prompt="a", model=EMBED_MODEL), metadata=metadata
    )
    assert tokens.model == EMBED_MODEL
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for route in ("LegacyChat", "OpenAiChatCompletions"):
        status, _, payload = await json_call(gateway, route, chat, metadata)
        assert status == 403, route
        assert payload["error"]["code"] == "permission_denied"
    status, _, payload = await json_call(gateway, "OpenAiEmbeddings", {"input": "a"}, metadata)
    assert status == 200
    assert payload["data"]


async def retry_after(error: grpc.aio.AioRpcError) -> float:
    trailers = dict(error.trailing_metadata() or ())
    return float(trailers["retry-after"])


async def test_a_request_limit_refuses_then_serves_again_after_the_window(
    stub: pb_grpc.GlmServiceStub, gateway: gw_grpc.HttpGatewayServiceStub, keys: Keys
) -> None:
    metadata = keys.bearer(keys.limited)  # 2 requests per window
    # Calls sent together reach the limiter within milliseconds, far less than the half window
    # a request takes to refill, however slow the machine is at serving them.
    await asyncio.sleep(WINDOW_S)  # a full bucket whatever ran before
    results = await asyncio.gather(
        *(stub.Tokenize(pb.TokenizeRequest(prompt="a"), metadata=metadata) for _ in range(3)),
        return_exceptions=True,
    )
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(refused) == 1, results
    limited = refused[0]
    assert limited.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "'limited' is over its limit of 2 requests" in (limited.details() or "")
    wait = await retry_after(limited)
    assert 1 <= wait <= WINDOW_S
    # Another key is not affected.
    await stub.Tokenize(pb.TokenizeRequest(prompt="a"), metadata=keys.bearer(keys.full))
    await asyncio.sleep(wait)
    await stub.Tokenize(pb.TokenizeRequest(prompt="a"), metadata=metadata)

    # The JSON routes, unary and streamed: x-ratelimit-* on every reply, 429 and retry-after
    # on the refused ones.
    await asyncio.sleep(WINDOW_S)
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": True}
    replies = await asyncio.gather(
        *(json_call(gateway, "LegacyTokenize", {"prompt": "a"}, metadata) for _ in range(2)),
        json_call(gateway, "OpenAiChatCompletions", chat, metadata),
        json_call(gateway, "LegacyTokenize", {"prompt": "a"}, metadata),
    )
    assert sorted(status for status, _, _ in replies) == [200, 200, 429, 429]
    for status, headers, payload in replies:
        assert headers["x-ratelimit-limit-requests"] == "2"
        assert headers["x-ratelimit-remaining-requests"] in ("0", "1")
        assert headers["x-ratelimit-reset-requests"].endswith("s")
        if status == 429:
            assert int(headers["retry-after"]) >= 1
            assert payload["error"]["code"] == "rate_limit_exceeded"
            assert payload["error"]["type"] == "rate_limit_error"
        else:
            assert "retry-after" not in headers
            assert "tokens" in payload or "[DONE]" in payload["sse"]
    await asyncio.sleep(max(int(h["retry-after"]) for s, h, _ in replies if s == 429))
    status, _, _ = await json_call(gateway, "LegacyTokenize", {"prompt": "a"}, metadata)
    assert status == 200


async def test_a_token_limit_counts_what_calls_used(
    stub: pb_grpc.GlmServiceStub, gateway: gw_grpc.HttpGatewayServiceStub, keys: Keys
) -> None:
    metadata = keys.bearer(keys.tokens)  # 20 tokens per window
    # About 60 tokens: 40 tokens of debt, refused for two windows.
    long_text = " ".join(["word"] * 60)
    reply = await stub.Embed(pb.EmbedRequest(prompt=[long_text]), metadata=metadata)
    assert reply.usage.prompt_tokens > 20  # admitted with tokens left, then overdrawn
    with pytest.raises(grpc.aio.AioRpcError) as limited:
        await stub.Embed(pb.EmbedRequest(prompt=["a"]), metadata=metadata)
    assert limited.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "20 tokens per" in (limited.value.details() or "")
    status, headers, _ = await json_call(gateway, "LegacyEmbedding", {"prompt": ["a"]}, metadata)
    assert status == 429
    assert headers["x-ratelimit-limit-tokens"] == "20"
    assert headers["x-ratelimit-remaining-tokens"] == "0"
    await asyncio.sleep(await retry_after(limited.value))
    await stub.Embed(pb.EmbedRequest(prompt=["a"]), metadata=metadata)


async def eventually(check: Callable[[], Any], within_s: float = 10.0) -> None:
    """Await `check()` until it stops raising AssertionError."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            await check()
            return
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


async def test_the_keys_file_is_reread_while_the_server_runs(
    stub: pb_grpc.GlmServiceStub, keys: Keys, caplog: pytest.LogCaptureFixture
) -> None:
    original = keys.path.read_text()

    async def status_of(key: str) -> str:
        return (await call_each_rpc(stub, keys.bearer(key)))["Tokenize"]

    try:
        new = append_key(keys.path, "added-later")

        async def new_key_works() -> None:
            assert await status_of(new) == "OK"

        await eventually(new_key_works)
        # Removing a key locks it out.
        keys.path.write_text(original)

        async def new_key_refused() -> None:
            assert await status_of(new) == "UNAUTHENTICATED"

        await eventually(new_key_refused)
        # A broken edit is logged and ignored: the keys in force stay.
        with caplog.at_level(logging.ERROR, logger="server.auth.keys"):
            keys.path.write_text(original + "\n[[keys]\nbroken")

            async def error_logged() -> None:
                await status_of(keys.full)
                assert "keeping the 4 keys in force" in caplog.text

            await eventually(error_logged)
        assert await status_of(keys.full) == "OK"
    finally:
        keys.path.write_text(original)


async def test_keys_never_reach_the_logs_or_metrics_but_names_do(
    app: GlmApp, stub: pb_grpc.GlmServiceStub, keys: Keys, caplog: pytest.LogCaptureFixture
) -> None:
    wrong = "glm-wrong-key-that-must-not-be-logged"
    with caplog.at_level(logging.DEBUG):
        await call_each_rpc(stub, keys.bearer(keys.full))
        await call_each_rpc(stub, (("x-api-key", keys.full),))
        await call_each_rpc(stub, keys.bearer(wrong))
    lines = [r.getMessage() for r in caplog.records if r.name == "server.requests"]
    assert any("key=full" in line for line in lines)
    assert any("UNAUTHENTICATED" in line for line in lines)
    keyed = [r for r in caplog.records if getattr(r, "key", None) == "full"]
    assert keyed, "the JSON log fields carry the key's name"
    every_record = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records) + caplog.text
    for secret in (*dataclass_keys(keys), wrong):
        assert secret not in every_record

    def scrape() -> str:
        url = f"http://127.0.0.1:{app.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            return str(response.read().decode())

    metrics = await asyncio.to_thread(scrape)
    assert 'glm_api_key_requests_total{key="full",status="OK"}' in metrics
    assert 'glm_api_key_tokens_total{key="full"}' in metrics
    for secret in (*dataclass_keys(keys), wrong):
        assert secret not in metrics


def dataclass_keys(keys: Keys) -> tuple[str, ...]:
    return (keys.full, keys.embed_only, keys.limited, keys.tokens)


async def test_the_python_client_and_cli_send_the_key(
    app: GlmApp, keys: Keys, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    target = f"127.0.0.1:{app.port}"
    async with AsyncGlmClient(target, api_key=keys.full) as client:
        assert (await client.tokenize("hello")).token_ids
    async with AsyncGlmClient(target, api_key="") as client:
        with pytest.raises(GlmClientError) as refused:
            await client.tokenize("hello")
        assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED
    monkeypatch.setenv("GLM_API_KEY", keys.full)
    async with AsyncGlmClient(target) as client:
        assert (await client.list_models()).data
    code = await asyncio.to_thread(cli_main, ["--target", target, "tokenize", "hi"])
    assert code == 0
    monkeypatch.delenv("GLM_API_KEY")
    capsys.readouterr()
    assert await asyncio.to_thread(cli_main, ["--target", target, "tokenize", "hi"]) == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    argv = ["--target", target, "--api-key", keys.full, "tokenize", "hi"]
    assert await asyncio.to_thread(cli_main, argv) == 0


async def test_a_bad_keys_file_stops_the_start(tmp_path: Path) -> None:
    bad = tmp_path / "keys.toml"
    bad.write_text('[[keys]]\nname = "x"\n')
    for path in (bad, tmp_path / "missing.toml"):
        app = GlmApp(make_settings(api_keys_file=str(path)), specs=embed_only_specs())
        with pytest.raises(SecurityConfigError, match="keys"):
            await app.start()
    public = GlmApp(make_settings(grpc_address="0.0.0.0:0"), specs=embed_only_specs())
    with pytest.raises(SecurityConfigError, match="protected mode"):
        await public.start()


# -- TLS ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


@dataclass
class TlsServer:
    """A running TLS server and its certificates."""

    certs: Certs
    port: int


@pytest.fixture(scope="module")
async def tls_app(tmp_path_factory: pytest.TempPathFactory, keys: Keys) -> AsyncIterator[TlsServer]:
    """A TLS server with API keys, with certificates of its own (the rotation test replaces
    them)."""
    own = make_certs(tmp_path_factory.mktemp("tls-certs"))
    async with serving_unwarmed(
        embed_only_specs(),
        api_keys_file=str(keys.path),
        tls_cert_file=str(own.server_cert),
        tls_key_file=str(own.server_key),
    ) as app:
        yield TlsServer(own, app.port)


@pytest.fixture(scope="module")
async def mtls_app(certs: Certs, keys: Keys) -> AsyncIterator[GlmApp]:
    async with serving_unwarmed(
        embed_only_specs(),
        api_keys_file=str(keys.path),
        tls_cert_file=str(certs.server_cert),
        tls_key_file=str(certs.server_key),
        tls_client_ca_file=str(certs.client_ca),
    ) as app:
        yield app


async def tokenize_over(
    port: int, credentials: grpc.ChannelCredentials | None, metadata: Metadata = ()
) -> str:
    """One Tokenize call: "OK" or the status code's name."""
    target = f"localhost:{port}"
    channel = (
        grpc.aio.insecure_channel(target)
        if credentials is None
        else grpc.aio.secure_channel(target, credentials)
    )
    async with channel:
        try:
            await pb_grpc.GlmServiceStub(channel).Tokenize(
                pb.TokenizeRequest(prompt="a"), metadata=metadata, timeout=10
            )
        except grpc.aio.AioRpcError as exc:
            return exc.code().name
    return "OK"


async def test_grpc_over_tls_with_call_credentials(tls_app: TlsServer, keys: Keys) -> None:
    port, certs = tls_app.port, tls_app.certs
    ca = certs.ca.read_bytes()
    with_key = grpc.composite_channel_credentials(
        grpc.ssl_channel_credentials(ca), grpc.access_token_call_credentials(keys.full)
    )
    assert await tokenize_over(port, with_key) == "OK"
    assert await tokenize_over(port, grpc.ssl_channel_credentials(ca)) == "UNAUTHENTICATED"
    # Plaintext to a TLS port, and TLS that does not trust the server's CA, never get through.
    assert await tokenize_over(port, None, keys.bearer(keys.full)) == "UNAVAILABLE"
    other_ca = grpc.ssl_channel_credentials(certs.client_ca.read_bytes())
    assert await tokenize_over(port, other_ca, keys.bearer(keys.full)) == "UNAVAILABLE"
    # The clients' own options.
    async with AsyncGlmClient(
        f"localhost:{port}", api_key=keys.full, credentials=tls_credentials(certs.ca)
    ) as client:
        assert (await client.tokenize("hi")).token_ids
    argv = ["--target", f"localhost:{port}", "--api-key", keys.full, "--ca-file", str(certs.ca)]
    assert await asyncio.to_thread(cli_main, [*argv, "tokenize", "hi"]) == 0


async def test_mtls_refuses_clients_without_a_trusted_certificate(
    mtls_app: GlmApp, certs: Certs, keys: Keys
) -> None:
    ca, metadata = certs.ca.read_bytes(), keys.bearer(keys.full)

    def creds(cert: Path | None, key: Path | None) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            ca,
            None if key is None else key.read_bytes(),
            None if cert is None else cert.read_bytes(),
        )

    port = mtls_app.port
    assert await tokenize_over(port, creds(None, None), metadata) == "UNAVAILABLE"
    stranger = creds(certs.stranger_cert, certs.stranger_key)
    assert await tokenize_over(port, stranger, metadata) == "UNAVAILABLE"
    assert await tokenize_over(port, creds(certs.client_cert, certs.client_key), metadata) == "OK"
    # The server's own certificate is accepted too (Envoy's hop presents it).
    assert await tokenize_over(port, creds(certs.server_cert, certs.server_key), metadata) == "OK"
    # A client certificate does not replace the API key.
    assert await tokenize_over(port, creds(certs.client_cert, certs.client_key)) == (
        "UNAUTHENTICATED"
    )
    argv = [
        "--target",
        f"localhost:{port}",
        "--ca-file",
        str(certs.ca),
        "--cert-file",
        str(certs.client_cert),
        "--key-file",
        str(certs.client_key),
        "--api-key",
        keys.full,
        "tokenize",
        "hi",
    ]
    assert await asyncio.to_thread(cli_main, argv) == 0


def served_certificate(port: int, ca: Path) -> bytes:
    """The certificate a new TLS connection to the port is shown (PEM)."""
    context = ssl.create_default_context(cafile=str(ca))
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return ssl.DER_cert_to_PEM_cert(der).encode()


def same_pem(a: bytes, b: bytes) -> bool:
    return a.split() == b.split()


async def test_new_connections_get_a_replaced_certificate(tls_app: TlsServer, keys: Keys) -> None:
    port, certs = tls_app.port, tls_app.certs
    before = await asyncio.to_thread(served_certificate, port, certs.ca)
    assert same_pem(before, first_certificate(certs.server_cert.read_bytes()))
    new = certs.rotate_server_cert()

    async def rotated() -> None:
        assert same_pem(await asyncio.to_thread(served_certificate, port, certs.ca), new)

    await eventually(rotated)
    ca = certs.ca.read_bytes()
    with_key = grpc.composite_channel_credentials(
        grpc.ssl_channel_credentials(ca), grpc.access_token_call_credentials(keys.full)
    )
    assert await tokenize_over(port, with_key) == "OK"


async def test_bad_tls_files_stop_the_start(certs: Certs, tmp_path: Path) -> None:
    cases = [
        (certs.server_cert, certs.client_key, None, "cannot load the certificate"),
        (tmp_path / "missing.pem", certs.server_key, None, "cannot load the certificate"),
        (certs.server_cert, certs.server_key, tmp_path / "missing-ca.pem", "missing-ca.pem"),
    ]
    for cert, key, client_ca, message in cases:
        app = GlmApp(
            make_settings(
                tls_cert_file=str(cert),
                tls_key_file=str(key),
                tls_client_ca_file="" if client_ca is None else str(client_ca),
            ),
            specs=embed_only_specs(),
        )
        with pytest.raises(SecurityConfigError, match=message):
            await app.start()

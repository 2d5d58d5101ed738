"""API keys, limits, TLS and mTLS through the real Envoy and on the real server port.

One `python -m gateway` (server + Envoy processes) with an API keys file, a certificate for
localhost and a client CA (mTLS), certificates made by trustme. HTTP clients are the official
`openai` SDK and plain `http.client`; gRPC clients are grpcio's.
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import openai
import pytest

from glm.v1 import glm_service_pb2 as pb
from glm.v1 import glm_service_pb2_grpc as pb_grpc
from server.auth.keys import append_key
from tests.certs import Certs, make_certs
from tests.e2e.conftest import Gateway, exchange, start_gateway, stop_gateway

pytestmark = pytest.mark.slow

CHAT_MODEL = "smollm2-135m-instruct"
EMBED_MODEL = "all-minilm-l6-v2"
# Rate limits count over this window, not a minute (refill: one request per window / limit).
WINDOW_S = 4.0
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@dataclass
class Secure:
    """The secured gateway, its certificates and its keys."""

    gateway: Gateway
    certs: Certs
    keys_file: Path
    full: str
    embed_only: str
    limited: str

    @property
    def port(self) -> int:
        return self.gateway.http_port

    @property
    def base_url(self) -> str:
        return f"https://localhost:{self.port}"

    def context(self, client_cert: bool = True, stranger: bool = False) -> ssl.SSLContext:
        """A client TLS context that trusts the server's CA, with a client certificate."""
        context = ssl.create_default_context(cafile=str(self.certs.ca))
        if stranger:
            context.load_cert_chain(self.certs.stranger_cert, self.certs.stranger_key)
        elif client_cert:
            context.load_cert_chain(self.certs.client_cert, self.certs.client_key)
        return context

    def grpc_credentials(
        self, client_cert: bool = True, key: str | None = None
    ) -> grpc.ChannelCredentials:
        certs = self.certs
        tls = grpc.ssl_channel_credentials(
            certs.ca.read_bytes(),
            certs.client_key.read_bytes() if client_cert else None,
            certs.client_cert.read_bytes() if client_cert else None,
        )
        if key is None:
            return tls
        return grpc.composite_channel_credentials(tls, grpc.access_token_call_credentials(key))

    def openai(self, api_key: str | None) -> openai.OpenAI:
        """The SDK over HTTPS with a client certificate; api_key None sends no key at all (the
        SDK insists on one, so its Authorization header is dropped on the way out)."""
        hooks: dict[str, list[Callable[[Any], None]]] = {}
        if api_key is None:
            hooks["request"] = [lambda request: request.headers.pop("authorization", None)]
        http_client = openai.DefaultHttpxClient(verify=self.context(), event_hooks=hooks)
        return openai.OpenAI(
            base_url=self.base_url + "/v1",
            api_key=api_key or "unused",
            max_retries=0,
            http_client=http_client,
        )

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        context: ssl.SSLContext | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        """One HTTPS request over HTTP/1.1 through Envoy."""
        conn = http.client.HTTPSConnection(
            "localhost", self.port, context=context or self.context(), timeout=120
        )
        return exchange(conn, method, path, body, headers)


def wait_secure_healthy(secure: Secure, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if secure.request("GET", "/healthz")[0] == 200:
                return
        except OSError:
            pass
        if secure.gateway.proc.poll() is not None:
            break
        time.sleep(0.2)
    raise RuntimeError(f"secure gateway not healthy:\n{secure.gateway.log_text()[-3000:]}")


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secure]:
    folder = tmp_path_factory.mktemp("secure")
    certs = make_certs(folder / "certs")
    keys_file = folder / "api-keys.toml"
    full = append_key(keys_file, "full")
    embed_only = append_key(keys_file, "embed-only", models=[EMBED_MODEL])
    limited = append_key(keys_file, "limited", requests_per_minute=2)
    gateway = start_gateway(
        folder,
        "--api-keys-file",
        str(keys_file),
        "--rate-limit-window-s",
        str(WINDOW_S),
        "--tls-cert-file",
        str(certs.server_cert),
        "--tls-key-file",
        str(certs.server_key),
        "--tls-client-ca-file",
        str(certs.client_ca),
        "--log-level",
        "DEBUG",
    )
    secure = Secure(gateway, certs, keys_file, full, embed_only, limited)
    try:
        wait_secure_healthy(secure)
        yield secure
    finally:
        stop_gateway(gateway)


# -- the openai SDK -----------------------------------------------------------------------------


def test_openai_sdk_with_a_good_key(secure: Secure) -> None:
    with secure.openai(secure.full) as client:
        stream = client.chat.completions.create(
            model=CHAT_MODEL, messages=QUESTION, temperature=0, max_tokens=8, stream=True
        )
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert text
        embeddings = client.embeddings.create(model=EMBED_MODEL, input=["hello", "world"])
        assert len(embeddings.data) == 2
        # The e2e models also answer to the legacy ids, which the list names too.
        assert {CHAT_MODEL, EMBED_MODEL} <= {m.id for m in client.models.list()}


@pytest.mark.parametrize("api_key", ["glm-wrong", None])
def test_openai_sdk_with_a_wrong_or_missing_key(secure: Secure, api_key: str | None) -> None:
    calls: list[Callable[[openai.OpenAI], Any]] = [
        lambda c: list(c.chat.completions.create(model=CHAT_MODEL, messages=QUESTION, stream=True)),
        lambda c: c.embeddings.create(model=EMBED_MODEL, input="hello"),
        lambda c: c.models.list(),
    ]
    with secure.openai(api_key) as client:
        for call in calls:
            with pytest.raises(openai.AuthenticationError) as refused:
                call(client)
            assert refused.value.status_code == 401
            assert refused.value.code == "invalid_api_key"


def test_no_authorization_header_at_all_is_401(secure: Secure) -> None:
    status, headers, body = secure.request("GET", "/v1/models")
    assert status == 401
    assert headers["content-type"] == "application/json"
    assert headers["www-authenticate"].startswith("Bearer")
    assert json.loads(body)["error"]["code"] == "invalid_api_key"
    # The legacy routes too, and x-api-key works as well as a bearer token.
    status, _, _ = secure.request("POST", "/tokenize", b'{"prompt": "hi"}')
    assert status == 401
    status, _, body = secure.request(
        "POST", "/tokenize", b'{"prompt": "hi"}', {"x-api-key": secure.full}
    )
    assert status == 200
    assert json.loads(body)["tokens"]


def test_a_model_outside_the_keys_list_is_403(secure: Secure) -> None:
    with secure.openai(secure.embed_only) as client:
        with pytest.raises(openai.PermissionDeniedError) as denied:
            client.chat.completions.create(model=CHAT_MODEL, messages=QUESTION, max_tokens=2)
        assert denied.value.status_code == 403
        assert f"may not use model '{CHAT_MODEL}'" in str(denied.value)
        assert client.embeddings.create(model=EMBED_MODEL, input="hello").data


def test_a_rate_limit_is_429_with_retry_after_then_served_again(secure: Secure) -> None:
    time.sleep(WINDOW_S)  # a full bucket

    def list_models(_: int) -> tuple[int, dict[str, str]]:
        status, headers, _ = secure.request(
            "GET", "/v1/models", headers={"authorization": f"Bearer {secure.limited}"}
        )
        return status, headers

    # Sent together, so that they reach the limiter within one refill (2 s).
    with ThreadPoolExecutor(3) as pool:
        replies = list(pool.map(list_models, range(3)))
    assert sorted(status for status, _ in replies) == [200, 200, 429]
    for _status, headers in replies:
        assert headers["x-ratelimit-limit-requests"] == "2"
        assert headers["x-ratelimit-remaining-requests"] in ("0", "1")
        assert "x-ratelimit-reset-requests" in headers
    [refused] = [headers for status, headers in replies if status == 429]
    retry_after = int(refused["retry-after"])
    assert 1 <= retry_after <= WINDOW_S
    with secure.openai(secure.limited) as client:
        with pytest.raises(openai.RateLimitError) as limited:
            client.models.list()
        assert limited.value.status_code == 429
        assert limited.value.response.headers["retry-after"]
        time.sleep(int(limited.value.response.headers["retry-after"]))
        assert client.models.list().data


def test_the_keys_file_is_reread_while_running(secure: Secure) -> None:
    original = secure.keys_file.read_text()
    new = append_key(secure.keys_file, "added-later")
    try:

        def status_with(key: str) -> int:
            return secure.request("GET", "/v1/models", headers={"x-api-key": key})[0]

        deadline = time.monotonic() + 10
        while status_with(new) != 200:
            assert time.monotonic() < deadline, "the new key was never accepted"
            time.sleep(0.2)
        secure.keys_file.write_text(original)
        deadline = time.monotonic() + 10
        while status_with(new) != 401:
            assert time.monotonic() < deadline, "the removed key was never refused"
            time.sleep(0.2)
    finally:
        secure.keys_file.write_text(original)


# -- TLS and mTLS ---------------------------------------------------------------------------------


def test_https_and_grpc_over_tls_through_envoy_with_client_certificates(secure: Secure) -> None:
    status, _, body = secure.request(
        "POST", "/tokenize", b'{"prompt": "hi"}', {"authorization": f"Bearer {secure.full}"}
    )
    assert status == 200
    assert json.loads(body)["tokenIds"]
    # HTTP/2 is negotiated by ALPN for gRPC.
    with socket.create_connection(("127.0.0.1", secure.port), timeout=10) as raw:
        context = secure.context()
        context.set_alpn_protocols(["h2", "http/1.1"])
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            assert tls.selected_alpn_protocol() == "h2"
    for target in (f"localhost:{secure.port}", secure.gateway.grpc_direct):
        creds = secure.grpc_credentials(key=secure.full)
        with grpc.secure_channel(target.replace("127.0.0.1", "localhost"), creds) as channel:
            reply = pb_grpc.GlmServiceStub(channel).Tokenize(
                pb.TokenizeRequest(prompt="hi"), timeout=60
            )
            assert reply.token_ids, target


def test_mtls_refuses_clients_without_a_trusted_certificate(secure: Secure) -> None:
    for context in (secure.context(client_cert=False), secure.context(stranger=True)):
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            secure.request("GET", "/healthz", context=context)
    for target in (f"localhost:{secure.port}", secure.gateway.grpc_direct):
        creds = secure.grpc_credentials(client_cert=False, key=secure.full)
        with grpc.secure_channel(target.replace("127.0.0.1", "localhost"), creds) as channel:
            with pytest.raises(grpc.RpcError) as refused:
                pb_grpc.GlmServiceStub(channel).Tokenize(
                    pb.TokenizeRequest(prompt="hi"), timeout=10
                )
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, target  # type: ignore[attr-defined]
    # Plaintext is not served at all.
    with pytest.raises((http.client.HTTPException, ConnectionError, OSError)):
        plaintext_get(secure.port, "/healthz")


def plaintext_get(port: int, path: str) -> bytes:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        return conn.getresponse().read()
    finally:
        conn.close()


def test_hosts_outside_the_allow_list_get_421(secure: Secure) -> None:
    headers = {"authorization": f"Bearer {secure.full}", "host": "evil.example"}
    status, response_headers, body = secure.request("GET", "/v1/models", headers=headers)
    assert status == 421
    assert response_headers["content-type"] == "application/json"
    assert json.loads(body)["error"]["code"] == "host_not_allowed"
    headers["host"] = f"localhost:{secure.port}"
    assert secure.request("GET", "/v1/models", headers=headers)[0] == 200
    headers["host"] = "127.0.0.1"
    assert secure.request("GET", "/v1/models", headers=headers)[0] == 200


def test_too_many_headers_are_refused(secure: Secure) -> None:
    headers = {f"x-extra-{i}": "1" for i in range(120)}
    status, _, _ = secure.request("GET", "/v1/models", headers=headers)
    assert status == 431


def served_certificate(port: int, secure: Secure) -> bytes:
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        secure.context().wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return ssl.DER_cert_to_PEM_cert(der).encode()


def test_replaced_certificates_are_served_without_a_restart(secure: Secure) -> None:
    new = secure.certs.rotate_server_cert()
    direct_port = int(secure.gateway.grpc_direct.rsplit(":", 1)[1])
    deadline = time.monotonic() + 30
    for port in (secure.port, direct_port):
        while served_certificate(port, secure).split() != new.split():
            assert time.monotonic() < deadline, f"port {port} still serves the old certificate"
            time.sleep(0.2)
    # Envoy's hop to the server follows the new certificate too.
    deadline = time.monotonic() + 30
    while True:
        status, _, body = secure.request(
            "POST", "/tokenize", b'{"prompt": "hi"}', {"x-api-key": secure.full}
        )
        if status == 200:
            break
        assert time.monotonic() < deadline, (status, body)
        time.sleep(0.2)


def test_keys_never_appear_in_the_logs(secure: Secure) -> None:
    """Last: every key above was used, right or wrong, at DEBUG level."""
    log = secure.gateway.log_text()
    assert "key=full" in log
    assert "key=limited" in log
    for key in (secure.full, secure.embed_only, secure.limited, "glm-wrong"):
        assert key not in log
    assert "UNAUTHENTICATED" in log


# -- protected mode -------------------------------------------------------------------------------


def test_an_unprotected_public_gateway_refuses_to_start(tmp_path: Path) -> None:
    gateway = start_gateway(tmp_path, "--http-host", "0.0.0.0")
    try:
        code = gateway.proc.wait(timeout=60)
    finally:
        stop_gateway(gateway)
    assert code == 2
    log = gateway.log_text()
    assert "protected mode" in log
    assert "GLM_HTTP_HOST 0.0.0.0" in log
    assert "python -m server keys add" in log
    assert "GLM_AUTH=none" in log
    # Nothing was started: Envoy's port is free.
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", gateway.http_port)) != 0

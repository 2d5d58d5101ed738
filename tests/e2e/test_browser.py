"""Browsers: gRPC-Web through Envoy's grpc_web filter, its CORS headers, and the chat page at GET /
in a real browser (Debian's Chromium driven by Playwright), through the real Envoy and server
with API keys on. The page's screenshot is written to build/browser/chat-page.png.
"""

from __future__ import annotations

import http.client
import math
import os
import re
import shutil
import struct
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from glm.v1 import glm_service_pb2 as pb
from glm.v1 import glm_service_pb2_grpc as pb_grpc
from server.auth.keys import append_key
from tests.conftest import free_port
from tests.e2e.conftest import (
    ALLOWED_ORIGIN,
    Gateway,
    exchange,
    start_gateway,
    stop_gateway,
    wait_healthy,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "build" / "browser"
CHAT_MODEL = "smollm2-135m-instruct"
EMBED_MODEL = "all-minilm-l6-v2"
GRPC_WEB = "application/grpc-web+proto"
# What a gRPC-Web or Connect client sends, and what it must read back.
GRPC_WEB_REQUEST_HEADERS = (
    "x-grpc-web",
    "x-user-agent",
    "grpc-timeout",
    "content-type",
    "authorization",
)
GRPC_WEB_RESPONSE_HEADERS = ("grpc-status", "grpc-message")
RUNNING = re.compile(r'^glm_chat_running_sequences\{model="([^"]+)"\} ([\d.]+)$', re.MULTILINE)
# Playwright's waits are generous: the machine may be busy, and a failure still ends in time.
WAIT_MS = 120_000


@dataclass
class Served:
    """A gateway with API keys and metrics on."""

    gateway: Gateway
    key: str
    metrics_url: str

    def running(self) -> float:
        """glm_chat_running_sequences of the chat model (0 when not reported)."""
        with urllib.request.urlopen(self.metrics_url, timeout=10) as response:
            text = response.read().decode()
        values = {model: float(value) for model, value in RUNNING.findall(text)}
        return values.get(CHAT_MODEL, 0.0)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    folder = tmp_path_factory.mktemp("browser")
    keys_file = folder / "api-keys.toml"
    key = append_key(keys_file, "page")
    metrics_port = free_port()
    gateway = start_gateway(
        folder,
        "--api-keys-file",
        str(keys_file),
        env_extra={"GLM_METRICS_PORT": str(metrics_port)},
    )
    try:
        wait_healthy(gateway)
        yield Served(gateway, key, f"http://127.0.0.1:{metrics_port}/metrics")
    finally:
        stop_gateway(gateway)


def request(
    served: Served,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request to Envoy, as a browser's fetch() makes it."""
    conn = http.client.HTTPConnection("127.0.0.1", served.gateway.http_port, timeout=120)
    return exchange(conn, method, path, body, headers)


# -- the page's files --------------------------------------------------------------------------


def test_get_root_serves_the_page_and_its_script(served: Served) -> None:
    status, headers, body = request(served, "GET", "/")
    assert status == 200
    assert headers["content-type"] == "text/html; charset=utf-8"
    assert "script-src 'self'" in headers["content-security-policy"]
    assert body == (ROOT / "web" / "index.html").read_bytes()
    assert b'<script type="module" src="/app.js">' in body

    status, headers, body = request(served, "GET", "/app.js")
    assert status == 200
    assert headers["content-type"] == "text/javascript; charset=utf-8"
    assert body == (ROOT / "web" / "app.js").read_bytes()


def test_other_methods_and_paths_still_reach_the_api(served: Served) -> None:
    # Only GET is the page: a POST to / is an unknown API route, answered in the JSON error shape.
    status, headers, body = request(
        served, "POST", "/", b"{}", {"content-type": "application/json"}
    )
    assert status == 404
    assert headers["content-type"] == "application/json"
    assert b'"not_found_error"' in body


# -- gRPC-Web and CORS -------------------------------------------------------------------------


def frames(body: bytes) -> list[tuple[int, bytes]]:
    """A gRPC-Web body's frames as (flags, payload); flag 0x80 marks the trailers."""
    out = []
    while body:
        flags, size = struct.unpack(">BI", body[:5])
        out.append((flags, body[5 : 5 + size]))
        body = body[5 + size :]
    return out


def grpc_web_call(
    served: Served, method: str, message: bytes, key: str | None
) -> tuple[int, dict[str, str], bytes]:
    headers = {"content-type": GRPC_WEB, "x-grpc-web": "1", "x-user-agent": "test"}
    if key is not None:
        headers["authorization"] = f"Bearer {key}"
    body = struct.pack(">BI", 0, len(message)) + message
    return request(served, "POST", f"/glm.v1.GlmService/{method}", body, headers)


def test_a_grpc_web_call_is_answered_in_grpc_web(served: Served) -> None:
    message = pb.TokenizeRequest(model=CHAT_MODEL, prompt="Hello world").SerializeToString()
    status, headers, body = grpc_web_call(served, "Tokenize", message, served.key)
    assert status == 200
    assert headers["content-type"] == GRPC_WEB
    (data_flags, data), (trailer_flags, trailers) = frames(body)
    assert (data_flags, trailer_flags) == (0, 0x80)
    assert "grpc-status:0" in trailers.decode().replace(" ", "").split("\r\n")
    reply = pb.TokenizeResponse.FromString(data)
    assert len(reply.tokens) >= 2


def test_a_grpc_web_error_carries_its_status(served: Served) -> None:
    message = pb.ListModelsRequest().SerializeToString()
    status, headers, _ = grpc_web_call(served, "ListModels", message, key=None)
    assert status == 200
    assert headers["grpc-status"] == str(grpc.StatusCode.UNAUTHENTICATED.value[0])
    assert headers["grpc-message"]


def test_cors_lets_an_allowed_origin_call_with_grpc_web(served: Served) -> None:
    preflight = {
        "origin": ALLOWED_ORIGIN,
        "access-control-request-method": "POST",
        "access-control-request-headers": ",".join(GRPC_WEB_REQUEST_HEADERS),
    }
    status, headers, _ = request(served, "OPTIONS", "/glm.v1.GlmService/Chat", headers=preflight)
    assert status == 200
    assert headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    allowed = {h.strip() for h in headers["access-control-allow-headers"].split(",")}
    assert set(GRPC_WEB_REQUEST_HEADERS) <= allowed

    message = pb.ListModelsRequest().SerializeToString()
    body = struct.pack(">BI", 0, len(message)) + message
    status, headers, _ = request(
        served,
        "POST",
        "/glm.v1.GlmService/ListModels",
        body,
        {"content-type": GRPC_WEB, "x-grpc-web": "1", "origin": ALLOWED_ORIGIN},
    )
    assert headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    exposed = {h.strip() for h in headers["access-control-expose-headers"].split(",")}
    assert set(GRPC_WEB_RESPONSE_HEADERS) <= exposed


def test_cors_stays_closed_to_other_origins(served: Served) -> None:
    preflight = {
        "origin": "https://elsewhere.example.org",
        "access-control-request-method": "POST",
        "access-control-request-headers": "x-grpc-web,content-type",
    }
    _, headers, _ = request(served, "OPTIONS", "/glm.v1.GlmService/Chat", headers=preflight)
    assert "access-control-allow-origin" not in headers


# -- the page in Chromium ------------------------------------------------------------------------


def chromium() -> str:
    """Debian's Chromium; skipped when it is not installed, except in CI (where .ci/run installs
    it with scripts/install_toolchains.sh and a missing one is a failure)."""
    path = shutil.which("chromium")
    if path is None:
        reason = "Chromium is missing: run `make toolchains` (Debian packages, as root)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return path


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout} s: {what}")


def server_cosine(served: Served, a: str, b: str) -> float:
    with grpc.insecure_channel(served.gateway.grpc_direct) as channel:
        reply = pb_grpc.GlmServiceStub(channel).Embed(
            pb.EmbedRequest(model=EMBED_MODEL, prompt=[a, b]),
            metadata=[("authorization", f"Bearer {served.key}")],
            timeout=120,
        )
    u, v = (list(e.values) for e in reply.data)
    dot = sum(x * y for x, y in zip(u, v, strict=True))
    return float(dot / math.sqrt(sum(x * x for x in u) * sum(y * y for y in v)))


def test_the_chat_page_in_chromium(served: Served, tmp_path: Path) -> None:
    executable = chromium()
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as playwright:
        # --no-sandbox: CI runs as root, where Chromium's sandbox cannot start; and /dev/shm may
        # be small in a container.
        browser = playwright.chromium.launch(
            executable_path=executable, args=["--no-sandbox", "--disable-dev-shm-usage"]
        )
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(served.gateway.http + "/")
            expect(page).to_have_title("glm-api chat")

            # Keys are on: the page's first gRPC-Web call (ListModels) is refused, and says why.
            status = page.locator("#status")
            expect(status).to_contain_text("UNAUTHENTICATED", timeout=WAIT_MS)
            # With the key, ListModels over gRPC-Web fills both model lists.
            page.fill("#api-key", served.key)
            page.dispatch_event("#api-key", "change")
            expect(page.locator("#chat-model option")).to_have_text([CHAT_MODEL], timeout=WAIT_MS)
            expect(page.locator("#embed-model option")).to_have_text([EMBED_MODEL])

            # A long reply streams in; Stop ends the server's generation.
            page.fill("#max-tokens", "1024")
            page.fill("#temperature", "0")
            page.fill("#prompt", "Count from 1 to 1000, separated by commas.")
            page.click("#send")
            reply = page.locator(".msg.assistant").last
            expect(status).to_contain_text("tokens/s", timeout=WAIT_MS)
            first = reply.text_content() or ""
            assert first
            # It streams: more text arrives after the first is shown.
            expect(reply).not_to_have_text(first, timeout=WAIT_MS)
            assert served.running() == 1
            page.click("#stop")
            expect(page.locator("#transcript")).to_have_attribute("data-state", "stopped")
            expect(status).to_contain_text("stopped after")
            wait_until(lambda: served.running() == 0, 60, "the server's sequence ended")
            wait_until(
                lambda: "GlmService/Chat CANCELLED" in served.gateway.log_text(),
                30,
                "the server logged the Chat call as cancelled",
            )
            stopped_text = reply.text_content()
            time.sleep(1)
            assert reply.text_content() == stopped_text  # nothing streams in after Stop

            # A short reply runs to its end, with its tokens/s.
            page.fill("#max-tokens", "8")
            page.fill("#prompt", "Say hello.")
            page.press("#prompt", "Enter")
            expect(page.locator("#transcript")).to_have_attribute(
                "data-state", "done", timeout=WAIT_MS
            )
            expect(status).to_have_text(
                re.compile(r"^\d+ tokens · [\d.]+ tokens/s · (length|stop)")
            )

            # The embeddings box: the cosine similarity the server's own vectors give.
            a, b = "A cat sits on the mat.", "A kitten is lying on a rug."
            page.fill("#text-a", a)
            page.fill("#text-b", b)
            page.click("#compare")
            similarity = page.locator("#similarity")
            expect(similarity).to_have_text(re.compile(r"^cosine similarity"), timeout=WAIT_MS)
            match = re.match(
                r"cosine similarity (-?[\d.]+) \(([^,]+), (\d+) dimensions\)",
                similarity.inner_text(),
            )
            assert match, similarity.inner_text()
            assert (match[2], match[3]) == (EMBED_MODEL, "384")
            assert float(match[1]) == pytest.approx(server_cosine(served, a, b), abs=1e-3)

            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            for path in (ARTIFACTS / "chat-page.png", tmp_path / "chat-page.png"):
                page.screenshot(path=str(path), full_page=True)
                assert path.stat().st_size > 0
            assert errors == []
        finally:
            browser.close()

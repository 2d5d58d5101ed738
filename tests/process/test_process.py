"""The real `python -m server` process: CLI client, SIGTERM drain, exit codes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients import GlmClient, GlmClientError
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@dataclass
class ServerProcess:
    """A server subprocess and where it listens."""

    proc: subprocess.Popen[str]
    target: str
    log: Path


def start_server(tmp: Path, *args: str) -> ServerProcess:
    port = free_port()
    log = tmp / f"server-{port}.log"
    env = dict(os.environ, GLM_GRPC_ADDRESS=f"127.0.0.1:{port}", GLM_SHUTDOWN_GRACE_S="120")
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "server", *args],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )
    return ServerProcess(proc, f"127.0.0.1:{port}", log)


def stop_server(server: ServerProcess) -> None:
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    srv = start_server(tmp_path_factory.mktemp("proc"))
    try:
        with GlmClient(srv.target) as client:
            client.wait_until_ready(timeout=300)
        yield srv
    finally:
        stop_server(srv)


def cli(target: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "clients", "--target", target, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_chat_streams_the_answer(server: ServerProcess) -> None:
    done = cli(
        server.target,
        "chat",
        "What is the capital of France?",
        "--temperature",
        "0",
        "--max-tokens",
        "16",
    )
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout
    assert "stop" in done.stderr or "length" in done.stderr


def test_cli_embed_tokenize_models(server: ServerProcess) -> None:
    embedded = cli(server.target, "embed", "hello", "world")
    assert embedded.returncode == 0, embedded.stderr
    payload = json.loads(embedded.stdout)
    assert payload["dimensions"] == 384
    assert len(payload["vectors"]) == 2

    tokens = cli(server.target, "tokenize", "Hello world")
    assert tokens.returncode == 0, tokens.stderr
    assert json.loads(tokens.stdout)["tokens"] == ["Hello", "Ġworld"]

    models = cli(server.target, "models")
    assert models.returncode == 0
    assert "smollm2-135m-instruct" in models.stdout
    assert "all-minilm-l6-v2" in models.stdout


def test_cli_reports_errors(server: ServerProcess) -> None:
    done = cli(server.target, "chat", "hi", "--model", "nope")
    assert done.returncode == 1
    assert "NOT_FOUND" in done.stderr
    assert "unknown model 'nope'" in done.stderr


def test_second_server_on_the_same_port_fails(server: ServerProcess, tmp_path: Path) -> None:
    port = server.target.rsplit(":", 1)[1]
    done = subprocess.run(
        [sys.executable, "-m", "server", "--grpc-address", f"127.0.0.1:{port}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0


def test_bad_settings_exit_2() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "server", "--grpc-address", "no-port-here"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "grpc_address must be host:port" in done.stderr


def test_sigterm_drains_in_flight_calls_then_exits_0(tmp_path: Path) -> None:
    srv = start_server(tmp_path)
    try:
        with GlmClient(srv.target) as client:
            client.wait_until_ready(timeout=300)
            stream = client.chat(
                [("user", "Tell me a story about a cat.")], temperature=0.0, max_tokens=40
            )
            chunks = [next(iter(stream))]
            srv.proc.send_signal(signal.SIGTERM)
            # Once the signal is handled, new calls are refused while the stream in flight goes
            # on (the handler runs asynchronously, so the first calls may still get through).
            refused = None
            for _ in range(200):
                try:
                    client.tokenize("late", timeout=10)
                except GlmClientError as exc:
                    refused = exc
                    break
                time.sleep(0.025)
            chunks.extend(stream)
        assert refused is not None
        # UNAVAILABLE normally; a call that reaches grpc core in the very moment the server stops
        # accepting is cancelled by grpc itself instead. Either way it was refused, not served.
        assert refused.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")
        assert chunks[-1].usage.completion_tokens > 1
        assert srv.proc.wait(timeout=60) == 0
        log = srv.log.read_text()
        assert "draining" in log
        assert "stopped" in log
    finally:
        stop_server(srv)


def test_sigterm_reports_not_serving_first_and_serves_through_the_drain_delay(
    tmp_path: Path,
) -> None:
    srv = start_server(tmp_path, "--drain-delay-s", "4")
    try:
        with GlmClient(srv.target) as client, grpc.insecure_channel(srv.target) as channel:
            client.wait_until_ready(timeout=300)
            health = health_pb2_grpc.HealthStub(channel)
            request = health_pb2.HealthCheckRequest(service="glm.v1.GlmService")
            srv.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 3
            while health.Check(request, timeout=5).status == health_pb2.HealthCheckResponse.SERVING:
                assert time.monotonic() < deadline, "still SERVING after SIGTERM"
                time.sleep(0.05)
            # NOT_SERVING, so that balancers stop sending calls here; those that still come
            # during the delay are served, not refused.
            assert client.tokenize("late but served", timeout=10).token_ids
            assert srv.proc.poll() is None
        assert srv.proc.wait(timeout=60) == 0
        assert "still accepting calls for 4.0 s" in srv.log.read_text()
    finally:
        stop_server(srv)

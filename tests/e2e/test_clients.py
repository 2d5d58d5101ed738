"""The TypeScript, Go, C++ and Java clients' examples, built from clients/ with their real
toolchains, against the real server directly and through the real Envoy: a streamed Chat, an
Embed and an error's status code; and each client's own unit tests. A small recording server
checks what only a server with API keys and TLS could see: that each client sends its key over
TLS.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from glm.v1 import glm_service_pb2 as pb
from glm.v1 import glm_service_pb2_grpc as pb_grpc
from tests.e2e.client_programs import PROGRAMS, TYPESCRIPT, ClientProgram, build, run, unit_tests
from tests.e2e.conftest import Gateway

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

QUESTION = "What is the capital of France?"
EMBED_MODEL = "all-minilm-l6-v2"
OUTPUT = re.compile(
    r"(?P<text>.*)\nfinish_reason: (?P<finish>\w+)\n"
    r"usage: prompt=(?P<prompt>\d+) completion=(?P<completion>\d+) total=(?P<total>\d+)\n"
    r"embed: (?P<vectors>\d+) vectors of (?P<dims>\d+) floats \((?P<model>[^)]+)\), "
    r"cosine (?P<cosine>-?[\d.]+)\n$",
    re.DOTALL,
)


@pytest.fixture(scope="module", params=PROGRAMS, ids=lambda p: p.lang)
def program(request: pytest.FixtureRequest) -> ClientProgram:
    """Each language's example, built once for the module (or skipped, saying why)."""
    built: ClientProgram = request.param
    build(built)
    return built


def target(gateway: Gateway, route: str) -> str:
    return gateway.grpc_direct if route == "direct" else gateway.grpc_via_envoy


def parsed(result: subprocess.CompletedProcess[str]) -> re.Match[str]:
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    match = OUTPUT.match(result.stdout)
    assert match, result.stdout
    return match


def test_unit_tests_pass(program: ClientProgram) -> None:
    # Among them: a stream its peer reset with HTTP/2's INTERNAL_ERROR (Envoy, when the replica
    # behind it dies) is UNAVAILABLE, as in the Python client.
    result = unit_tests(program)
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])


@pytest.mark.parametrize("route", ["direct", "envoy"])
def test_example_streams_a_chat_and_embeds(
    program: ClientProgram, gateway: Gateway, route: str
) -> None:
    result = run(program, "--target", target(gateway, route), "--max-tokens", "16", QUESTION)
    out = parsed(result)
    assert "Paris" in out["text"]
    assert out["finish"] in ("stop", "length")
    prompt, completion = int(out["prompt"]), int(out["completion"])
    assert 0 < completion <= 16
    assert int(out["total"]) == prompt + completion > completion
    assert (int(out["vectors"]), int(out["dims"]), out["model"]) == (2, 384, EMBED_MODEL)
    # Normalized vectors of two different texts: a cosine strictly between 0 and 1.
    assert 0.0 < float(out["cosine"]) < 1.0


@pytest.mark.parametrize("route", ["direct", "envoy"])
def test_example_reports_the_status_code(
    program: ClientProgram, gateway: Gateway, route: str
) -> None:
    result = run(program, "--target", target(gateway, route), "--model", "no-such-model", "hi")
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "error: NOT_FOUND: unknown model 'no-such-model'" in result.stderr


def test_typescript_abort_signal_cancels_the_generation(gateway: Gateway) -> None:
    build(TYPESCRIPT)
    marker = "glm.v1.GlmService/Chat CANCELLED"
    before = gateway.log_text().count(marker)
    result = run(
        TYPESCRIPT,
        "--target",
        gateway.grpc_direct,
        "--max-tokens",
        "1000",
        "--abort-after",
        "2",
        "Write a very long story about a lighthouse keeper.",
    )
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert result.stdout.endswith("\ncancelled after 2 chunks\n"), result.stdout
    # The server saw the cancellation and stopped generating (it logs the call as CANCELLED).
    deadline = time.monotonic() + 30
    while gateway.log_text().count(marker) == before:
        assert time.monotonic() < deadline, gateway.log_text()[-2000:]
        time.sleep(0.1)


@dataclass
class Recorder(pb_grpc.GlmServiceServicer):
    """A GlmService that records each call's metadata and answers with fixed messages."""

    calls: list[tuple[str, dict[str, str]]] = field(default_factory=list)

    def record(self, method: str, context: grpc.ServicerContext) -> None:
        self.calls.append((method, {k: str(v) for k, v in context.invocation_metadata()}))

    def Chat(
        self, request: pb.ChatRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.ChatResponse]:
        self.record("Chat", context)
        delta = pb.ChatDelta(role="assistant", content=f"echo {request.messages[-1].content}")
        yield pb.ChatResponse(model="recorder", choices=[pb.ChatChoice(delta=delta)])
        yield pb.ChatResponse(
            model="recorder",
            choices=[pb.ChatChoice(finish_reason="stop")],
            usage=pb.Usage(prompt_tokens=1, completion_tokens=2, total_tokens=3),
        )

    def Embed(self, request: pb.EmbedRequest, context: grpc.ServicerContext) -> pb.EmbedResponse:
        self.record("Embed", context)
        vectors = ([1.0, 0.0], [0.6, 0.8])
        data = [pb.Embedding(values=v, index=i) for i, v in enumerate(vectors)]
        return pb.EmbedResponse(model="recorder", dimensions=2, data=data)


@dataclass
class TlsServer:
    address: str
    ca: Path
    recorder: Recorder


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsServer]:
    """The recorder behind TLS, with a self-signed certificate for 127.0.0.1."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is missing: it makes the test certificate")
    tmp = tmp_path_factory.mktemp("tls")
    key, cert = tmp / "key.pem", tmp / "cert.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1"),
            *("-addext", "subjectAltName=IP:127.0.0.1"),
        ],
        check=True,
        capture_output=True,
    )
    recorder = Recorder()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_GlmServiceServicer_to_server(recorder, server)  # type: ignore[no-untyped-call]
    credentials = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    try:
        yield TlsServer(f"127.0.0.1:{port}", cert, recorder)
    finally:
        server.stop(grace=None)


def test_example_sends_the_api_key_over_tls(program: ClientProgram, tls_server: TlsServer) -> None:
    tls_server.recorder.calls.clear()
    result = run(
        program,
        *("--target", tls_server.address, "--tls", "--ca", str(tls_server.ca)),
        *("--api-key", "k-123", "hello"),
    )
    out = parsed(result)
    assert out["text"] == "echo hello"
    assert out.group("finish", "prompt", "completion", "total") == ("stop", "1", "2", "3")
    assert out.group("vectors", "dims", "model", "cosine") == ("2", "2", "recorder", "0.6000")
    assert [method for method, _ in tls_server.recorder.calls] == ["Chat", "Embed"]
    for _, metadata in tls_server.recorder.calls:
        assert metadata.get("authorization") == "Bearer k-123"


class ResettingPeer:
    """A plaintext HTTP/2 peer that answers every call with its reply headers and one empty
    message, then resets the stream with `code`: what Envoy does to a Chat stream whose replica
    died (code 2, INTERNAL_ERROR). Just enough HTTP/2 for a gRPC client: settings, pings, and
    literal header fields that need no HPACK table."""

    def __init__(self, code: int) -> None:
        self.code = code
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self.accept, daemon=True).start()

    @staticmethod
    def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
        return (
            struct.pack(">I", len(payload))[1:] + struct.pack(">BBI", kind, flags, stream) + payload
        )

    @staticmethod
    def literal(name: str, value: str) -> bytes:
        return b"\x00" + bytes([len(name)]) + name.encode() + bytes([len(value)]) + value.encode()

    def accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self.serve, args=(conn,), daemon=True).start()

    def serve(self, conn: socket.socket) -> None:
        # A client may drop the connection at any point once its call failed.
        with contextlib.suppress(OSError):
            self.answer(conn)

    def answer(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rb") as reader:
            reader.read(24)  # the client's connection preface
            conn.sendall(self.frame(4, 0, 0))
            while len(header := reader.read(9)) == 9:
                length = int.from_bytes(header[:3], "big")
                kind, flags, stream = struct.unpack(">BBI", header[3:])
                payload = reader.read(length)
                if kind == 4 and not flags & 1:  # SETTINGS: acknowledge
                    conn.sendall(self.frame(4, 1, 0))
                elif kind == 6 and not flags & 1:  # PING: answer
                    conn.sendall(self.frame(6, 1, 0, payload))
                elif kind == 1:  # a call's HEADERS: begin the reply, then reset the stream
                    fields = self.literal(":status", "200")
                    fields += self.literal("content-type", "application/grpc")
                    conn.sendall(
                        self.frame(1, 4, stream, fields)
                        + self.frame(0, 0, stream, bytes(5))
                        + self.frame(3, 0, stream, struct.pack(">I", self.code))
                    )

    def close(self) -> None:
        self.listener.close()


@pytest.mark.parametrize(
    ("reset_code", "reported"),
    [(2, "UNAVAILABLE"), (1, "INTERNAL")],
    ids=["internal-error", "protocol-error"],
)
def test_example_reports_a_stream_reset_with_internal_error_as_unavailable(
    program: ClientProgram, reset_code: int, reported: str
) -> None:
    # A reset with INTERNAL_ERROR after the reply began is how Envoy ends a Chat stream whose
    # replica died; gRPC says INTERNAL, the clients say UNAVAILABLE. Other reset codes stay as
    # gRPC reports them.
    peer = ResettingPeer(reset_code)
    try:
        result = run(program, "--target", peer.address, "hello", timeout=120)
    finally:
        peer.close()
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert f"error: {reported}: " in result.stderr, result.stderr


def test_example_refuses_a_server_it_does_not_trust(
    program: ClientProgram, tls_server: TlsServer
) -> None:
    # Without --ca the system's roots are used, which do not include the test certificate.
    result = run(program, "--target", tls_server.address, "--tls", "hello", timeout=120)
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "error: UNAVAILABLE" in result.stderr

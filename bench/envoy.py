"""Envoy part: JSON through Envoy against direct gRPC, on one server, in one run.

Starts ``python -m gateway`` (the server and Envoy, as ``make run`` does) on free ports, then:
- Tokenize and Embed: sequential calls on three paths, taking turns in a new random order each
  round so that every path sees the same machine load: the legacy JSON route through Envoy
  (Python's http.client on one kept-alive HTTP/1.1 connection), the same RPC over gRPC straight
  to the server (grpc's own generated client), and that gRPC call through Envoy. Each call's
  latency and the client's CPU time are recorded. http.client and json cost their client more
  CPU than grpc's C core and protobuf do, so the target (JSON via Envoy adds < 1 ms) is judged
  on latency less each call's client CPU time; the plain difference is reported beside it.
- Chat: tokens/s of a greedy stream, direct gRPC against Server-Sent Events through Envoy.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psutil

from bench import defaults
from bench.chat_stream import glm_stub, read_greedy_stream
from bench.load import BackgroundLoad, is_noisy
from bench.report import Metric, Say, Section, flagged
from bench.server_process import PROJECT_ROOT, free_port
from glm.v1 import glm_service_pb2 as pb
from glm.v1 import glm_service_pb2_grpc as pb_grpc

TOKENIZE_TEXT = "Hello world, how are you today?"
EMBED_TEXT = "The cat sits on the mat."
# Calls per path before measuring: connections open, caches and code paths warm.
_WARMUP_CALLS = 20


@dataclass
class Samples:
    """One path's calls: wall time and the client's CPU time, in seconds."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    def median_ms(self) -> float:
        """The median latency."""
        return statistics.median(self.wall) * 1000

    def cpu_ms(self) -> float:
        """The client's median CPU time per call."""
        return statistics.median(self.cpu) * 1000

    def beyond_client_ms(self) -> float:
        """The median of latency less the client's CPU time: the time spent outside the client.

        The clients are synchronous: while a call waits for its reply the process has nothing
        else to do, so its CPU time is what the client itself adds to the latency.
        """
        return statistics.median(w - c for w, c in zip(self.wall, self.cpu, strict=True)) * 1000


def measure(paths: dict[str, Callable[[], object]], calls: int) -> dict[str, Samples]:
    """`calls` sequential calls per path, the paths taking turns in a new random order each round.

    Taking turns, rather than one block per path, gives every path the same machine load (on a
    shared machine it drifts over seconds); a random order gives each the same predecessors (a
    call right after another through Envoy finds Envoy's code and data warm). The client's CPU
    time is the whole process's: the calling thread and grpc's own threads.
    """
    names = list(paths)
    for name in names:
        for _ in range(_WARMUP_CALLS):
            paths[name]()
    order = random.Random(0)  # the same orders every run
    samples = {name: Samples() for name in names}
    for _ in range(calls):
        order.shuffle(names)
        for name in names:
            cpu0 = time.process_time()
            wall0 = time.perf_counter()
            paths[name]()
            wall = time.perf_counter() - wall0
            samples[name].wall.append(wall)
            samples[name].cpu.append(time.process_time() - cpu0)
    return samples


@dataclass(frozen=True, slots=True)
class UnaryResult:
    """One unary RPC measured on every path."""

    name: str
    json_via_envoy: Samples
    direct: Samples
    grpc_via_envoy: Samples

    @property
    def added_ms(self) -> float:
        """Median JSON via Envoy less median direct gRPC, clients included."""
        return self.json_via_envoy.median_ms() - self.direct.median_ms()

    @property
    def added_beyond_clients_ms(self) -> float:
        """The same with each call's client CPU time taken out: what the server side adds."""
        return self.json_via_envoy.beyond_client_ms() - self.direct.beyond_client_ms()

    @property
    def grpc_envoy_added_ms(self) -> float:
        """Median gRPC through Envoy less median direct gRPC: Envoy's own hop, no JSON."""
        return self.grpc_via_envoy.median_ms() - self.direct.median_ms()

    def metrics(self) -> list[Metric]:
        """The table lines."""
        n = self.name
        return [
            Metric(f"envoy: {n} JSON via Envoy, median", self.json_via_envoy.median_ms(), "ms"),
            Metric(f"envoy: {n} direct gRPC, median", self.direct.median_ms(), "ms"),
            Metric(f"envoy: {n} gRPC via Envoy, median", self.grpc_via_envoy.median_ms(), "ms"),
            Metric(f"envoy: {n} JSON client CPU per call", self.json_via_envoy.cpu_ms(), "ms"),
            Metric(f"envoy: {n} gRPC client CPU per call", self.direct.cpu_ms(), "ms"),
            Metric(
                f"envoy: {n} latency JSON via Envoy adds, clients included", self.added_ms, "ms"
            ),
            Metric(
                f"envoy: {n} latency JSON via Envoy adds, clients' CPU excluded",
                self.added_beyond_clients_ms,
                "ms",
                defaults.ENVOY_ADDED_MS_TARGET,
            ),
            Metric(f"envoy: {n} latency gRPC via Envoy adds", self.grpc_envoy_added_ms, "ms"),
        ]

    def as_dict(self) -> dict[str, float]:
        """The figures for the JSON file, in ms."""
        paths = {
            "json_via_envoy": self.json_via_envoy,
            "direct": self.direct,
            "grpc_via_envoy": self.grpc_via_envoy,
        }
        figures = {f"{k}_median_ms": v.median_ms() for k, v in paths.items()}
        figures |= {f"{k}_client_cpu_ms": v.cpu_ms() for k, v in paths.items()}
        return figures | {
            "added_ms": self.added_ms,
            "added_beyond_clients_ms": self.added_beyond_clients_ms,
            "grpc_envoy_added_ms": self.grpc_envoy_added_ms,
        }


@dataclass(frozen=True, slots=True)
class EnvoyResult:
    """Everything one run measured."""

    unary: tuple[UnaryResult, ...]
    chat_direct_tok_s: float
    chat_envoy_tok_s: float
    background_cores: float

    @property
    def chat_ratio(self) -> float:
        return self.chat_envoy_tok_s / self.chat_direct_tok_s

    def metrics(self) -> list[Metric]:
        """The table lines, marked noisy when other processes kept cores busy."""
        metrics = [
            *(m for u in self.unary for m in u.metrics()),
            Metric("envoy: chat direct gRPC", self.chat_direct_tok_s, "tok/s", digits=1),
            Metric("envoy: chat SSE via Envoy", self.chat_envoy_tok_s, "tok/s", digits=1),
            Metric(
                "envoy: chat tok/s via Envoy / direct",
                self.chat_ratio,
                target=defaults.ENVOY_CHAT_RATIO_TARGET,
                digits=3,
            ),
            Metric("envoy: other processes' CPU load", self.background_cores, "cores"),
        ]
        return flagged(metrics, is_noisy(self.background_cores))

    def as_dict(self) -> dict[str, Any]:
        """The figures for the JSON file."""
        return {
            **{u.name: u.as_dict() for u in self.unary},
            "chat_direct_tok_s": self.chat_direct_tok_s,
            "chat_envoy_tok_s": self.chat_envoy_tok_s,
            "chat_ratio": self.chat_ratio,
            "background_cores": self.background_cores,
        }


def start_gateway(log: Path) -> tuple[subprocess.Popen[bytes], int, int]:
    """`python -m gateway` on free ports; returns it, its gRPC port and its HTTP port."""
    grpc_port, http_port = free_port(), free_port()
    env = dict(os.environ, GLM_GRPC_ADDRESS=f"127.0.0.1:{grpc_port}", GLM_HTTP_PORT=str(http_port))
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway"],
            cwd=PROJECT_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/healthz", timeout=1) as r:
                if r.status == 200:
                    return proc, grpc_port, http_port
        except OSError:
            pass
        time.sleep(0.2)
    stop_gateway(proc)
    raise RuntimeError("the gateway did not become healthy:\n" + log.read_text()[-2000:])


def stop_gateway(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM (the supervisor stops the server, then Envoy), SIGKILL if that hangs."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _gateway_pids(proc: subprocess.Popen[bytes]) -> list[int]:
    """The supervisor, the server and Envoy: the processes under test."""
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        children = []
    return [proc.pid, *(child.pid for child in children)]


def _json_call(
    conn: http.client.HTTPConnection, path: str, payload: object, key: str
) -> Callable[[], None]:
    """One JSON POST on a kept-alive connection that must answer 200 with `key` in its body."""
    body = json.dumps(payload)

    def call() -> None:
        conn.request("POST", path, body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        reply = json.loads(response.read())
        if response.status != 200 or key not in reply:
            raise RuntimeError(f"{path}: {response.status} {str(reply)[:200]}")

    return call


def _unary_paths(
    http_conn: http.client.HTTPConnection,
    direct: pb_grpc.GlmServiceStub,
    via_envoy: pb_grpc.GlmServiceStub,
) -> dict[str, dict[str, Callable[[], object]]]:
    """Per RPC, its three paths: JSON via Envoy, gRPC direct, gRPC via Envoy."""
    tokenize = pb.TokenizeRequest(prompt=TOKENIZE_TEXT)
    embed = pb.EmbedRequest(prompt=[EMBED_TEXT])
    return {
        "tokenize": {
            "json_via_envoy": _json_call(
                http_conn, "/tokenize", {"prompt": TOKENIZE_TEXT}, "tokenIds"
            ),
            "direct": lambda: direct.Tokenize(tokenize, timeout=60.0),
            "grpc_via_envoy": lambda: via_envoy.Tokenize(tokenize, timeout=60.0),
        },
        "embed": {
            "json_via_envoy": _json_call(http_conn, "/embedding", {"prompt": [EMBED_TEXT]}, "data"),
            "direct": lambda: direct.Embed(embed, timeout=60.0),
            "grpc_via_envoy": lambda: via_envoy.Embed(embed, timeout=60.0),
        },
    }


def grpc_chat_tok_s(stub: pb_grpc.GlmServiceStub, tokens: int) -> float:
    """Tokens/s of one greedy gRPC stream, send to last chunk."""
    read = read_greedy_stream(stub, defaults.DEFAULT_PROMPT, tokens, timeout_s=300.0)
    if read.error is not None:
        raise read.error
    return read.completion_tokens / (read.ended - read.sent)


def sse_chat_tok_s(http_port: int, tokens: int) -> float:
    """Tokens/s of one greedy /chat stream of Server-Sent Events through Envoy."""
    conn = http.client.HTTPConnection("127.0.0.1", http_port, timeout=300)
    payload = {
        "messages": [{"role": "user", "content": defaults.DEFAULT_PROMPT}],
        "temperature": 0,
        "max_tokens": tokens,
        "stream": True,  # the legacy /chat answers one object unless asked to stream
    }
    try:
        started = time.perf_counter()
        conn.request("POST", "/chat", body=json.dumps(payload))
        body = conn.getresponse().read()
        elapsed = time.perf_counter() - started
    finally:
        conn.close()
    # The legacy framing: each event ends with a CRLF blank line.
    events = [e for e in body.split(b"\r\n\r\n") if e.strip() and e.strip() != b"data: [DONE]"]
    usage = json.loads(events[-1].removeprefix(b"data: "))["usage"]
    return float(usage["completion_tokens"]) / elapsed


def run_envoy(*, calls: int, tokens: int, repeats: int, say: Say) -> EnvoyResult:
    """Start the gateway, measure every path, stop it."""
    with tempfile.TemporaryDirectory(prefix="glm-bench-envoy-") as tmp:
        proc, grpc_port, http_port = start_gateway(Path(tmp) / "gateway.log")
        say(
            f"envoy: python -m gateway (pid {proc.pid}): JSON on :{http_port}, gRPC on :{grpc_port}"
        )
        load = BackgroundLoad(*_gateway_pids(proc))
        before = load.snapshot()
        http_conn = http.client.HTTPConnection("127.0.0.1", http_port, timeout=60)
        try:
            with (
                grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as direct_channel,
                grpc.insecure_channel(f"127.0.0.1:{http_port}") as envoy_channel,
            ):
                direct = glm_stub(direct_channel)
                paths = _unary_paths(http_conn, direct, glm_stub(envoy_channel))
                unary = []
                for name, by_path in paths.items():
                    say(f"envoy: {name}: {calls} calls per path, the three paths taking turns")
                    unary.append(UnaryResult(name, **measure(by_path, calls)))
                say(f"envoy: chat: {repeats} x (gRPC stream, SSE stream) of {tokens} tokens")
                grpc_chat_tok_s(direct, 8)  # warm
                direct_rates, envoy_rates = [], []
                for repeat in range(repeats):
                    # Each path goes first every other time: the first stream of a pair has been
                    # seen to run at another speed than the second.
                    if repeat % 2:
                        envoy_rates.append(sse_chat_tok_s(http_port, tokens))
                    direct_rates.append(grpc_chat_tok_s(direct, tokens))
                    if not repeat % 2:
                        envoy_rates.append(sse_chat_tok_s(http_port, tokens))
            busy = load.cores_between(before, load.snapshot())
        finally:
            http_conn.close()
            stop_gateway(proc)
    return EnvoyResult(
        tuple(unary), statistics.median(direct_rates), statistics.median(envoy_rates), busy
    )


def run(args: argparse.Namespace, say: Say) -> Section:
    """The Envoy part (its own gateway: server and Envoy)."""
    say(
        f"envoy: JSON via Envoy vs direct gRPC: Tokenize and Embed latency ({args.calls} calls "
        f"per path), then {args.repeats} x {args.tokens}-token chat streams"
    )
    result = run_envoy(calls=args.calls, tokens=args.tokens, repeats=args.repeats, say=say)
    return Section(result.as_dict(), result.metrics())

"""JSON through Envoy vs direct gRPC, in one run: `python -m bench.envoy` (or `python -m bench
--only envoy`, part of `all`).

Starts `python -m gateway` (server + Envoy, exactly as `make run` does) on free ports and measures,
interleaved call by call so that every path sees the same machine load:
- Tokenize and Embed: the median latency of sequential calls on five paths: the seed's JSON route
  over HTTP/1.1 through Envoy (one kept-alive connection; Envoy's transcoder and Lua filter, the
  server's JSON gateway), the same RPC in gRPC directly, in gRPC through Envoy (Envoy's own hop),
  and the JSON route's own RPC (the same JSON in an HttpBody) in gRPC directly (the server's JSON
  work without Envoy), so that what JSON via Envoy adds is split into its parts. The JSON and gRPC
  clients are equally minimal ones (bench/wire.py: one write a call, the
  reply parsed on the calling thread), and each call's client CPU time is measured: decoding
  JSON still costs its client more than protobuf costs the gRPC one, so the target (JSON via
  Envoy adds < 1 ms to the median of direct gRPC) is judged with each client's CPU time taken
  out, the plain difference printed beside it. The typed client (clients.GlmClient) is measured
  too, for the latency its users see.
- Chat: tokens/s of a 128-token greedy stream, direct gRPC vs Server-Sent Events through Envoy
  (target: Envoy >= 0.95 of direct).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import psutil
from google.api.httpbody_pb2 import HttpBody
from google.protobuf.message import Message

from bench.load import BUSY_CORES_LIMIT, BackgroundLoad
from bench.report import Metric, Target, format_table
from bench.server_process import PROJECT_ROOT, free_port
from bench.wire import GrpcH2Client, JsonHttpClient
from clients import GlmClient
from glm.v1 import glm_service_pb2 as pb

CHAT_PROMPT = "Write a long story about a lighthouse keeper."
TOKENIZE_TEXT = "Hello world, how are you today?"
EMBED_TEXT = "The cat sits on the mat."
TOKENIZE = "/glm.v1.GlmService/Tokenize"
EMBED = "/glm.v1.GlmService/Embed"
# The RPCs behind the seed's JSON routes: what Envoy's transcoder calls.
GATEWAY_TOKENIZE = "/glm.v1.HttpGatewayService/SeedTokenize"
GATEWAY_EMBED = "/glm.v1.HttpGatewayService/SeedEmbedding"
# Sequential calls per path and unary RPC, and tokens and streams per chat path.
CALLS = 500
CHAT_TOKENS = 128
REPEATS = 3
# Calls per path before measuring: connections open, caches and code paths warm.
WARMUP_CALLS = 20

ADDED_LATENCY_MS_TARGET = Target("<", 1.0)
CHAT_RATIO_TARGET = Target(">=", 0.95)

say = functools.partial(print, flush=True)


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

        Exact for the minimal clients: they work on the calling thread only and do nothing
        while they wait, so all their CPU time delays the reply and nothing else does.
        """
        return statistics.median(w - c for w, c in zip(self.wall, self.cpu, strict=True)) * 1000


Clock = Callable[[], float]


def measure(paths: dict[str, tuple[Callable[[], object], Clock]], calls: int) -> dict[str, Samples]:
    """`calls` sequential calls per path, the paths taking turns in a new random order each round.

    Taking turns, rather than one block per path, gives every path the same machine load (on a
    shared machine it drifts over seconds); a random order gives each the same predecessors,
    which matters: a call right after another through Envoy finds Envoy's code and data warm
    (measured: in a fixed order, the path after another Envoy path looked 0.3-0.4 ms faster).
    Each path's CPU time is read with its own clock: see run_envoy.
    """
    names = list(paths)
    for name in names:
        for _ in range(WARMUP_CALLS):
            paths[name][0]()
    order = random.Random(0)  # the same orders every run
    samples = {name: Samples() for name in names}
    for _ in range(calls):
        order.shuffle(names)
        for name in names:
            call, clock = paths[name]
            cpu0 = clock()
            wall0 = time.perf_counter()
            call()
            wall = time.perf_counter() - wall0
            samples[name].wall.append(wall)
            samples[name].cpu.append(clock() - cpu0)
    return samples


@dataclass(frozen=True, slots=True)
class UnaryResult:
    """One unary RPC measured on every path."""

    name: str
    json_via_envoy: Samples
    direct: Samples
    grpc_via_envoy: Samples
    typed_direct: Samples
    gateway_direct: Samples

    @property
    def added_ms(self) -> float:
        """Median JSON via Envoy less median direct gRPC, both with a minimal client."""
        return self.json_via_envoy.median_ms() - self.direct.median_ms()

    @property
    def added_beyond_clients_ms(self) -> float:
        """The same with each call's client CPU time taken out: what the server side adds."""
        return self.json_via_envoy.beyond_client_ms() - self.direct.beyond_client_ms()

    @property
    def envoy_hop_ms(self) -> float:
        """Of what JSON via Envoy adds: Envoy's own hop (gRPC through Envoy less gRPC direct)."""
        return self.grpc_via_envoy.beyond_client_ms() - self.direct.beyond_client_ms()

    @property
    def json_work_ms(self) -> float:
        """Of it: the server's JSON work (the JSON route's RPC in gRPC direct less Embed's)."""
        return self.gateway_direct.beyond_client_ms() - self.direct.beyond_client_ms()

    @property
    def rest_ms(self) -> float:
        """Of it: the rest, i.e. Envoy's HTTP/1.1 and transcoding (and what noise leaves over)."""
        return self.added_beyond_clients_ms - self.envoy_hop_ms - self.json_work_ms

    @property
    def added_vs_typed_ms(self) -> float:
        """Median JSON via Envoy (minimal client) less median direct gRPC with GlmClient."""
        return self.json_via_envoy.median_ms() - self.typed_direct.median_ms()

    def metrics(self) -> list[Metric]:
        """The table lines."""
        n = self.name
        return [
            Metric(f"envoy: {n} JSON via Envoy, median", self.json_via_envoy.median_ms(), "ms"),
            Metric(f"envoy: {n} direct gRPC, median", self.direct.median_ms(), "ms"),
            Metric(f"envoy: {n} gRPC via Envoy, median", self.grpc_via_envoy.median_ms(), "ms"),
            Metric(f"envoy: {n} JSON client CPU per call", self.json_via_envoy.cpu_ms(), "ms"),
            Metric(f"envoy: {n} gRPC client CPU per call", self.direct.cpu_ms(), "ms"),
            Metric(f"envoy: {n} latency JSON via Envoy adds", self.added_ms, "ms"),
            Metric(
                f"envoy: {n} latency added, clients' CPU excluded",
                self.added_beyond_clients_ms,
                "ms",
                ADDED_LATENCY_MS_TARGET,
            ),
            Metric(f"envoy: {n} of it, Envoy's gRPC hop", self.envoy_hop_ms, "ms"),
            Metric(f"envoy: {n} of it, the server's JSON work", self.json_work_ms, "ms"),
            Metric(f"envoy: {n} of it, HTTP/1.1 and transcoding", self.rest_ms, "ms"),
            Metric(f"envoy: {n} direct, typed client, median", self.typed_direct.median_ms(), "ms"),
            Metric(
                f"envoy: {n} typed client CPU per call (process)", self.typed_direct.cpu_ms(), "ms"
            ),
        ]

    def as_dict(self) -> dict[str, float]:
        """The figures for the JSON file, in ms."""
        paths = {
            "json_via_envoy": self.json_via_envoy,
            "direct": self.direct,
            "grpc_via_envoy": self.grpc_via_envoy,
            "typed_direct": self.typed_direct,
            "gateway_direct": self.gateway_direct,
        }
        figures = {f"{k}_median_ms": v.median_ms() for k, v in paths.items()}
        figures |= {f"{k}_client_cpu_ms": v.cpu_ms() for k, v in paths.items()}
        return figures | {
            "added_ms": self.added_ms,
            "added_beyond_clients_ms": self.added_beyond_clients_ms,
            "added_vs_typed_ms": self.added_vs_typed_ms,
            "envoy_hop_ms": self.envoy_hop_ms,
            "json_work_ms": self.json_work_ms,
            "rest_ms": self.rest_ms,
        }


@dataclass(frozen=True, slots=True)
class EnvoyResult:
    """Everything one run measured."""

    unary: tuple[UnaryResult, ...]
    chat_direct_tok_s: float
    chat_envoy_tok_s: float
    background_cores: float

    def metrics(self) -> list[Metric]:
        """The table lines, marked noisy when other processes kept cores busy."""
        ratio = self.chat_envoy_tok_s / self.chat_direct_tok_s
        metrics = [
            *(m for u in self.unary for m in u.metrics()),
            Metric("envoy: chat direct gRPC", self.chat_direct_tok_s, "tok/s", digits=1),
            Metric("envoy: chat SSE via Envoy", self.chat_envoy_tok_s, "tok/s", digits=1),
            Metric("envoy: chat tok/s via Envoy / direct", ratio, "", CHAT_RATIO_TARGET, 3),
            Metric("envoy: other processes' CPU load", self.background_cores, "cores"),
        ]
        if self.background_cores > BUSY_CORES_LIMIT:
            metrics = [replace(m, noisy=True) for m in metrics]
        return metrics

    def as_dict(self) -> dict[str, Any]:
        """The figures for the JSON file."""
        return {
            **{u.name: u.as_dict() for u in self.unary},
            "chat_direct_tok_s": self.chat_direct_tok_s,
            "chat_envoy_tok_s": self.chat_envoy_tok_s,
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
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/healthz", timeout=1) as r:
                if r.status == 200:
                    return proc, grpc_port, http_port
        except OSError:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("gateway did not become healthy:\n" + log.read_text()[-2000:])


def stop_gateway(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM (the supervisor stops the server, then Envoy), SIGKILL if that hangs."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def grpc_call(
    client: GrpcH2Client, method: str, request: Message, reply: type[Message], check: str
) -> Callable[[], None]:
    """One unary gRPC call whose reply must have a non-empty `check` field."""
    body = request.SerializeToString()

    def call() -> None:
        if not getattr(reply.FromString(client.call(method, body)), check):
            raise RuntimeError(f"{method}: an empty {check}")

    return call


def gateway_call(
    client: GrpcH2Client, method: str, payload: object, key: str
) -> Callable[[], None]:
    """The JSON route's own RPC in gRPC: `payload` as JSON in an HttpBody, the JSON reply parsed
    as a JSON client would (its CPU time is the client's, taken out like the others')."""
    body = HttpBody(content_type="application/json", data=json.dumps(payload).encode())
    request = body.SerializeToString()

    def call() -> None:
        reply = json.loads(HttpBody.FromString(client.call(method, request)).data)
        if key not in reply:
            raise RuntimeError(f"{method}: {str(reply)[:200]}")

    return call


def json_call(client: JsonHttpClient, path: str, payload: object, key: str) -> Callable[[], None]:
    """One JSON POST that must answer 200 with `key` in its body."""
    body = json.dumps(payload).encode()

    def call() -> None:
        status, reply = client.post(path, body)
        if status != 200 or key not in reply:
            raise RuntimeError(f"{path}: {status} {str(reply)[:200]}")

    return call


def grpc_chat_tok_s(client: GlmClient, tokens: int) -> float:
    """Tokens/s of one greedy gRPC stream, first byte to last."""
    started = time.perf_counter()
    result = client.chat_text([("user", CHAT_PROMPT)], temperature=0.0, max_tokens=tokens)
    return result.usage.completion_tokens / (time.perf_counter() - started)


def sse_chat_tok_s(http_port: int, tokens: int) -> float:
    """Tokens/s of one greedy /chat stream of Server-Sent Events through Envoy."""
    conn = http.client.HTTPConnection("127.0.0.1", http_port, timeout=300)
    payload = {
        "messages": [{"role": "user", "content": CHAT_PROMPT}],
        "temperature": 0,
        "max_tokens": tokens,
    }
    started = time.perf_counter()
    conn.request("POST", "/chat", body=json.dumps(payload))
    body = conn.getresponse().read()
    elapsed = time.perf_counter() - started
    conn.close()
    events = [e for e in body.split(b"\n\n") if e and e != b"data: [DONE]"]
    usage = json.loads(events[-1].removeprefix(b"data: "))["usage"]
    return float(usage["completion_tokens"]) / elapsed


def _gateway_pids(proc: subprocess.Popen[bytes]) -> list[int]:
    """The supervisor, the server and Envoy: the processes under test."""
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        children = []
    return [proc.pid, *(child.pid for child in children)]


def run_envoy(
    *,
    calls: int = CALLS,
    tokens: int = CHAT_TOKENS,
    repeats: int = REPEATS,
    say: Callable[[str], object] = say,
) -> EnvoyResult:
    """Start the gateway, measure every path, stop it."""
    log = Path(tempfile.mkdtemp(prefix="glm-bench-envoy-")) / "gateway.log"
    proc, grpc_port, http_port = start_gateway(log)
    grpc_target = f"127.0.0.1:{grpc_port}"
    say(f"envoy: python -m gateway (pid {proc.pid}): JSON on :{http_port}, gRPC on {grpc_target}")
    load = BackgroundLoad(*_gateway_pids(proc))
    before = load.snapshot()
    unary = []
    try:
        with (
            GlmClient(grpc_target) as direct,
            contextlib.closing(JsonHttpClient("127.0.0.1", http_port)) as http,
            contextlib.closing(GrpcH2Client("127.0.0.1", grpc_port)) as wire,
            contextlib.closing(GrpcH2Client("127.0.0.1", http_port)) as wire_via_envoy,
        ):
            tokenize = pb.TokenizeRequest(prompt=TOKENIZE_TEXT)
            embed = pb.EmbedRequest(prompt=[EMBED_TEXT])
            tokenize_json = {"prompt": TOKENIZE_TEXT}
            embed_json = {"prompt": [EMBED_TEXT]}
            workloads = {
                "tokenize": (
                    json_call(http, "/tokenize", tokenize_json, "tokenIds"),
                    (TOKENIZE, tokenize, pb.TokenizeResponse, "token_ids"),
                    lambda: direct.tokenize(TOKENIZE_TEXT),
                    gateway_call(wire, GATEWAY_TOKENIZE, tokenize_json, "tokenIds"),
                ),
                "embed": (
                    json_call(http, "/embedding", embed_json, "data"),
                    (EMBED, embed, pb.EmbedResponse, "data"),
                    lambda: direct.embed([EMBED_TEXT]),
                    gateway_call(wire, GATEWAY_EMBED, embed_json, "data"),
                ),
            }
            for name, (json_path, rpc, typed_path, gateway_path) in workloads.items():
                say(f"envoy: {name}: {calls} calls per path, the five paths taking turns")
                # The minimal clients work on the calling thread alone; the typed client also
                # on gRPC's threads, so its CPU is the process's (work it does while it waits
                # for the reply, such as answering pings, included).
                samples = measure(
                    {
                        "json_via_envoy": (json_path, time.thread_time),
                        "direct": (grpc_call(wire, *rpc), time.thread_time),
                        "grpc_via_envoy": (grpc_call(wire_via_envoy, *rpc), time.thread_time),
                        "typed_direct": (typed_path, time.process_time),
                        "gateway_direct": (gateway_path, time.thread_time),
                    },
                    calls,
                )
                unary.append(UnaryResult(name, **samples))

            say(f"envoy: chat: {repeats} x (gRPC stream, SSE stream) of {tokens} greedy tokens")
            grpc_chat_tok_s(direct, 8)  # warm
            direct_rates, envoy_rates = [], []
            for repeat in range(repeats):
                # Each path goes first every other time: the first stream of a pair has been seen
                # to run at a different speed than the second.
                for path in ("direct", "envoy") if repeat % 2 == 0 else ("envoy", "direct"):
                    if path == "direct":
                        direct_rates.append(grpc_chat_tok_s(direct, tokens))
                    else:
                        envoy_rates.append(sse_chat_tok_s(http_port, tokens))
        busy = load.cores_between(before, load.snapshot())
    finally:
        stop_gateway(proc)
    return EnvoyResult(
        tuple(unary),
        statistics.median(direct_rates),
        statistics.median(envoy_rates),
        busy,
    )


def bench_envoy(
    *, tokens: int, repeats: int, say: Callable[[str], object] = say
) -> tuple[dict[str, Any], list[Metric]]:
    """`python -m bench`'s Envoy section: its JSON and its table lines (its own gateway)."""
    say(
        f"envoy: JSON via Envoy vs direct gRPC: Tokenize and Embed latency ({CALLS} calls per "
        f"path), then {repeats} x {tokens}-token chat streams"
    )
    result = run_envoy(calls=CALLS, tokens=tokens, repeats=repeats, say=say)
    return result.as_dict(), result.metrics()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the Envoy benchmark on its own and print its table."""
    parser = argparse.ArgumentParser(prog="python -m bench.envoy", description=__doc__)
    parser.add_argument(
        "--calls", type=int, default=CALLS, help="sequential calls per path (%(default)s)"
    )
    parser.add_argument(
        "--tokens", type=int, default=CHAT_TOKENS, help="tokens per chat stream (%(default)s)"
    )
    parser.add_argument(
        "--repeats", type=int, default=REPEATS, help="chat streams per path (%(default)s)"
    )
    args = parser.parse_args(argv)
    for name in ("calls", "tokens", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    result = run_envoy(calls=args.calls, tokens=args.tokens, repeats=args.repeats)
    say("")
    say(format_table(result.metrics()))
    if result.background_cores > BUSY_CORES_LIMIT:
        say(
            f"\n* other processes kept {result.background_cores:.2f} cores busy (more than "
            f"{BUSY_CORES_LIMIT}): latencies on a busy machine run high; re-run on a quiet one"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

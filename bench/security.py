"""The cost of security, in one run: `python -m bench.security` (or `python -m bench --only
security`, part of `all`).

Starts two `python -m gateway` pairs (server + Envoy) side by side on free ports: one in
plaintext without API keys, one with an API keys file and TLS on every hop (Envoy's port, the
gRPC port and Envoy's hop to the server; `--mtls` adds client certificates), certificates made
with trustme. Then, interleaved call by call so that both see the same machine load:
- Tokenize and Embed: the median latency of sequential calls on three paths each: gRPC direct,
  gRPC through Envoy (both with GlmClient, the same client for both setups), and the legacy JSON
  route through Envoy (one kept-alive http.client connection, HTTP/1.1 or HTTPS);
- chat: tokens/s of greedy streams, gRPC direct and SSE through Envoy, the setups taking turns.
Each secure figure is printed with its plaintext twin and their ratio.

Both servers run with OMP_WAIT_POLICY=PASSIVE: side by side on a small machine, each one's
OpenMP threads would otherwise spin on the cores after every call and slow the other's next
call, which the turns give to the other server every time.
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
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import psutil

from bench.load import BUSY_CORES_LIMIT, BackgroundLoad
from bench.report import Metric, Say, Section, Target, format_table
from bench.server_process import PROJECT_ROOT, free_port
from clients import GlmClient, tls_credentials

CHAT_PROMPT = "Write a long story about a lighthouse keeper."
TOKENIZE_TEXT = "Hello world, how are you today?"
EMBED_TEXT = "The cat sits on the mat."
CALLS = 300
WARMUP_CALLS = 20
CHAT_TOKENS = 128
REPEATS = 3
START_TIMEOUT_S = 600.0
# A stream's deadline: long, since a busy machine can slow generation many times over.
STREAM_TIMEOUT_S = 1800.0

CHAT_RATIO_TARGET = Target(">=", 0.95)
TOKENIZE_RATIO_TARGET = Target("<", 1.15)

say = functools.partial(print, flush=True)


@dataclass
class Setup:
    """One running gateway and how its clients reach it."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    grpc_port: int
    http_port: int
    # None: plaintext.
    ca: Path | None = None
    client_cert: tuple[Path, Path] | None = None
    api_key: str | None = None

    @property
    def host(self) -> str:
        # The certificate is for localhost (and 127.0.0.1); plaintext dials the address.
        return "localhost" if self.ca else "127.0.0.1"

    def ssl_context(self) -> ssl.SSLContext | None:
        if self.ca is None:
            return None
        context = ssl.create_default_context(cafile=str(self.ca))
        if self.client_cert is not None:
            context.load_cert_chain(*self.client_cert)
        return context

    def grpc_client(self, port: int) -> GlmClient:
        credentials = None
        if self.ca is not None:
            cert, key = self.client_cert or (None, None)
            credentials = tls_credentials(self.ca, cert, key)
        return GlmClient(f"{self.host}:{port}", api_key=self.api_key or "", credentials=credentials)

    def http(self) -> http.client.HTTPConnection:
        context = self.ssl_context()
        if context is None:
            return http.client.HTTPConnection(self.host, self.http_port, timeout=300)
        return http.client.HTTPSConnection(self.host, self.http_port, context=context, timeout=300)

    def headers(self) -> dict[str, str]:
        headers = {"content-type": "application/json"}
        if self.api_key:
            headers["authorization"] = f"Bearer {self.api_key}"
        return headers


def _start(name: str, folder: Path, settings: dict[str, str]) -> Setup:
    grpc_port, http_port = free_port(), free_port()
    log = folder / f"{name}.log"
    env = dict(
        os.environ,
        GLM_GRPC_ADDRESS=f"127.0.0.1:{grpc_port}",
        GLM_HTTP_PORT=str(http_port),
        OMP_WAIT_POLICY="PASSIVE",
        **settings,
    )
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway"],
            cwd=PROJECT_ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Setup(name, proc, log, grpc_port, http_port)


def _healthy(setup: Setup) -> bool:
    scheme = "https" if setup.ca else "http"
    url = f"{scheme}://{setup.host}:{setup.http_port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=2, context=setup.ssl_context()) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def _wait_healthy(setups: Sequence[Setup]) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    for setup in setups:
        while not _healthy(setup):
            if setup.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"{setup.name} gateway did not become healthy:\n"
                    + setup.log.read_text(errors="replace")[-2000:]
                )
            time.sleep(0.5)


def _stop(setup: Setup) -> None:
    if setup.proc.poll() is None:
        setup.proc.send_signal(signal.SIGTERM)
        try:
            setup.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(setup.proc.pid, signal.SIGKILL)
            setup.proc.wait()


@contextlib.contextmanager
def running_setups(folder: Path, mtls: bool) -> Iterator[tuple[Setup, Setup]]:
    """The plaintext and the secure gateway, started together, always stopped."""
    import trustme  # a test dependency, which `make bench` installs

    from server.auth.keys import append_key

    ca, client_ca = trustme.CA(), trustme.CA()
    server = ca.issue_cert("localhost", "127.0.0.1")
    client = client_ca.issue_cert("bench-client")
    files = {
        "ca.pem": ca.cert_pem.bytes(),
        "cert.pem": b"".join(blob.bytes() for blob in server.cert_chain_pems),
        "key.pem": server.private_key_pem.bytes(),
        "client-ca.pem": client_ca.cert_pem.bytes(),
        "client-cert.pem": client.cert_chain_pems[0].bytes(),
        "client-key.pem": client.private_key_pem.bytes(),
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    key = append_key(folder / "api-keys.toml", "bench")
    secure_settings = {
        "GLM_API_KEYS_FILE": str(folder / "api-keys.toml"),
        "GLM_TLS_CERT_FILE": str(folder / "cert.pem"),
        "GLM_TLS_KEY_FILE": str(folder / "key.pem"),
    }
    if mtls:
        secure_settings["GLM_TLS_CLIENT_CA_FILE"] = str(folder / "client-ca.pem")
    plain = secure = None
    try:
        plain = _start("plaintext", folder, {})
        secure = _start("secure", folder, secure_settings)
        secure.ca = folder / "ca.pem"
        secure.api_key = key
        if mtls:
            secure.client_cert = (folder / "client-cert.pem", folder / "client-key.pem")
        _wait_healthy([plain, secure])
        yield plain, secure
    finally:
        for setup in (plain, secure):
            if setup is not None:
                _stop(setup)


# -- measuring ---------------------------------------------------------------------------------


@dataclass
class Latencies:
    """Each path's call latencies in seconds, by path name."""

    samples: dict[str, list[float]] = field(default_factory=dict)

    def median_ms(self, path: str) -> float:
        return statistics.median(self.samples[path]) * 1000


def measure(paths: dict[str, Callable[[], object]], calls: int) -> Latencies:
    """`calls` sequential calls per path, the paths taking turns in a new random order each round
    (the same load for all, and the same predecessors on average)."""
    names = list(paths)
    for name in names:
        for _ in range(WARMUP_CALLS):
            paths[name]()
    order = random.Random(0)
    result = Latencies({name: [] for name in names})
    for _ in range(calls):
        order.shuffle(names)
        for name in names:
            started = time.perf_counter()
            paths[name]()
            result.samples[name].append(time.perf_counter() - started)
    return result


def json_call(
    setup: Setup, conn: http.client.HTTPConnection, path: str, body: object, key: str
) -> Callable[[], None]:
    """One JSON POST on a kept-alive connection that must answer 200 with `key` in its body."""
    payload = json.dumps(body).encode()
    headers = setup.headers()

    def call() -> None:
        conn.request("POST", path, body=payload, headers=headers)
        response = conn.getresponse()
        data = response.read()
        if response.status != 200 or key.encode() not in data:
            raise RuntimeError(f"{setup.name} {path}: {response.status} {data[:200]!r}")

    return call


def grpc_chat_tok_s(client: GlmClient, tokens: int) -> float:
    started = time.perf_counter()
    result = client.chat_text(
        [("user", CHAT_PROMPT)], temperature=0.0, max_tokens=tokens, timeout=STREAM_TIMEOUT_S
    )
    return result.usage.completion_tokens / (time.perf_counter() - started)


def sse_chat_tok_s(setup: Setup, tokens: int) -> float:
    conn = setup.http()
    conn.timeout = STREAM_TIMEOUT_S
    payload = {
        "messages": [{"role": "user", "content": CHAT_PROMPT}],
        "temperature": 0,
        "max_tokens": tokens,
        "stream": True,  # the legacy /chat answers one object unless asked to stream
    }
    started = time.perf_counter()
    conn.request("POST", "/chat", body=json.dumps(payload), headers=setup.headers())
    body = conn.getresponse().read()
    elapsed = time.perf_counter() - started
    conn.close()
    events = [e for e in body.split(b"\r\n\r\n") if e.startswith(b"data: {")]
    usage = json.loads(events[-1].removeprefix(b"data: "))["usage"]
    return float(usage["completion_tokens"]) / elapsed


@dataclass(frozen=True, slots=True)
class SecurityResult:
    """Everything one run measured: medians in ms and chat tokens/s, by "<setup> <path>"."""

    latency_ms: dict[str, float]
    chat_tok_s: dict[str, float]
    background_cores: float
    mtls: bool

    def metrics(self) -> list[Metric]:
        metrics: list[Metric] = []
        label = "keys+mTLS" if self.mtls else "keys+TLS"
        for rpc in ("tokenize", "embed"):
            for path in ("direct gRPC", "gRPC via Envoy", "JSON via Envoy"):
                plain = self.latency_ms[f"plaintext {rpc} {path}"]
                secure = self.latency_ms[f"secure {rpc} {path}"]
                target = TOKENIZE_RATIO_TARGET if rpc == "tokenize" else None
                metrics += [
                    Metric(f"security: {rpc} {path}, plaintext median", plain, "ms"),
                    Metric(f"security: {rpc} {path}, {label} median", secure, "ms"),
                    Metric(
                        f"security: {rpc} {path}, {label} / plaintext",
                        secure / plain,
                        "x",
                        target,
                        3,
                    ),
                ]
        for path in ("direct gRPC", "SSE via Envoy"):
            plain = self.chat_tok_s[f"plaintext {path}"]
            secure = self.chat_tok_s[f"secure {path}"]
            metrics += [
                Metric(f"security: chat {path}, plaintext", plain, "tok/s", digits=1),
                Metric(f"security: chat {path}, {label}", secure, "tok/s", digits=1),
                Metric(
                    f"security: chat {path}, {label} / plaintext",
                    secure / plain,
                    "",
                    CHAT_RATIO_TARGET,
                    3,
                ),
            ]
        metrics.append(
            Metric("security: other processes' CPU load", self.background_cores, "cores")
        )
        if self.background_cores > BUSY_CORES_LIMIT:
            metrics = [replace(m, noisy=True) for m in metrics]
        return metrics

    def as_dict(self) -> dict[str, Any]:
        return {
            "latency_ms": self.latency_ms,
            "chat_tok_s": self.chat_tok_s,
            "background_cores": self.background_cores,
            "mtls": self.mtls,
        }


def _process_tree(setups: Sequence[Setup]) -> list[int]:
    pids = []
    for setup in setups:
        pids.append(setup.proc.pid)
        with contextlib.suppress(psutil.Error):
            pids += [c.pid for c in psutil.Process(setup.proc.pid).children(recursive=True)]
    return pids


def run_security(
    *,
    calls: int = CALLS,
    tokens: int = CHAT_TOKENS,
    repeats: int = REPEATS,
    mtls: bool = False,
    say: Callable[[str], object] = say,
) -> SecurityResult:
    """Start both gateways, measure every path on both, stop them."""
    folder = Path(tempfile.mkdtemp(prefix="glm-bench-security-"))
    with running_setups(folder, mtls) as (plain, secure):
        say(
            f"security: plaintext gateway (gRPC :{plain.grpc_port}, HTTP :{plain.http_port}), "
            f"{'keys+mTLS' if mtls else 'keys+TLS'} gateway (gRPC :{secure.grpc_port}, "
            f"HTTPS :{secure.http_port}); logs in {folder}"
        )
        load = BackgroundLoad(*_process_tree([plain, secure]))
        before = load.snapshot()
        latency: dict[str, float] = {}
        chat: dict[str, list[float]] = {}
        with contextlib.ExitStack() as stack:
            clients: dict[str, tuple[GlmClient, GlmClient, http.client.HTTPConnection]] = {}
            for setup in (plain, secure):
                direct = stack.enter_context(setup.grpc_client(setup.grpc_port))
                via_envoy = stack.enter_context(setup.grpc_client(setup.http_port))
                conn = setup.http()
                stack.callback(conn.close)
                clients[setup.name] = (direct, via_envoy, conn)
            for rpc in ("tokenize", "embed"):
                paths: dict[str, Callable[[], object]] = {}
                for setup in (plain, secure):
                    direct, via_envoy, conn = clients[setup.name]
                    if rpc == "tokenize":
                        paths |= {
                            f"{setup.name} {rpc} direct gRPC": functools.partial(
                                direct.tokenize, TOKENIZE_TEXT
                            ),
                            f"{setup.name} {rpc} gRPC via Envoy": functools.partial(
                                via_envoy.tokenize, TOKENIZE_TEXT
                            ),
                            f"{setup.name} {rpc} JSON via Envoy": json_call(
                                setup, conn, "/tokenize", {"prompt": TOKENIZE_TEXT}, "tokenIds"
                            ),
                        }
                    else:
                        paths |= {
                            f"{setup.name} {rpc} direct gRPC": functools.partial(
                                direct.embed, [EMBED_TEXT]
                            ),
                            f"{setup.name} {rpc} gRPC via Envoy": functools.partial(
                                via_envoy.embed, [EMBED_TEXT]
                            ),
                            f"{setup.name} {rpc} JSON via Envoy": json_call(
                                setup, conn, "/embedding", {"prompt": [EMBED_TEXT]}, "data"
                            ),
                        }
                say(f"security: {rpc}: {calls} calls per path, {len(paths)} paths taking turns")
                measured = measure(paths, calls)
                latency |= {name: measured.median_ms(name) for name in paths}
                say("  medians: " + ", ".join(f"{n} {latency[n]:.3f} ms" for n in paths))

            say(f"security: chat: {repeats} x 4 streams of {tokens} greedy tokens, taking turns")
            grpc_chat_tok_s(clients["plaintext"][0], 8)  # warm
            grpc_chat_tok_s(clients["secure"][0], 8)
            runs: list[tuple[str, Callable[[], float]]] = []
            for setup in (plain, secure):
                direct = clients[setup.name][0]
                runs.append(
                    (
                        f"{setup.name} direct gRPC",
                        functools.partial(grpc_chat_tok_s, direct, tokens),
                    )
                )
                runs.append(
                    (
                        f"{setup.name} SSE via Envoy",
                        functools.partial(sse_chat_tok_s, setup, tokens),
                    )
                )
            order = random.Random(1)
            for _ in range(repeats):
                order.shuffle(runs)
                for name, run in runs:
                    chat.setdefault(name, []).append(run())
                    say(f"  {name}: {chat[name][-1]:.1f} tok/s")
        busy = load.cores_between(before, load.snapshot())
    return SecurityResult(
        latency, {name: statistics.median(rates) for name, rates in chat.items()}, busy, mtls
    )


def run(args: argparse.Namespace, say: Say) -> Section:
    """The security part of `python -m bench` (its own gateways: keys + TLS, and plaintext)."""
    say(
        f"security: keys + TLS against plaintext, {args.calls} calls per path, "
        f"{args.repeats} streams"
    )
    result = run_security(calls=args.calls, tokens=args.tokens, repeats=args.repeats, say=say)
    return Section(result.as_dict(), result.metrics())


def main(argv: Sequence[str] | None = None) -> int:
    """Run the security benchmark on its own and print its table."""
    parser = argparse.ArgumentParser(prog="python -m bench.security", description=__doc__)
    parser.add_argument("--calls", type=int, default=CALLS, help="calls per path (%(default)s)")
    parser.add_argument("--tokens", type=int, default=CHAT_TOKENS, help="tokens per stream")
    parser.add_argument("--repeats", type=int, default=REPEATS, help="streams per path")
    parser.add_argument("--mtls", action="store_true", help="require client certificates too")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results here")
    args = parser.parse_args(argv)
    for name in ("calls", "tokens", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    result = run_security(
        calls=args.calls, tokens=args.tokens, repeats=args.repeats, mtls=args.mtls
    )
    say("")
    say(format_table(result.metrics()))
    if args.json is not None:
        args.json.write_text(json.dumps(result.as_dict(), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

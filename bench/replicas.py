"""Replicas part: aggregate throughput of 1, 2 and 3 server replicas behind one Envoy, and what a
replica's loss costs.

For each replica count, ``python -m gateway --replicas N`` (as ``GLM_REPLICAS=N make run``) runs
with the default models and, once every replica serves, gets a fixed span of concurrent Embed
calls through Envoy (calls/s), then concurrent greedy chat streams (tokens/s, all streams
together). The replicas share this machine's cores (each gets its share of torch threads), so on
a machine with few cores the throughput is expected to stay flat: more replicas add throughput
only where cores are left idle by one.

Failover, on the 3-replica gateway: under the same Embed load, one replica is killed (SIGKILL).
Reported: Embed calls that failed (the target is none: Envoy retries them on another replica),
the seconds until Envoy's /healthz no longer counts the killed replica (its health checks
ejected it), and the seconds until the supervisor's restart of it serves again.

    python -m bench --only replicas     (or: python -m bench.replicas)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psutil

from bench import defaults
from bench.chat_stream import glm_stub, read_greedy_stream
from bench.load import BackgroundLoad, is_noisy
from bench.report import Metric, Say, Section, Target, flagged
from bench.server_process import PROJECT_ROOT, free_port
from glm.v1 import glm_service_pb2 as pb

REPLICA_COUNTS = (1, 2, 3)
EMBED_TEXT = "The cat sits on the mat."
# Seconds of Embed load per replica count, and around the kill.
EMBED_SPAN_S = 10.0
FAILOVER_AFTER_KILL_S = 6.0
# Concurrent chat streams per replica count.
CHAT_STREAMS = 3
# Loading the models in every replica at once on a shared machine takes minutes.
START_TIMEOUT_S = 900.0


def _ephemeral_ports() -> tuple[int, int]:
    """The range the kernel picks outgoing connections' local ports from."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def consecutive_free_ports(count: int) -> int:
    """The first of `count` consecutive TCP ports that were all free a moment ago.

    They lie below the ephemeral range: a replica that dies and is started again binds its port
    anew, and an outgoing connection must not have taken that port in the meantime.
    """
    low, _ = _ephemeral_ports()
    floor = 10000 if low > 10000 + 1000 else 1024
    for _ in range(200):
        first = random.randrange(floor, low - count)
        socks: list[socket.socket] = []
        try:
            for port in range(first, first + count):
                sock = socket.socket()
                socks.append(sock)
                sock.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError(f"no {count} free ports in a row")


def child_serving(gateway_pid: int, address: str) -> int:
    """The process id of the gateway's replica on gRPC `address` (it changes on a restart)."""
    for child in psutil.Process(gateway_pid).children():
        try:
            # Envoy inherits the gateway's environment, GLM_GRPC_ADDRESS included (replica 0's):
            # only a server process counts.
            if child.cmdline()[-2:] != ["-m", "server"]:
                continue
            if child.environ().get("GLM_GRPC_ADDRESS") == address:
                return int(child.pid)
        except psutil.Error:  # a child that is gone, or not ours to read
            continue
    raise LookupError(f"no replica on {address}")


@dataclass
class Gateway:
    """A running `python -m gateway --replicas N`."""

    proc: subprocess.Popen[bytes]
    replicas: int
    first_grpc_port: int
    http_port: int
    log: Path

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    def healthz(self) -> dict[str, Any]:
        url = f"http://127.0.0.1:{self.http_port}/healthz"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                body: dict[str, Any] = json.loads(response.read())
        except urllib.error.HTTPError as exc:
            body = json.loads(exc.read())
        except (OSError, ValueError):
            return {"replicas_serving": -1}
        return body

    def wait_serving(self, count: int, timeout: float) -> float:
        """Seconds until /healthz counts `count` serving replicas."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError("the gateway exited:\n" + self.log.read_text()[-2000:])
            if self.healthz().get("replicas_serving") == count:
                return time.monotonic() - started
            time.sleep(0.05)
        raise RuntimeError(f"/healthz never counted {count} replicas: {self.healthz()}")

    def replica_pid(self, index: int) -> int:
        return child_serving(self.proc.pid, f"127.0.0.1:{self.first_grpc_port + index}")

    def pids(self) -> list[int]:
        try:
            children = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            children = []
        return [self.proc.pid, *(c.pid for c in children)]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def start_gateway(replicas: int, folder: Path) -> Gateway:
    first, http_port = consecutive_free_ports(replicas), free_port()
    log = folder / f"gateway-{replicas}.log"
    env = dict(
        os.environ,
        GLM_GRPC_ADDRESS=f"127.0.0.1:{first}",
        GLM_HTTP_PORT=str(http_port),
        GLM_REPLICAS=str(replicas),
    )
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway"],
            cwd=PROJECT_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    gateway = Gateway(proc, replicas, first, http_port, log)
    try:
        gateway.wait_serving(replicas, START_TIMEOUT_S)
    except BaseException:
        gateway.stop()
        raise
    return gateway


@dataclass
class EmbedLoad:
    """Embed calls in a loop on `workers` threads, through Envoy, until stopped."""

    target: str
    workers: int
    ok: list[float] = field(default_factory=list)
    failed: list[tuple[float, str]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _worker(self) -> None:
        with grpc.insecure_channel(self.target) as channel:
            stub = glm_stub(channel)
            request = pb.EmbedRequest(prompt=[EMBED_TEXT])
            while not self._stop.is_set():
                try:
                    stub.Embed(request, timeout=60)
                except grpc.RpcError as exc:
                    with self._lock:
                        self.failed.append((time.monotonic(), exc.code().name))
                else:
                    with self._lock:
                        self.ok.append(time.monotonic())

    def start(self) -> EmbedLoad:
        for _ in range(self.workers):
            thread = threading.Thread(target=self._worker, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=120)


def embed_calls_per_s(gateway: Gateway, workers: int, span_s: float) -> float:
    load = EmbedLoad(gateway.target, workers).start()
    time.sleep(1.0)  # connections open, batches forming
    start = time.monotonic()
    time.sleep(span_s)
    end = time.monotonic()
    load.stop()
    if load.failed:
        raise RuntimeError(f"Embed calls failed: {load.failed[:3]}")
    return sum(1 for t in load.ok if start <= t < end) / (end - start)


def chat_tok_s(gateway: Gateway, streams: int, tokens: int) -> float:
    """Tokens/s of `streams` concurrent greedy streams together."""
    results: list[int] = []
    errors: list[BaseException] = []

    def one() -> None:
        with grpc.insecure_channel(gateway.target) as channel:
            read = read_greedy_stream(
                glm_stub(channel), defaults.DEFAULT_PROMPT, tokens, timeout_s=600.0
            )
        if read.error is not None:
            errors.append(read.error)
        else:
            results.append(read.completion_tokens)

    threads = [threading.Thread(target=one) for _ in range(streams)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    if errors:
        raise RuntimeError(f"chat streams failed: {errors[0]}")
    return sum(results) / elapsed


@dataclass(frozen=True, slots=True)
class Failover:
    """What killing one of the replicas cost."""

    calls_ok: int
    calls_failed: int
    eject_s: float
    rejoin_s: float
    # The status codes of the calls lost, by count.
    failed_codes: dict[str, int]


def failover(gateway: Gateway, workers: int) -> Failover:
    load = EmbedLoad(gateway.target, workers).start()
    time.sleep(2.0)
    os.kill(gateway.replica_pid(gateway.replicas - 1), signal.SIGKILL)
    eject_s = gateway.wait_serving(gateway.replicas - 1, 60)
    time.sleep(FAILOVER_AFTER_KILL_S)
    load.stop()
    rejoin_s = gateway.wait_serving(gateway.replicas, START_TIMEOUT_S)
    codes = Counter(code for _, code in load.failed)
    return Failover(len(load.ok), len(load.failed), eject_s, rejoin_s, dict(codes))


@dataclass(frozen=True, slots=True)
class ReplicasResult:
    embed_calls_s: dict[int, float]
    chat_tok_s: dict[int, float]
    failover: Failover
    background_cores: float

    def metrics(self) -> list[Metric]:
        one = self.embed_calls_s[1]
        metrics = [
            Metric(f"replicas: Embed calls/s, {n} replicas", v, "calls/s", digits=1)
            for n, v in self.embed_calls_s.items()
        ]
        metrics += [
            Metric(f"replicas: Embed calls/s, {n} / 1 replica", v / one, digits=2)
            for n, v in self.embed_calls_s.items()
            if n > 1
        ]
        metrics += [
            Metric(f"replicas: chat tok/s, {n} replicas ({CHAT_STREAMS} streams)", v, "tok/s")
            for n, v in self.chat_tok_s.items()
        ]
        f = self.failover
        metrics += [
            Metric(
                "replicas: Embed calls lost to a SIGKILL", f.calls_failed, target=Target("<", 1)
            ),
            Metric("replicas: Embed calls served around the kill", f.calls_ok, digits=0),
            Metric("replicas: seconds until Envoy ejects the killed one", f.eject_s, "s"),
            Metric("replicas: seconds until its restart serves", f.rejoin_s, "s", digits=1),
            Metric("replicas: other processes' CPU load", self.background_cores, "cores"),
        ]
        return flagged(metrics, is_noisy(self.background_cores))

    def as_dict(self) -> dict[str, Any]:
        return {
            "embed_calls_s": {str(k): v for k, v in self.embed_calls_s.items()},
            "chat_tok_s": {str(k): v for k, v in self.chat_tok_s.items()},
            "failover": {
                "calls_ok": self.failover.calls_ok,
                "calls_failed": self.failover.calls_failed,
                "eject_s": self.failover.eject_s,
                "rejoin_s": self.failover.rejoin_s,
                "failed_codes": self.failover.failed_codes,
            },
            "background_cores": self.background_cores,
        }


def run_replicas(*, workers: int, tokens: int, say: Say) -> ReplicasResult:
    embed: dict[int, float] = {}
    chat: dict[int, float] = {}
    busy = 0.0
    lost: Failover | None = None
    with tempfile.TemporaryDirectory(prefix="glm-bench-replicas-") as tmp:
        for count in REPLICA_COUNTS:
            say(f"replicas: starting {count} replica(s)")
            gateway = start_gateway(count, Path(tmp))
            try:
                load = BackgroundLoad(*gateway.pids())
                before = load.snapshot()
                embed[count] = embed_calls_per_s(gateway, workers, EMBED_SPAN_S)
                say(f"replicas: {count}: {embed[count]:.1f} Embed calls/s ({workers} callers)")
                chat[count] = chat_tok_s(gateway, CHAT_STREAMS, tokens)
                say(f"replicas: {count}: {chat[count]:.1f} chat tok/s ({CHAT_STREAMS} streams)")
                busy = max(busy, load.cores_between(before, load.snapshot()))
                if count == REPLICA_COUNTS[-1]:
                    lost = failover(gateway, workers)
                    say(f"replicas: failover: {lost}")
            finally:
                gateway.stop()
    assert lost is not None
    return ReplicasResult(embed, chat, lost, busy)


def run(args: argparse.Namespace, say: Say) -> Section:
    """The replicas part (its own gateways)."""
    say(
        f"replicas: {', '.join(map(str, REPLICA_COUNTS))} replicas behind Envoy: Embed calls/s "
        f"({args.concurrency} callers, {EMBED_SPAN_S:.0f} s), {CHAT_STREAMS} x {args.tokens}-token "
        "chat streams, then a SIGKILL under Embed load"
    )
    result = run_replicas(workers=args.concurrency, tokens=args.tokens, say=say)
    return Section(result.as_dict(), result.metrics())


if __name__ == "__main__":
    from bench.__main__ import main

    sys.exit(main(["--only", "replicas", *sys.argv[1:]]))

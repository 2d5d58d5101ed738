"""``python -m server`` as a child process: start it on a free port, wait for health, measure it.

The server runs in its own process, as in production, so that the benchmark measures the real
transport (HTTP/2 over loopback, protobuf, the grpc.aio event loop) and so that its memory can be
read without the benchmark's own models in it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.report import Metric

PROJECT_ROOT = Path(__file__).resolve().parent.parent
_SERVING = health_pb2.HealthCheckResponse.SERVING
MIB = 1024 * 1024


def mib(value: int | None) -> float | None:
    """Bytes in MiB, None staying None."""
    return None if value is None else value / MIB


class ServerError(RuntimeError):
    """The server process did not start, or died; the message ends with the tail of its log."""


def free_port(host: str = "127.0.0.1") -> int:
    """A port that nothing listens on right now.

    Another process could take it before the server binds it; the server refuses to share a port
    (grpc.so_reuseport is off), so that race shows up as an early exit, not as wrong numbers.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def read_vm_hwm(pid: int) -> int | None:
    """The peak resident set of a process in bytes (VmHWM), or None where /proc has no such file.

    The kernel keeps this high-water mark itself, so short peaks between samples are not missed.
    """
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024  # the kernel reports kB
    return None


class _RssSampler(threading.Thread):
    """Samples a process's RSS with psutil: the fallback where /proc has no VmHWM (not Linux)."""

    def __init__(self, pid: int, interval_s: float = 0.1) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self._process = psutil.Process(pid)
        self._interval_s = interval_s
        self._stop = threading.Event()
        self.peak_bytes = 0

    def run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak_bytes = max(self.peak_bytes, self._process.memory_info().rss)
            except psutil.Error:
                return  # the process is gone
            self._stop.wait(self._interval_s)

    def stop(self) -> None:
        self._stop.set()


class ChildProcess(ABC):
    """A benchmarked child process; `with` starts it and always stops it.

    A peer server the benchmark starts itself (an OpenAI-compatible one for bench/streams.py)
    is one of these too.
    """

    # The child's stdout and stderr, a temporary file opened by start() and closed by stop().
    _log: IO[bytes] | None = None

    @abstractmethod
    def start(self) -> None:
        """Start the process (without waiting for it to be ready)."""

    @abstractmethod
    def stop(self) -> int | None:
        """Stop the process; its exit status (None if it never started)."""

    def log_text(self) -> str:
        """The child's log so far ("" when there is none)."""
        if self._log is None or self._log.closed:
            return ""
        self._log.flush()
        self._log.seek(0)
        text = self._log.read().decode(errors="replace")
        self._log.seek(0, os.SEEK_END)
        return text

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the child's log, for error messages."""
        text = self.log_text()
        return "\n".join(text.splitlines()[-lines:]) if text else "(no log)"

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


class ServerProcess(ChildProcess):
    """One ``python -m server`` child. Use as a context manager: it is always stopped on exit.

    Its log goes to a temporary file rather than a pipe: nobody reads a pipe while the benchmark
    runs, and a full pipe would block the server mid-benchmark.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        start_timeout_s: float = 300.0,
        stop_timeout_s: float = 20.0,
        extra_args: tuple[str, ...] = (),
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.host = host
        self.port = free_port(host)
        # The first start converts the GGUF chat model (tens of seconds), so the default is ample.
        self.start_timeout_s = start_timeout_s
        # The server gives in-flight calls shutdown_grace_s (10 s by default) after SIGTERM.
        self.stop_timeout_s = stop_timeout_s
        self.extra_args = extra_args
        # Extra environment for the child (GLM_* settings), on top of this process's own.
        self.env = dict(env or {})
        self.ready_after_s: float | None = None
        self.exit_code: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._sampler: _RssSampler | None = None
        self._started_at = 0.0
        # The peak resident set, read by stop() before the process (and its VmHWM) goes.
        self.final_peak_rss_bytes: int | None = None

    @property
    def target(self) -> str:
        """The host:port clients dial."""
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        """The server's process id."""
        if self._proc is None:
            raise ServerError("the server process was not started")
        return self._proc.pid

    def start(self) -> None:
        """Launch the server; returns at once (call wait_ready() before using it)."""
        env = {**os.environ, **self.env, "GLM_GRPC_ADDRESS": self.target}
        self._log = tempfile.TemporaryFile(prefix="glm-bench-server-")  # noqa: SIM115 (closed in stop)
        self._started_at = time.monotonic()
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "server", *self.extra_args],
            cwd=PROJECT_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self._sampler = _RssSampler(self._proc.pid)
        self._sampler.start()

    def wait_ready(self) -> float:
        """Block until grpc.health.v1 reports SERVING; returns the seconds since start()."""
        if self._proc is None:
            raise ServerError("the server process was not started")
        deadline = self._started_at + self.start_timeout_s
        with grpc.insecure_channel(self.target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while True:
                code = self._proc.poll()
                if code is not None:
                    raise ServerError(f"the server exited with status {code}:\n{self.log_tail()}")
                if time.monotonic() > deadline:
                    raise ServerError(
                        f"the server was not SERVING after {self.start_timeout_s:.0f} s:\n"
                        f"{self.log_tail()}"
                    )
                # UNAVAILABLE before the port is bound, NOT_SERVING while the models load.
                with contextlib.suppress(grpc.RpcError):
                    reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                    if reply.status == _SERVING:
                        break
                time.sleep(0.2)
        self.ready_after_s = time.monotonic() - self._started_at
        return self.ready_after_s

    def peak_rss_bytes(self) -> int | None:
        """The server's peak resident set so far: VmHWM, or the psutil samples' maximum."""
        if self._proc is None:
            return None
        hwm = read_vm_hwm(self._proc.pid)
        if hwm is not None:
            return hwm
        return self._sampler.peak_bytes if self._sampler is not None else None

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after stop_timeout_s; returns the exit code. Safe to call twice."""
        if self._sampler is not None:
            self._sampler.stop()
        proc = self._proc
        if proc is not None and proc.poll() is None:
            self.final_peak_rss_bytes = self.peak_rss_bytes()
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc is not None:
            self.exit_code = proc.returncode
        if self._log is not None:
            self._log.close()
        return self.exit_code

    def figures(self) -> dict[str, Any]:
        """Start-up time, peak memory and exit status, for the JSON file (after stop())."""
        return {
            "ready_s": self.ready_after_s,
            "peak_rss_bytes": self.final_peak_rss_bytes,
            "exit_code": self.exit_code,
        }

    def metrics(self, part: str) -> list[Metric]:
        """Start-up time and peak memory as table lines of `part` (after stop())."""
        return [
            Metric(f"{part}: server start to SERVING", self.ready_after_s, "s", digits=1),
            Metric(f"{part}: server peak RSS", mib(self.final_peak_rss_bytes), "MiB", digits=0),
        ]

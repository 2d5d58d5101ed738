"""Prometheus metrics, the hooks engines report through, and the per-call record.

Three pieces, each usable without the others:

- `CallRecord`: what one RPC did (request id, model, tokens in and out, time of its first token).
  The transport interceptor opens one per call (server/transport/interceptor.py) and makes it the
  `current_call()` of the call's task; the service fills it in as it learns things; the
  interceptor reads it back for the request log line and the RPC metrics.
- `EngineObserver`: the hooks an engine calls as it works (one call per forward pass). The base
  class does nothing, so engines built without metrics (unit tests, benchmarks) pay nothing.
- `Metrics`: the metric families in a registry of their own, one per GlmApp (several apps run in
  one test process, and the global default registry would make their counters collide), and the
  HTTP endpoint Prometheus scrapes.
"""

from __future__ import annotations

import contextvars
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.gc_collector import GCCollector
from prometheus_client.metrics_core import Metric
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from server.errors import PermissionDeniedError

__all__ = [
    "NULL_OBSERVER",
    "CallRecord",
    "EngineObserver",
    "Metrics",
    "MetricsServer",
    "current_call",
    "open_call",
]

# -- the per-call record ---------------------------------------------------------------------------


@dataclass(slots=True)
class CallRecord:
    """What one call did, filled in while it runs (all times are time.monotonic())."""

    rpc: str = ""
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    started: float = field(default_factory=time.monotonic)
    # The model that served the call ('' until the service has resolved it).
    model: str = ""
    # Prompt tokens and generated tokens, once known (None: not applicable or not known).
    tokens_in: int | None = None
    tokens_out: int | None = None
    # When the first generated text was ready (chat only).
    first_token_at: float | None = None
    # The status the call really ended with when its handler answers errors itself (the JSON
    # gateway reports them as HTTP statuses inside an OK gRPC call); None: the gRPC status.
    status: str | None = None
    # The name of the caller's API key (None: keys are off); never the key itself.
    key: str | None = None
    # The models the caller's key may use (None: any), set by server/transport/auth.py.
    allowed_models: frozenset[str] | None = None

    def note_model(self, model_id: str) -> None:
        """Record the model that serves the call, once the service has resolved it.

        Every RPC resolves its model and notes it here before doing any work, which makes this
        the one place where a key's model allow-list is enforced: PermissionDeniedError.
        """
        if self.allowed_models is not None and model_id not in self.allowed_models:
            raise PermissionDeniedError(
                f"API key {self.key!r} may not use model {model_id!r}", param="model"
            )
        self.model = model_id

    def note_first_token(self) -> None:
        """Record that the first generated text is ready (the first call wins)."""
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()

    def note_usage(self, tokens_in: int, tokens_out: int | None = None) -> None:
        """Record the tokens the call consumed and generated."""
        self.tokens_in = tokens_in
        self.tokens_out = tokens_out

    def note_status(self, status: str) -> None:
        """Record the status of an error the handler answered itself (a gRPC status name)."""
        self.status = status


_CURRENT: contextvars.ContextVar[CallRecord | None] = contextvars.ContextVar(
    "glm_current_call", default=None
)


def open_call(rpc: str, request_id: str | None = None) -> CallRecord:
    """Start the record of a call and make it the current one of the running task.

    grpc.aio runs every call in a task of its own, and a task works on its own copy of the
    context, so the record set here is seen by the handler and by nothing else; it is never reset
    because it goes away with the task.
    """
    record = CallRecord(rpc=rpc) if request_id is None else CallRecord(rpc, request_id)
    _CURRENT.set(record)
    return record


def current_call() -> CallRecord:
    """The record of the call being served.

    Outside a call (the service used in-process, by benchmarks or tests) this is a fresh record
    nobody reads, so that the service can record unconditionally.
    """
    record = _CURRENT.get()
    return record if record is not None else CallRecord()


# -- engine hooks ----------------------------------------------------------------------------------


class EngineObserver:
    """What an engine reports as it works; this base class ignores it all.

    Phases: "prefill" (prompt tokens of new chat sequences), "decode" (one token for each running
    chat sequence), "mixed" (both in one pass), "embed" (a pass of the embedding batcher).
    """

    def forward_pass(
        self,
        *,
        phase: str,
        sequences: int,
        tokens: int,
        seconds: float,
        padded_tokens: int | None = None,
    ) -> None:
        """One forward pass ran.

        sequences: the rows (prompts, sequences) it computed for callers, padding rows excluded.
        tokens: the real tokens it processed. padded_tokens: the tokens it computed padding
        included (rows x longest row for a padded batch); None: the same as `tokens`.
        seconds: its wall time.
        """


NULL_OBSERVER = EngineObserver()


class _ModelObserver(EngineObserver):
    """An EngineObserver that feeds the pass histograms of one model."""

    def __init__(self, metrics: Metrics, model_id: str) -> None:
        self._metrics = metrics
        self._model = model_id

    def forward_pass(
        self,
        *,
        phase: str,
        sequences: int,
        tokens: int,
        seconds: float,
        padded_tokens: int | None = None,
    ) -> None:
        m = self._metrics
        m.pass_sequences.labels(self._model, phase).observe(sequences)
        m.pass_tokens.labels(self._model, phase).observe(tokens)
        m.pass_padded_tokens.labels(self._model, phase).observe(
            tokens if padded_tokens is None else padded_tokens
        )
        m.pass_seconds.labels(self._model, phase).observe(seconds)


# -- queue gauges, read when scraped ---------------------------------------------------------------


class ChatStats(Protocol):
    """What the gauges read from a chat engine (ChatEngine.stats)."""

    @property
    def running(self) -> int:
        """Sequences being generated."""
        ...

    @property
    def waiting(self) -> int:
        """Requests waiting for a slot."""
        ...

    @property
    def prefix_cache_hits(self) -> int:
        """Prompts that reused cached prompt blocks."""
        ...

    @property
    def prefix_cache_tokens_saved(self) -> int:
        """Prompt tokens those cached blocks saved computing."""
        ...


ChatStatsSource = Callable[[], Mapping[str, ChatStats]]
EmbedWaitingSource = Callable[[], Mapping[str, int]]


class _QueueCollector(Collector):
    """Queue depth and running sequences per model, read from the engines at scrape time.

    Reading at scrape time (instead of engines setting gauges) keeps the gauges right whatever
    path a sequence takes out of the engine, and asks nothing of the engines but `stats`.
    """

    def __init__(self, chat: ChatStatsSource, embed: EmbedWaitingSource) -> None:
        self._chat = chat
        self._embed = embed

    @staticmethod
    def _cache_families() -> tuple[CounterMetricFamily, CounterMetricFamily]:
        hits = CounterMetricFamily(
            "glm_chat_prefix_cache_hits",
            "Chat prompts that reused cached keys and values of a prompt prefix.",
            labels=["model"],
        )
        saved = CounterMetricFamily(
            "glm_chat_prefix_cache_tokens_saved",
            "Prompt tokens whose keys and values came from the prefix cache instead of a pass.",
            labels=["model"],
        )
        return hits, saved

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily]:
        running = GaugeMetricFamily(
            "glm_chat_running_sequences", "Chat sequences being generated.", labels=["model"]
        )
        waiting = GaugeMetricFamily(
            "glm_chat_waiting_requests",
            "Chat requests waiting for a sequence slot (the queue depth).",
            labels=["model"],
        )
        embed = GaugeMetricFamily(
            "glm_embed_waiting_prompts",
            "Prompts accepted by the embedding batcher and not embedded yet.",
            labels=["model"],
        )
        return running, waiting, embed

    def collect(self) -> Iterable[Metric]:
        running, waiting, embed = self._families()
        hits, saved = self._cache_families()
        for model_id, stats in sorted(self._chat().items()):
            running.add_metric([model_id], stats.running)
            waiting.add_metric([model_id], stats.waiting)
            hits.add_metric([model_id], stats.prefix_cache_hits)
            saved.add_metric([model_id], stats.prefix_cache_tokens_saved)
        for model_id, count in sorted(self._embed().items()):
            embed.add_metric([model_id], count)
        return [running, waiting, embed, hits, saved]

    def describe(self) -> Iterable[Metric]:
        # The names only: without describe(), registering would call collect() and so read the
        # engines before they exist.
        return [*self._families(), *self._cache_families()]


# -- the metric families ---------------------------------------------------------------------------

_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64)
_RATE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000)
_ROWS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536)
_PASS_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class Metrics:
    """The server's metric families, in `registry` (a new one by default)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        # Memory, CPU and file descriptors of the process (what the default registry would have).
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self.requests = Counter(
            "glm_requests",
            "Calls by RPC and final status (a gRPC status name; for the JSON routes, the status "
            "of the error they answered with).",
            ["rpc", "status"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "glm_request_duration_seconds",
            "Call duration by RPC, until the last response was sent.",
            ["rpc"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.time_to_first_token = Histogram(
            "glm_chat_time_to_first_token_seconds",
            "From a chat call's arrival to its first generated text (queueing included).",
            ["model"],
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "glm_prompt_tokens",
            "Prompt tokens of completed chat and embedding calls.",
            ["model"],
            registry=r,
        )
        self.generated_tokens = Counter(
            "glm_generated_tokens",
            "Tokens generated by completed chat calls; rate() of it is the aggregate tokens/s.",
            ["model"],
            registry=r,
        )
        self.tokens_per_second = Histogram(
            "glm_chat_tokens_per_second",
            "Per call decode speed: tokens after the first, over the time after the first.",
            ["model"],
            buckets=_RATE_BUCKETS,
            registry=r,
        )
        self.pass_sequences = Histogram(
            "glm_engine_pass_sequences",
            "Sequences (chat) or prompts (embedding) per forward pass: the batch size.",
            ["model", "phase"],
            buckets=_ROWS_BUCKETS,
            registry=r,
        )
        self.pass_tokens = Histogram(
            "glm_engine_pass_tokens",
            "Tokens processed per forward pass (per step), padding excluded.",
            ["model", "phase"],
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        self.pass_padded_tokens = Histogram(
            "glm_engine_pass_padded_tokens",
            "Tokens computed per forward pass, padding included.",
            ["model", "phase"],
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        self.pass_seconds = Histogram(
            "glm_engine_pass_seconds",
            "Wall time of one forward pass.",
            ["model", "phase"],
            buckets=_PASS_SECONDS_BUCKETS,
            registry=r,
        )

        # Per API key, by its name (keys are never labels or log fields).
        self.key_requests = Counter(
            "glm_api_key_requests",
            "Calls by API key name and final status (calls refused for a missing or unknown key "
            "have no key: see glm_requests).",
            ["key", "status"],
            registry=r,
        )
        self.key_tokens = Counter(
            "glm_api_key_tokens",
            "Prompt and generated tokens of finished calls, by API key name.",
            ["key"],
            registry=r,
        )

    def observer(self, model_id: str) -> EngineObserver:
        """The hooks the engine of `model_id` reports through."""
        return _ModelObserver(self, model_id)

    def watch_queues(self, chat: ChatStatsSource, embed: EmbedWaitingSource) -> None:
        """Expose the queue gauges, read from these callables at each scrape (once per registry).

        They run on the metrics server's thread: they must only read.
        """
        self.registry.register(_QueueCollector(chat, embed))

    def observe_call(self, record: CallRecord, status: str, ended: float) -> None:
        """Count a finished call and what its record says it did."""
        self.requests.labels(record.rpc, status).inc()
        self.request_seconds.labels(record.rpc).observe(max(0.0, ended - record.started))
        if record.key is not None:
            self.key_requests.labels(record.key, status).inc()
            used = (record.tokens_in or 0) + (record.tokens_out or 0)
            if used:
                self.key_tokens.labels(record.key).inc(used)
        if not record.model:
            return
        model = record.model
        if record.first_token_at is not None:
            self.time_to_first_token.labels(model).observe(
                max(0.0, record.first_token_at - record.started)
            )
        if record.tokens_in:
            self.prompt_tokens.labels(model).inc(record.tokens_in)
        if record.tokens_out:
            self.generated_tokens.labels(model).inc(record.tokens_out)
            decoding = ended - (record.first_token_at or ended)
            if record.tokens_out > 1 and decoding > 0:
                self.tokens_per_second.labels(model).observe((record.tokens_out - 1) / decoding)


# -- the HTTP endpoint -----------------------------------------------------------------------------


class MetricsServer:
    """Prometheus' text format over HTTP (any path, /metrics by convention) on a daemon thread."""

    def __init__(self, metrics: Metrics, host: str, port: int) -> None:
        # Brackets of an IPv6 literal ("[::]") are grpc_address syntax, not a host name.
        self._httpd: WSGIServer
        self._httpd, self._thread = start_http_server(
            port, addr=host.strip("[]"), registry=metrics.registry
        )
        self.port: int = self._httpd.server_port

    def close(self) -> None:
        """Stop serving and free the port (blocks for up to half a second: call off the loop)."""
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

"""Streams part: N concurrent greedy Chat streams, for each N, against glm-api and its peers.

glm-api runs as a real ``python -m server`` child serving the default chat model alone (a
generated config holding only that model, with a waiting queue long enough for the largest
count), and N streams are opened at once over one gRPC channel. Peers are OpenAI-compatible
servers given with ``--peer NAME=URL`` (serving the same weights, started by the user); each gets
the same workloads through its streaming /chat/completions route, one server at a time. A peer's
memory and CPU are those of the process listening on its URL's port (for a peer behind a proxy,
the proxy's). A peer the benchmark starts itself is a ChildProcess (bench/server_process.py) that
hands out a `Peer` with its process id.

Why these measures:
- aggregate tokens/s (every stream's completion tokens over the wall time from the first send to
  the last end) is what the machine delivers; the ratio N streams / 1 stream says whether
  continuous batching pays off;
- per-stream tokens/s (median) is what one client sees while the others run;
- time to first token (p50, p99) includes the time a request waits for a slot, which is what a
  client waits for when more streams come than run at once (max_concurrent);
- peak resident memory (VmHWM) is read after each workload; counts run in increasing order, so
  the value after N is the peak up to and including N streams.

Every stream is bounded by a deadline, and every loop by a count.
"""

from __future__ import annotations

import argparse
import http.client
import json
import tempfile
import threading
import time
import tomllib
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc
import psutil

from bench import defaults
from bench.chat_stream import glm_stub, read_greedy_stream
from bench.load import BackgroundLoad, is_noisy
from bench.report import Metric, Say, Section, flagged, median, percentile
from bench.server_process import ServerProcess, mib, read_vm_hwm

GLM = "glm-api"
# Warm-up streams (not timed): enough tokens to run prefill and decode steps at every batch size
# up to the compared count, and for a peer to set up whatever it builds on the first request.
_WARMUP_TOKENS = 8
# Generous per-stream deadline: the last of 32 streams waits for three batches of eight first.
_STREAM_TIMEOUT_S = 600.0
# The most SSE lines read from one stream: a few per token (data line, blank line) plus slack.
_SSE_LINES_PER_TOKEN = 4
# The server's log line that names the linear layers' plan.
_PLAN_LOG = "decode linear layers:"


@dataclass(frozen=True, slots=True)
class Peer:
    """An OpenAI-compatible server to compare glm-api with, at `base_url` (OpenAI SDK style)."""

    name: str
    base_url: str
    # The request's "model" field; empty: left out (the peer serves its one model).
    model: str = ""
    # Its process, where known: then its peak memory is read as glm-api's is.
    pid: int | None = None

    @classmethod
    def parse(cls, text: str) -> Peer:
        """NAME=URL, e.g. llama-server=http://127.0.0.1:8080/v1."""
        name, sep, url = text.partition("=")
        parts = urlsplit(url)
        try:
            port = parts.port
        except ValueError:  # not a number
            port = None
        if not sep or not name or parts.scheme != "http" or not parts.hostname or port is None:
            raise ValueError(f"expected NAME=http://HOST:PORT/v1, got {text!r}")
        return cls(name.strip(), url.rstrip("/"))

    def peak_rss_bytes(self) -> int | None:
        """The peer's peak resident set so far, when its process is known."""
        return None if self.pid is None else read_vm_hwm(self.pid)

    def with_listening_pid(self) -> Peer:
        """This peer with the id of the process listening on its port, where one is found."""
        if self.pid is not None:
            return self
        port = urlsplit(self.base_url).port
        try:
            listening = psutil.net_connections(kind="tcp")
        except psutil.Error:  # not allowed to list sockets here
            return self
        for conn in listening:
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
                return replace(self, pid=conn.pid)
        return self


@dataclass(frozen=True, slots=True)
class StreamSample:
    """One stream as its client saw it; times are time.perf_counter() readings.

    Stream i of a workload sent prompt i % len(prompts), so equal indices mean equal prompts.
    """

    stream: int
    sent_at: float
    first_at: float | None
    ended_at: float
    completion_tokens: int
    prompt_tokens: int
    finish_reason: str
    text: str
    error: str = ""

    @property
    def ttft_s(self) -> float:
        """Send to the first content; the whole call if no content came."""
        first = self.ended_at if self.first_at is None else self.first_at
        return first - self.sent_at

    @property
    def tokens_per_s(self) -> float:
        """Completion tokens over the whole call, waiting and prefill included."""
        return self.completion_tokens / max(self.ended_at - self.sent_at, 1e-9)


@dataclass(slots=True)
class Workload:
    """N concurrent streams against one server, and what the machine did meanwhile."""

    server: str
    streams: int
    samples: list[StreamSample]
    peak_rss_bytes: int | None = None
    background_cores: float = 0.0

    @property
    def completed(self) -> list[StreamSample]:
        return [s for s in self.samples if not s.error]

    @property
    def wall_s(self) -> float:
        """From the first send to the last end, over every stream."""
        return max(s.ended_at for s in self.samples) - min(s.sent_at for s in self.samples)

    @property
    def completion_tokens(self) -> int:
        return sum(s.completion_tokens for s in self.samples)

    @property
    def aggregate_tok_s(self) -> float:
        return self.completion_tokens / max(self.wall_s, 1e-9)

    @property
    def per_stream_tok_s(self) -> float | None:
        done = self.completed
        return median([s.tokens_per_s for s in done]) if done else None

    def ttft_ms(self, q: float) -> float | None:
        """The q-th percentile (0-100) of time to first token over the completed streams."""
        done = self.completed
        return 1000 * percentile([s.ttft_s for s in done], q) if done else None

    @property
    def unfinished(self) -> list[StreamSample]:
        """Streams that ended for another reason than max_tokens (or failed)."""
        return [s for s in self.samples if s.error or s.finish_reason != "length"]

    def metrics(self) -> list[Metric]:
        """The workload's table lines."""
        head = f"streams x{self.streams}: {self.server}"
        lines = [
            Metric(f"{head} aggregate", self.aggregate_tok_s, "tok/s", digits=1),
            Metric(f"{head} per stream (median)", self.per_stream_tok_s, "tok/s", digits=2),
            Metric(f"{head} time to first token p50", self.ttft_ms(50), "ms", digits=0),
            Metric(f"{head} time to first token p99", self.ttft_ms(99), "ms", digits=0),
            Metric(f"{head} peak RSS", mib(self.peak_rss_bytes), "MiB", digits=0),
        ]
        return flagged(lines, is_noisy(self.background_cores))

    def summary(self) -> str:
        """One line for the progress log."""
        p50, p99, per = self.ttft_ms(50), self.ttft_ms(99), self.per_stream_tok_s
        return (
            f"  {self.server} x{self.streams}: {self.completion_tokens} tokens in "
            f"{self.wall_s:.1f} s = {self.aggregate_tok_s:.1f} tok/s aggregate, "
            f"{_fmt(per, '.2f')} tok/s per stream, first token p50 {_fmt(p50, '.0f')} ms "
            f"p99 {_fmt(p99, '.0f')} ms, peak RSS {_fmt(mib(self.peak_rss_bytes), '.0f')} MiB, "
            f"other processes {self.background_cores:.2f} cores"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "server": self.server,
            "streams": self.streams,
            "wall_s": self.wall_s,
            "completion_tokens": self.completion_tokens,
            "aggregate_tok_s": self.aggregate_tok_s,
            "per_stream_tok_s_median": self.per_stream_tok_s,
            "ttft_p50_ms": self.ttft_ms(50),
            "ttft_p99_ms": self.ttft_ms(99),
            "peak_rss_bytes": self.peak_rss_bytes,
            "background_cores": self.background_cores,
            "samples": [{k: v for k, v in asdict(s).items() if k != "text"} for s in self.samples],
        }


@dataclass(slots=True)
class StreamsResults:
    """Every workload of the part, by server and stream count, and the ratios between them."""

    model: str
    tokens: int
    compared: int
    # Server name -> stream count -> workload; glm-api first, then the peers in their order.
    runs: dict[str, dict[int, Workload]] = field(default_factory=dict)
    glm_ready_s: float | None = None
    glm_linear_plan: str = ""

    @property
    def scaling(self) -> float | None:
        """glm-api's aggregate tok/s at the compared count over one stream's."""
        ours = self.runs.get(GLM, {})
        one, many = ours.get(1), ours.get(self.compared)
        if one is None or many is None or one.aggregate_tok_s <= 0:
            return None
        return many.aggregate_tok_s / one.aggregate_tok_s

    def identical_replies(self, peer: str, streams: int) -> tuple[int, int]:
        """How many greedy replies of a workload are the same text on glm-api and `peer`."""
        ours, theirs = self.runs.get(GLM, {}).get(streams), self.runs[peer].get(streams)
        if ours is None or theirs is None:
            return 0, 0
        their_text = {s.stream: s.text for s in theirs.completed}
        pairs = [(s.text, their_text.get(s.stream)) for s in ours.completed]
        return sum(a == b for a, b in pairs), len(pairs)

    def metrics(self) -> list[Metric]:
        """The lines of the final table."""
        ours = self.runs.get(GLM, {})
        lines = [m for _, w in sorted(ours.items()) for m in w.metrics()]
        compared = [ours.get(1), ours.get(self.compared)]
        lines += flagged(
            [
                Metric(
                    f"streams: glm-api aggregate tok/s, {self.compared} streams / 1",
                    self.scaling,
                    "x",
                    defaults.STREAMS_SCALING_TARGET,
                )
            ],
            any(w is not None and is_noisy(w.background_cores) for w in compared),
        )
        for peer, by_count in self.runs.items():
            if peer != GLM:
                for n, theirs in sorted(by_count.items()):
                    lines += theirs.metrics() + self._comparison(peer, ours.get(n), theirs)
        workloads = [w for by_count in self.runs.values() for w in by_count.values()]
        unfinished = sum(len(w.unfinished) for w in workloads)
        streams = sum(len(w.samples) for w in workloads)
        lines += [
            Metric(
                "streams: streams not ended by max_tokens (or failed)",
                float(unfinished),
                f"of {streams}",
                digits=0,
            ),
            Metric(
                "streams: other processes' CPU load (max)",
                max((w.background_cores for w in workloads), default=0.0),
                "cores",
            ),
        ]
        return lines

    def _comparison(self, peer: str, ours: Workload | None, theirs: Workload) -> list[Metric]:
        """glm-api / a peer on one workload (reported; targets per peer belong here)."""
        head = f"streams x{theirs.streams}: glm-api / {peer}"
        same, total = self.identical_replies(peer, theirs.streams)
        lines = [
            Metric(f"{head} aggregate tok/s", _ratio(ours, theirs, lambda w: w.aggregate_tok_s)),
            Metric(
                f"{head} time to first token p50", _ratio(ours, theirs, lambda w: w.ttft_ms(50))
            ),
            Metric(f"{head} peak RSS", _ratio(ours, theirs, lambda w: w.peak_rss_bytes)),
            Metric(
                f"{head}: greedy replies identical",
                float(same) if total else None,
                f"of {total}",
                digits=0,
            ),
        ]
        noisy = any(w is not None and is_noisy(w.background_cores) for w in (ours, theirs))
        return flagged(lines, noisy)

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "tokens": self.tokens,
            "compared": self.compared,
            "scaling": self.scaling,
            "glm_ready_s": self.glm_ready_s,
            "glm_linear_plan": self.glm_linear_plan,
            "runs": {
                server: [w.as_dict() for _, w in sorted(by_count.items())]
                for server, by_count in self.runs.items()
            },
            "identical_replies": {
                peer: {n: self.identical_replies(peer, n) for n in by_count}
                for peer, by_count in self.runs.items()
                if peer != GLM
            },
        }


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _ratio(
    ours: Workload | None, theirs: Workload, value: Callable[[Workload], float | None]
) -> float | None:
    """value(ours) / value(theirs), or None when either side was not measured."""
    if ours is None:
        return None
    a, b = value(ours), value(theirs)
    if a is None or b is None or b <= 0:
        return None
    return a / b


# ---- clients -------------------------------------------------------------------------------

StreamCall = Callable[[int, str, int], StreamSample]


def glm_call(channel: grpc.Channel) -> StreamCall:
    """Greedy Chat streams over gRPC on `channel`, timed from the client's side."""
    stub = glm_stub(channel)

    def call(index: int, prompt: str, max_tokens: int) -> StreamSample:
        read = read_greedy_stream(stub, prompt, max_tokens, _STREAM_TIMEOUT_S)
        times = (read.sent, read.first_token, read.ended)
        if read.error is not None:
            return StreamSample(index, *times, 0, 0, "", read.text, _rpc_error(read.error))
        return StreamSample(
            index, *times, read.completion_tokens, read.prompt_tokens, read.finish_reason, read.text
        )

    return call


def _rpc_error(exc: grpc.RpcError) -> str:
    """STATUS: details, as the stream's error (the RpcError of a call is also a grpc.Call)."""
    code, details = getattr(exc, "code", None), getattr(exc, "details", None)
    if callable(code) and callable(details):
        return f"{code().name}: {details()}"
    return str(exc)


def openai_call(peer: Peer) -> StreamCall:
    """Greedy streaming /chat/completions calls to `peer`, Server-Sent Events parsed here.

    One HTTP/1.1 connection per stream (HTTP/1.1 cannot interleave two responses on one), as an
    OpenAI client opens them.
    """
    url = urlsplit(peer.base_url)
    route = f"{url.path}/chat/completions"

    def call(index: int, prompt: str, max_tokens: int) -> StreamSample:
        request: dict[str, Any] = {
            "messages": [{"role": "user", "content": prompt}],
            "temperature": 0,
            "max_tokens": max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if peer.model:
            request["model"] = peer.model
        conn = http.client.HTTPConnection(url.hostname or "", url.port, timeout=_STREAM_TIMEOUT_S)
        sent = time.perf_counter()
        try:
            conn.request("POST", route, json.dumps(request), {"Content-Type": "application/json"})
            read = _read_sse(conn.getresponse(), max_tokens, sent + _STREAM_TIMEOUT_S)
        except (OSError, http.client.HTTPException, ValueError) as exc:
            read = _SseRead(error=f"{type(exc).__name__}: {exc}")
        finally:
            conn.close()
        usage = read.usage
        return StreamSample(
            index,
            sent,
            read.first_at,
            time.perf_counter(),
            int(usage.get("completion_tokens", 0)),
            int(usage.get("prompt_tokens", 0)),
            read.finish_reason,
            "".join(read.pieces),
            read.error,
        )

    return call


@dataclass(slots=True)
class _SseRead:
    """What one streamed chat completion carried."""

    pieces: list[str] = field(default_factory=list)
    first_at: float | None = None
    finish_reason: str = ""
    usage: dict[str, Any] = field(default_factory=dict)
    error: str = ""


def _read_sse(response: http.client.HTTPResponse, max_tokens: int, deadline: float) -> _SseRead:
    """Read `response`'s events until [DONE], an error, the deadline or too many lines."""
    read = _SseRead()
    if response.status != 200:
        read.error = f"HTTP {response.status}: {response.read(2000).decode(errors='replace')}"
        return read
    for _ in range(_SSE_LINES_PER_TOKEN * max_tokens + 64):
        line = response.readline()
        if not line or time.perf_counter() > deadline:
            break
        if not line.startswith(b"data:"):
            continue  # the blank line that ends each event
        payload = line[5:].strip()
        if payload == b"[DONE]":
            break
        event = json.loads(payload)
        if "error" in event:
            read.error = f"in-band error: {event['error']}"
            return read
        if event.get("usage"):
            read.usage = event["usage"]
        for choice in event.get("choices") or ():
            content = (choice.get("delta") or {}).get("content")
            if content:
                if read.first_at is None:
                    read.first_at = time.perf_counter()
                read.pieces.append(content)
            if choice.get("finish_reason"):
                read.finish_reason = choice["finish_reason"]
    if not read.finish_reason:
        read.error = "the stream ended without a finish_reason"
    return read


def run_concurrent(
    call: StreamCall, streams: int, prompts: Sequence[str], tokens: int
) -> list[StreamSample]:
    """Open `streams` streams at once (stream i gets prompt i % len(prompts)); wait for all.

    Each stream has its own thread, released together by a barrier so that the sends are as
    close together as the GIL allows; each call has its own deadline, so this ends.
    """
    barrier = threading.Barrier(streams + 1, timeout=60.0)

    def one(i: int) -> StreamSample:
        barrier.wait()
        return call(i, prompts[i % len(prompts)], tokens)

    with ThreadPoolExecutor(max_workers=streams, thread_name_prefix="stream") as pool:
        futures = [pool.submit(one, i) for i in range(streams)]
        barrier.wait()
        return [f.result(timeout=_STREAM_TIMEOUT_S + 60.0) for f in futures]


def measure_counts(
    server: str,
    call: StreamCall,
    counts: Sequence[int],
    *,
    tokens: int,
    load: BackgroundLoad,
    peak_rss: Callable[[], int | None],
    say: Say,
) -> dict[int, Workload]:
    """A warm-up, then one timed workload per count, in increasing order."""
    prompts = defaults.STREAM_PROMPTS
    run_concurrent(call, min(max(counts), len(prompts)), prompts, _WARMUP_TOKENS)
    workloads: dict[int, Workload] = {}
    for n in sorted(counts):
        before = load.snapshot()
        samples = run_concurrent(call, n, prompts, tokens)
        busy = load.cores_between(before, load.snapshot())
        workloads[n] = w = Workload(server, n, samples, peak_rss(), busy)
        say(w.summary())
        for s in w.unfinished[:4]:
            why = s.error or f"finish_reason {s.finish_reason!r} after {s.completion_tokens} tokens"
            say(f"    warning: {server} stream {s.stream}: {why}")
    return workloads


# ---- the servers ---------------------------------------------------------------------------


def _toml_value(value: object) -> str:
    """A TOML scalar or array of scalars (aliases); the models tables hold nothing else."""
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        # JSON string escapes (\", \\, \n, \uXXXX) are valid in TOML basic strings.
        return json.dumps(value)
    raise ValueError(f"cannot write {value!r} as a TOML scalar")


def write_models_config(tables: Sequence[Mapping[str, object]], dest: Path) -> Path:
    """`tables` written as a models file ([[models]] tables) at `dest`."""
    lines: list[str] = []
    for table in tables:
        lines += ["[[models]]", *(f"{key} = {_toml_value(value)}" for key, value in table.items())]
    dest.write_text("\n".join(lines) + "\n")
    return dest


def chat_only_config(
    source: Path,
    model_id: str,
    min_waiting: int,
    dest: Path,
    options: Mapping[str, object] | None = None,
) -> Path:
    """A copy of one chat model's table from `source`, alone, as the server's config file.

    glm-api then holds only the model it is measured on (no embedding model), as a peer does,
    and its waiting queue is at least `min_waiting` long, so that no stream is refused.
    `options` set the model's options of those names (quantize, compile_decode, ...).
    """
    with source.open("rb") as fh:
        tables = tomllib.load(fh).get("models", [])
    table = next((dict(t) for t in tables if t.get("id") == model_id), None)
    if table is None:
        raise LookupError(f"{source} has no model {model_id!r}")
    table["default"] = True
    table["max_waiting"] = max(int(table.get("max_waiting", 0)), min_waiting)
    table.update(options or {})
    return write_models_config([table], dest)


def run_streams(
    *,
    model_id: str,
    config: Path,
    counts: Sequence[int],
    compared: int,
    tokens: int,
    peers: Sequence[Peer],
    say: Say,
) -> StreamsResults:
    """glm-api at every count, then each peer at every count; one server at a time."""
    results = StreamsResults(model=model_id, tokens=tokens, compared=compared)
    with tempfile.TemporaryDirectory(prefix="glm-bench-streams-") as tmp:
        cfg = chat_only_config(config, model_id, max(counts), Path(tmp) / "chat-only.toml")
        with ServerProcess(env={"GLM_CONFIG": str(cfg)}) as server:
            say(f"  glm-api: python -m server on {server.target} (pid {server.pid}), {model_id}")
            results.glm_ready_s = server.wait_ready()
            # Measured at each start (server/engine/invariant_linear.py), so it can differ
            # between runs, and with it the decode step's time: printed to tell runs apart.
            for line in server.log_text().splitlines():
                if _PLAN_LOG in line:
                    results.glm_linear_plan = line.split(_PLAN_LOG, 1)[1].strip()
                    say(f"  glm-api linear plan: {results.glm_linear_plan}")
            with grpc.insecure_channel(server.target) as channel:
                results.runs[GLM] = measure_counts(
                    GLM,
                    glm_call(channel),
                    counts,
                    tokens=tokens,
                    load=BackgroundLoad(server.pid),
                    peak_rss=server.peak_rss_bytes,
                    say=say,
                )
    for given in peers:
        peer = given.with_listening_pid()
        say(f"  {peer.name}: {peer.base_url} (pid {peer.pid or 'unknown'})")
        pids = () if peer.pid is None else (peer.pid,)
        results.runs[peer.name] = measure_counts(
            peer.name,
            openai_call(peer),
            counts,
            tokens=tokens,
            load=BackgroundLoad(*pids),
            peak_rss=peer.peak_rss_bytes,
            say=say,
        )
        for n in sorted(counts):
            same, total = results.identical_replies(peer.name, n)
            say(f"  x{n}: greedy replies identical on glm-api and {peer.name}: {same} of {total}")
    return results


def run(args: argparse.Namespace, say: Say) -> Section:
    """The streams part: glm-api's default chat model alone, then the peers."""
    from bench.models import default_spec, server_settings
    from server.domain import ModelKind

    settings = server_settings()
    spec = default_spec(ModelKind.CHAT, settings)
    counts = sorted({*args.streams, 1, defaults.STREAM_COMPARED})
    peers: list[Peer] = args.peer
    say(
        f"streams: {', '.join(map(str, counts))} concurrent greedy Chat streams of "
        f"{args.stream_tokens} tokens against glm-api ({spec.id})"
        + "".join(f", then {p.name}" for p in peers)
    )
    results = run_streams(
        model_id=spec.id,
        config=settings.config,
        counts=counts,
        compared=defaults.STREAM_COMPARED,
        tokens=args.stream_tokens,
        peers=peers,
        say=say,
    )
    return Section(results.as_dict(), results.metrics())

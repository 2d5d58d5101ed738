"""Concurrent streams: throughput, time to first token and memory under load, in one run.

glm-api is started as a real ``python -m server`` child that serves the default chat model alone
(a generated config holding only that model, with a waiting queue long enough for the largest
stream count), and N greedy Chat streams are opened at once over one gRPC channel, for each N.
Then ``transformers serve --continuous-batching`` serves the very same weights folder in float32
on the CPU (bench/serve_baseline.py) and gets the same N-stream workload through its
OpenAI-compatible streaming route, once for each of its cache sizings (as shipped, and sized for
the workload: bench/defaults.py TSERVE_CACHES). No two servers ever run at the same time.

Why these measures:
- aggregate tokens/s (every stream's completion tokens over the wall time from the first send to
  the last end) is what the machine delivers; the ratio 8 streams / 1 stream says whether
  continuous batching pays off;
- per-stream tokens/s (median) is what one client sees while the others run;
- time to first token (p50, p99) includes the time a request waits for a slot, which is what a
  client waits for at 32 streams when only max_concurrent (8) run at once;
- peak resident memory (VmHWM) is read after each workload; counts run in increasing order, so
  the value after N is the peak up to and including N streams.

Every stream is bounded by a deadline, and every loop by a count.
"""

from __future__ import annotations

import http.client
import json
import statistics
import tempfile
import threading
import time
import tomllib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc

from bench.chat_stream import read_greedy_stream
from bench.defaults import (
    STREAMS_SCALING_TARGET,
    STREAMS_VS_TSERVE_TOK_S_TARGET,
    STREAMS_VS_TSERVE_TTFT_TARGET,
    TSERVE_CACHES,
)
from bench.load import BUSY_CORES_LIMIT, BackgroundLoad
from bench.report import Metric, median
from bench.serve_baseline import TransformersServe
from bench.server_process import ServerProcess
from bench.tserve_cache import TserveCache
from glm.v1 import glm_service_pb2_grpc as pb_grpc

GLM = "glm-api"
TSERVE = "transformers serve"
_MIB = 1024 * 1024
# Warm-up streams (not timed): enough tokens to run prefill and decode steps at every batch size
# up to the compared count, and, for transformers serve, to build its continuous-batching
# manager, which it does on the first request.
_WARMUP_TOKENS = 8
# Generous per-stream deadline: a 128-token stream takes about 15 s alone on two cores, and the
# last of 32 streams waits for three batches of eight before it starts.
_STREAM_TIMEOUT_S = 600.0
# The most SSE lines read from one stream: a few per token (data line, blank line) plus slack.
_SSE_LINES_PER_TOKEN = 4


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
    def total_s(self) -> float:
        return self.ended_at - self.sent_at

    @property
    def tokens_per_s(self) -> float:
        """Completion tokens over the whole call, waiting and prefill included."""
        return self.completion_tokens / max(self.total_s, 1e-9)


@dataclass(slots=True)
class Workload:
    """N concurrent streams against one server, and what the machine did meanwhile."""

    server: str
    streams: int
    tokens: int
    samples: list[StreamSample]
    peak_rss_bytes: int | None = None
    background_cores: float = 0.0

    @property
    def noisy(self) -> bool:
        return self.background_cores > BUSY_CORES_LIMIT

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
    def ttft_mean_ms(self) -> float | None:
        done = self.completed
        return 1000 * statistics.fmean(s.ttft_s for s in done) if done else None

    @property
    def unfinished(self) -> list[StreamSample]:
        """Streams that ended for another reason than max_tokens (or failed)."""
        return [s for s in self.samples if s.error or s.finish_reason != "length"]

    def summary(self) -> str:
        """One line for the progress log."""
        p50, p99, per = self.ttft_ms(50), self.ttft_ms(99), self.per_stream_tok_s
        return (
            f"  {self.server} x{self.streams}: {self.completion_tokens} tokens in "
            f"{self.wall_s:.1f} s = {self.aggregate_tok_s:.1f} tok/s aggregate, "
            f"{_fmt(per, '.2f')} tok/s per stream (median), TTFT p50 {_fmt(p50, '.0f')} ms "
            f"p99 {_fmt(p99, '.0f')} ms, peak RSS {_fmt(_mib(self.peak_rss_bytes), '.0f')} MiB, "
            f"other processes {self.background_cores:.2f} cores"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "server": self.server,
            "streams": self.streams,
            "tokens": self.tokens,
            "wall_s": self.wall_s,
            "completion_tokens": self.completion_tokens,
            "aggregate_tok_s": self.aggregate_tok_s,
            "per_stream_tok_s_median": self.per_stream_tok_s,
            "ttft_p50_ms": self.ttft_ms(50),
            "ttft_p99_ms": self.ttft_ms(99),
            "ttft_mean_ms": self.ttft_mean_ms,
            "peak_rss_bytes": self.peak_rss_bytes,
            "background_cores": self.background_cores,
            "samples": [{k: v for k, v in asdict(s).items() if k != "text"} for s in self.samples],
        }


@dataclass(slots=True)
class StreamsResults:
    """Every workload of the benchmark and the ratios between them."""

    model: str
    folder: str
    tokens: int
    compared: int
    glm: dict[int, Workload] = field(default_factory=dict)
    # One workload, start-up time and loaded RSS per cache sizing of transformers serve, by label.
    tserve: dict[str, Workload] = field(default_factory=dict)
    caches: dict[str, TserveCache] = field(default_factory=dict)
    glm_loaded_rss_bytes: int | None = None
    tserve_loaded_rss_bytes: dict[str, int | None] = field(default_factory=dict)
    glm_ready_s: float | None = None
    tserve_ready_s: dict[str, float | None] = field(default_factory=dict)

    @property
    def scaling(self) -> float | None:
        """Aggregate tok/s at the compared count over one stream's."""
        one, many = self.glm.get(1), self.glm.get(self.compared)
        if one is None or many is None or one.aggregate_tok_s <= 0:
            return None
        return many.aggregate_tok_s / one.aggregate_tok_s

    def identical_replies(self, label: str) -> tuple[int, int]:
        """How many greedy replies of the compared workload are the same text on both servers."""
        ours, theirs = self.glm.get(self.compared), self.tserve.get(label)
        if ours is None or theirs is None:
            return 0, 0
        their_text = {s.stream: s.text for s in theirs.completed}
        pairs = [(s.text, their_text.get(s.stream)) for s in ours.completed]
        return sum(a == b for a, b in pairs), len(pairs)

    def metrics(self) -> list[Metric]:
        """The lines of the final table."""
        lines: list[Metric] = []
        for _, w in sorted(self.glm.items()):
            lines += _flagged(_workload_metrics(w, p99=True), w.noisy)
        ours = self.glm.get(self.compared)
        one = self.glm.get(1)
        lines += _flagged(
            [
                Metric(
                    f"streams: glm-api aggregate tok/s, {self.compared} streams / 1",
                    self.scaling,
                    "x",
                    STREAMS_SCALING_TARGET,
                )
            ],
            any(w is not None and w.noisy for w in (one, ours)),
        )
        for label, theirs in self.tserve.items():
            lines += _flagged(_workload_metrics(theirs, p99=False), theirs.noisy)
            noisy = any(w is not None and w.noisy for w in (ours, theirs))
            lines += _flagged(self._comparison(label, ours, theirs), noisy)
        unfinished = sum(len(w.unfinished) for w in self.workloads)
        streams = sum(len(w.samples) for w in self.workloads)
        lines += [
            Metric(
                "streams: streams not ended by max_tokens (or failed)",
                float(unfinished),
                f"of {streams}",
                digits=0,
            ),
            Metric(
                "streams: other processes' CPU load (max)",
                max((w.background_cores for w in self.workloads), default=0.0),
                "cores",
            ),
        ]
        return lines

    def _comparison(self, label: str, ours: Workload | None, theirs: Workload) -> list[Metric]:
        """glm-api against one cache sizing of transformers serve, at the compared count."""
        head = f"streams x{self.compared}: glm-api / transformers serve ({label})"
        same, total = self.identical_replies(label)
        return [
            Metric(
                f"{head} aggregate tok/s",
                _ratio(ours, theirs, lambda w: w.aggregate_tok_s),
                "",
                STREAMS_VS_TSERVE_TOK_S_TARGET,
            ),
            Metric(
                f"{head} TTFT p50",
                _ratio(ours, theirs, lambda w: w.ttft_ms(50)),
                "",
                STREAMS_VS_TSERVE_TTFT_TARGET,
            ),
            Metric(f"{head} TTFT mean", _ratio(ours, theirs, lambda w: w.ttft_mean_ms)),
            Metric(
                f"{head} peak RSS",
                _ratio(ours, theirs, lambda w: w.peak_rss_bytes),
                "",
                self.caches[label].rss_target,
            ),
            Metric(
                f"{head}: greedy replies identical",
                float(same) if total else None,
                f"of {total}",
                digits=0,
            ),
        ]

    @property
    def workloads(self) -> list[Workload]:
        return [*self.glm.values(), *self.tserve.values()]

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "folder": self.folder,
            "tokens": self.tokens,
            "compared": self.compared,
            "scaling": self.scaling,
            "identical_replies": {label: self.identical_replies(label) for label in self.tserve},
            "glm_loaded_rss_bytes": self.glm_loaded_rss_bytes,
            "tserve_loaded_rss_bytes": self.tserve_loaded_rss_bytes,
            "glm_ready_s": self.glm_ready_s,
            "tserve_ready_s": self.tserve_ready_s,
            "glm": [w.as_dict() for _, w in sorted(self.glm.items())],
            "tserve": {label: w.as_dict() for label, w in self.tserve.items()},
        }


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), linear between the closest ranks (numpy's default)."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("percentile of no values")
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _mib(value: int | None) -> float | None:
    return None if value is None else value / _MIB


def _ratio(
    ours: Workload | None, theirs: Workload | None, value: Callable[[Workload], float | None]
) -> float | None:
    """value(ours) / value(theirs), or None when either side was not measured."""
    if ours is None or theirs is None:
        return None
    a, b = value(ours), value(theirs)
    if a is None or b is None or b <= 0:
        return None
    return a / b


def _flagged(metrics: list[Metric], noisy: bool) -> list[Metric]:
    return [replace(m, noisy=True) for m in metrics] if noisy else metrics


def _workload_metrics(w: Workload, *, p99: bool) -> list[Metric]:
    """A workload's lines: p99 TTFT for glm-api's counts, the mean for the comparison."""
    head = f"streams x{w.streams}: {w.server}"
    lines = [
        Metric(f"{head} aggregate tok/s", w.aggregate_tok_s, "tok/s", digits=1),
        Metric(f"{head} per-stream tok/s (median)", w.per_stream_tok_s, "tok/s", digits=2),
        Metric(f"{head} TTFT p50", w.ttft_ms(50), "ms", digits=0),
    ]
    if p99:
        lines.append(Metric(f"{head} TTFT p99", w.ttft_ms(99), "ms", digits=0))
    else:
        lines.append(Metric(f"{head} TTFT mean", w.ttft_mean_ms, "ms", digits=0))
    lines.append(Metric(f"{head} peak RSS", _mib(w.peak_rss_bytes), "MiB", digits=0))
    return lines


# ---- clients -------------------------------------------------------------------------------


def glm_stream(
    stub: pb_grpc.GlmServiceStub, index: int, prompt: str, max_tokens: int
) -> StreamSample:
    """One greedy Chat stream over gRPC, timed from the client's side."""
    read = read_greedy_stream(stub, prompt, max_tokens, _STREAM_TIMEOUT_S)
    if read.error is not None:
        error = _rpc_error(read.error)
        times = (read.sent, read.first_token, read.ended)
        return StreamSample(index, *times, 0, 0, "", read.text, error)
    return StreamSample(
        index,
        read.sent,
        read.first_token,
        read.ended,
        read.completion_tokens,
        read.prompt_tokens,
        read.finish_reason,
        read.text,
    )


def _rpc_error(exc: grpc.RpcError) -> str:
    """STATUS: details, as the stream's error (the RpcError of a call is also a grpc.Call)."""
    code, details = getattr(exc, "code", None), getattr(exc, "details", None)
    if callable(code) and callable(details):
        return f"{code().name}: {details()}"
    return str(exc)


def openai_stream(host: str, port: int, index: int, prompt: str, max_tokens: int) -> StreamSample:
    """One greedy streaming /v1/chat/completions call, with its Server-Sent Events parsed here.

    One HTTP/1.1 connection per stream (HTTP/1.1 cannot interleave two responses on one), so a
    stream costs the server what it costs an OpenAI client.
    """
    body = json.dumps(
        {
            "messages": [{"role": "user", "content": prompt}],
            "temperature": 0,
            "max_tokens": max_tokens,
            "stream": True,
        }
    )
    pieces: list[str] = []
    first: float | None = None
    finish = ""
    usage: dict[str, Any] = {}
    error = ""
    conn = http.client.HTTPConnection(host, port, timeout=_STREAM_TIMEOUT_S)
    sent = time.perf_counter()
    deadline = sent + _STREAM_TIMEOUT_S
    try:
        conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            error = f"HTTP {response.status}: {response.read(2000).decode(errors='replace')}"
        for _ in range(_SSE_LINES_PER_TOKEN * max_tokens + 64):
            if error or time.perf_counter() > deadline:
                break
            line = response.readline()
            if not line:
                break
            if not line.startswith(b"data:"):
                continue  # the blank line that ends each event
            payload = line[5:].strip()
            if payload == b"[DONE]":
                break
            event = json.loads(payload)
            if "error" in event:
                error = f"in-band error: {event['error']}"
                break
            if event.get("usage"):
                usage = event["usage"]
            for choice in event.get("choices") or ():
                content = (choice.get("delta") or {}).get("content")
                if content:
                    if first is None:
                        first = time.perf_counter()
                    pieces.append(content)
                if choice.get("finish_reason"):
                    finish = choice["finish_reason"]
        else:
            error = "too many SSE lines"
        if not error and not finish:
            error = "the stream ended without a finish_reason"
    except (OSError, http.client.HTTPException, ValueError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    finally:
        conn.close()
    return StreamSample(
        index,
        sent,
        first,
        time.perf_counter(),
        int(usage.get("completion_tokens", 0)),
        int(usage.get("prompt_tokens", 0)),
        finish,
        "".join(pieces),
        error,
    )


StreamCall = Callable[[int, str, int], StreamSample]


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


def measure(
    server: str,
    call: StreamCall,
    streams: int,
    prompts: Sequence[str],
    tokens: int,
    load: BackgroundLoad,
    peak_rss: Callable[[], int | None],
) -> Workload:
    """One timed workload, with the CPU other processes used meanwhile and the peak RSS after."""
    before = load.snapshot()
    samples = run_concurrent(call, streams, prompts, tokens)
    busy = load.cores_between(before, load.snapshot())
    return Workload(server, streams, tokens, samples, peak_rss(), busy)


# ---- the servers ---------------------------------------------------------------------------


def _toml_value(value: object) -> str:
    """A TOML scalar; the models tables hold nothing else."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        # JSON string escapes (\", \\, \n, \uXXXX) are valid in TOML basic strings.
        return json.dumps(value)
    raise ValueError(f"cannot write {value!r} as a TOML scalar")


def chat_only_config(source: Path, model_id: str, min_waiting: int, dest: Path) -> Path:
    """A copy of one chat model's table from `source`, alone, as the server's config file.

    glm-api then holds only the model it is compared on (no embedding model), as transformers
    serve does, and its waiting queue is at least `min_waiting` long, so that none of the
    streams is refused with RESOURCE_EXHAUSTED.
    """
    with source.open("rb") as fh:
        tables = tomllib.load(fh).get("models", [])
    table = next((dict(t) for t in tables if t.get("id") == model_id), None)
    if table is None:
        raise LookupError(f"{source} has no model {model_id!r}")
    table["default"] = True
    table["max_waiting"] = max(int(table.get("max_waiting", 0)), min_waiting)
    lines = ["[[models]]", *(f"{key} = {_toml_value(value)}" for key, value in table.items())]
    dest.write_text("\n".join(lines) + "\n")
    return dest


# The server's log line that names the linear layers' plan.
_PLAN_LOG = "decode linear layers:"


def run_streams(
    *,
    model_id: str,
    folder: Path,
    config: Path,
    counts: Sequence[int],
    compared: int,
    prompts: Sequence[str],
    tokens: int,
    caches: Sequence[TserveCache] = TSERVE_CACHES,
    say: Callable[[str], None] = print,
) -> StreamsResults:
    """glm-api at every count, then transformers serve at the compared count with each of
    `caches`; one server at a time."""
    results = StreamsResults(model=model_id, folder=str(folder), tokens=tokens, compared=compared)
    glm_counts = sorted({*counts, compared})
    warmup = min(compared, len(prompts))
    with tempfile.TemporaryDirectory(prefix="glm-bench-streams-") as tmp:
        cfg = chat_only_config(config, model_id, max(glm_counts), Path(tmp) / "chat-only.toml")
        server = ServerProcess(env={"GLM_CONFIG": str(cfg)})
        try:
            server.start()
            say(
                f"  glm-api: python -m server on {server.target} (pid {server.pid}), {model_id} "
                "alone"
            )
            results.glm_ready_s = server.wait_ready()
            results.glm_loaded_rss_bytes = server.peak_rss_bytes()
            # Measured at each start (server/engine/invariant_linear.py), so it can differ
            # between runs, and with it the decode step's time: printed to tell runs apart.
            for line in server.log_text().splitlines():
                if _PLAN_LOG in line:
                    say(f"  glm-api linear plan: {line.split(_PLAN_LOG, 1)[1].strip()}")
            with grpc.insecure_channel(server.target) as channel:
                stub = pb_grpc.GlmServiceStub(channel)

                def glm_call(i: int, prompt: str, n: int) -> StreamSample:
                    return glm_stream(stub, i, prompt, n)

                run_concurrent(glm_call, warmup, prompts, _WARMUP_TOKENS)
                load = BackgroundLoad(server.pid)
                for n in glm_counts:
                    w = measure(GLM, glm_call, n, prompts, tokens, load, server.peak_rss_bytes)
                    results.glm[n] = w
                    say(w.summary())
                    _report_unfinished(w, say)
        finally:
            server.stop()
    for cache in caches:
        run_tserve(
            results, cache, folder=folder, prompts=prompts, tokens=tokens, warmup=warmup, say=say
        )
    return results


def run_tserve(
    results: StreamsResults,
    cache: TserveCache,
    *,
    folder: Path,
    prompts: Sequence[str],
    tokens: int,
    warmup: int,
    say: Callable[[str], None],
) -> None:
    """The compared workload against one transformers serve child, with `cache`, recorded in
    `results` under its label; the child is always stopped."""
    label = cache.label
    results.caches[label] = cache
    baseline = TransformersServe(folder, cache=cache)
    try:
        baseline.start()
        say(
            f"  transformers serve --continuous-batching on 127.0.0.1:{baseline.port} "
            f"(pid {baseline.pid}), {folder}, float32, cpu, {cache.describe()}"
        )
        results.tserve_ready_s[label] = baseline.wait_ready()
        results.tserve_loaded_rss_bytes[label] = baseline.peak_rss_bytes()

        def tserve_call(i: int, prompt: str, n: int) -> StreamSample:
            return openai_stream(baseline.host, baseline.port, i, prompt, n)

        run_concurrent(tserve_call, warmup, prompts, _WARMUP_TOKENS)
        load = BackgroundLoad(baseline.pid)
        server = f"{TSERVE} ({label})"
        w = measure(
            server, tserve_call, results.compared, prompts, tokens, load, baseline.peak_rss_bytes
        )
        say(w.summary())
        _report_unfinished(w, say)
    finally:
        baseline.stop()
    _check_prompt_lengths(results.glm[results.compared], w, say)
    results.tserve[label] = w
    same, total = results.identical_replies(label)
    say(
        f"  greedy replies identical on both servers: {same} of {total}; start to ready: glm-api "
        f"{_fmt(results.glm_ready_s, '.1f')} s, {server} "
        f"{_fmt(results.tserve_ready_s[label], '.1f')} s; peak RSS once loaded: glm-api "
        f"{_fmt(_mib(results.glm_loaded_rss_bytes), '.0f')} MiB, {server} "
        f"{_fmt(_mib(results.tserve_loaded_rss_bytes[label]), '.0f')} MiB"
    )


def _report_unfinished(w: Workload, say: Callable[[str], None]) -> None:
    """Name the streams that did not run to max_tokens: their tok/s compare unlike work."""
    for s in w.unfinished[:8]:
        why = s.error or f"finish_reason {s.finish_reason!r} after {s.completion_tokens} tokens"
        say(f"    warning: {w.server} stream {s.stream}: {why}")
    if len(w.unfinished) > 8:
        say(f"    ... and {len(w.unfinished) - 8} more")


def _check_prompt_lengths(ours: Workload, theirs: Workload, say: Callable[[str], None]) -> None:
    """Both servers must template the same prompt into the same number of tokens."""
    mine = {s.stream: s.prompt_tokens for s in ours.completed}
    for s in theirs.completed:
        if s.stream in mine and mine[s.stream] != s.prompt_tokens:
            say(
                f"    warning: prompt {s.stream} is {mine[s.stream]} tokens on glm-api "
                f"and {s.prompt_tokens} on transformers serve: the servers template it differently"
            )

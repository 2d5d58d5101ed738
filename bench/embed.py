"""Embed part: 32 concurrent one-sentence Embed calls against in-process batches of 32.

The server only reaches batch-32 throughput if its dynamic batcher gathers the concurrent calls
into shared forward passes, so this measures the batcher as much as the transport. In-process
baselines, each taking turns with the server:
- per round: `encode` on each round's 32 sentences, the very groups the server receives at once.
  This is the main ratio's baseline: the best any server can do with what it is sent.
- whole set: one `encode` over all the sentences, which sentence-transformers sorts by length
  before cutting them into batches of 32, so its batches hold less padding than any batch of 32
  arrival-ordered sentences can.
- unpadded per round (context): the server's own unpadded pass (server/models/packed_encoder.py)
  on each round, where `encode` pads every sentence to the longest of its batch. The server's
  ratio to it is what serving costs (transport and batching) with the model work the same.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import numpy as np
import torch

from bench.chat_stream import glm_stub
from bench.defaults import EMBED_RATIO_TARGET, EMBED_WHOLE_SET_RATIO_TARGET
from bench.load import BackgroundLoad, is_noisy
from bench.report import Metric, Say, Section, flagged, median
from bench.server_process import ServerProcess
from glm.v1 import glm_service_pb2 as pb
from glm.v1 import glm_service_pb2_grpc as pb_grpc

_SUBJECTS = (
    "The lighthouse keeper",
    "A curious child",
    "Our new neighbour",
    "The night-shift nurse",
    "An old fisherman from the harbour",
    "The chemistry teacher",
    "A tired software engineer",
    "The village baker",
    "My grandmother",
    "A travelling musician",
)
_ACTIONS = (
    "carefully repaired",
    "wrote a short poem about",
    "took a photograph of",
    "complained loudly about",
    "spent the whole afternoon studying",
    "quietly admired",
    "drew a detailed map of",
    "forgot all about",
)
_OBJECTS = (
    "the stormy sea at dawn.",
    "a broken bicycle that had been left in the rain for weeks.",
    "the price of bread.",
    "the constellations visible above the northern hills on a clear winter night.",
)


def make_sentences(count: int) -> list[str]:
    """`count` distinct English sentences of varied length (deterministic, no data files)."""
    sentences: list[str] = []
    i = 0
    while len(sentences) < count:
        subject = _SUBJECTS[i % len(_SUBJECTS)]
        action = _ACTIONS[(i // len(_SUBJECTS)) % len(_ACTIONS)]
        obj = _OBJECTS[(i // (len(_SUBJECTS) * len(_ACTIONS))) % len(_OBJECTS)]
        cycle = i // (len(_SUBJECTS) * len(_ACTIONS) * len(_OBJECTS))
        # Past 320 sentences, a suffix keeps every sentence distinct.
        suffix = f" (note {cycle})" if cycle else ""
        sentences.append(f"{subject} {action} {obj}{suffix}")
        i += 1
    return sentences


@dataclass(slots=True)
class EmbedResults:
    """Seconds per pass over all the sentences, per repeat, for each way of embedding them."""

    sentences: int
    concurrency: int
    rounds: int
    batch32_s: list[float] = field(default_factory=list)
    rounds32_s: list[float] = field(default_factory=list)
    # The server's unpadded pass on each round, in process (empty where the model pads).
    packed_rounds_s: list[float] = field(default_factory=list)
    server_s: list[float] = field(default_factory=list)
    max_abs_diff: float = 0.0

    def _rate(self, seconds: Sequence[float]) -> float:
        return self.sentences / median(seconds)

    @property
    def batch32_per_s(self) -> float:
        return self._rate(self.batch32_s)

    @property
    def rounds32_per_s(self) -> float:
        return self._rate(self.rounds32_s)

    @property
    def server_per_s(self) -> float:
        return self._rate(self.server_s)

    @property
    def ratio(self) -> float:
        """Server / per-round encode: the median of the per-repeat ratios (back to back)."""
        return median([r / s for r, s in zip(self.rounds32_s, self.server_s, strict=True)])

    @property
    def packed_ratio(self) -> float | None:
        """Server / the server's own unpadded pass per round, in process."""
        if not self.packed_rounds_s:
            return None
        return median([p / s for p, s in zip(self.packed_rounds_s, self.server_s, strict=True)])

    @property
    def whole_set_ratio(self) -> float:
        """Server / one encode over the whole (globally length-sorted) set."""
        return median([b / s for b, s in zip(self.batch32_s, self.server_s, strict=True)])

    def metrics(self) -> list[Metric]:
        """The lines of the final table."""
        return [
            Metric(
                "embed: in-process encode batch 32, per round",
                self.rounds32_per_s,
                "sent/s",
                digits=1,
            ),
            Metric(
                "embed: in-process encode batch 32, whole set",
                self.batch32_per_s,
                "sent/s",
                digits=1,
            ),
            Metric(
                f"embed: server, {self.concurrency} concurrent clients",
                self.server_per_s,
                "sent/s",
                digits=1,
            ),
            Metric(
                "embed: server / in-process batch 32 per round",
                self.ratio,
                target=EMBED_RATIO_TARGET,
            ),
            Metric(
                "embed: server / in-process batch 32 whole set",
                self.whole_set_ratio,
                target=EMBED_WHOLE_SET_RATIO_TARGET,
            ),
            Metric(
                "embed: server / in-process unpadded passes per round (the server's model code)",
                self.packed_ratio,
            ),
        ]

    def as_dict(self) -> dict[str, Any]:
        """Samples and summaries, JSON-ready."""
        return {
            "sentences": self.sentences,
            "concurrency": self.concurrency,
            "rounds": self.rounds,
            "batch32_per_s": self.batch32_per_s,
            "rounds32_per_s": self.rounds32_per_s,
            "whole_set_ratio": self.whole_set_ratio,
            "server_per_s": self.server_per_s,
            "ratio": self.ratio,
            "packed_ratio": self.packed_ratio,
            "max_abs_diff_vs_in_process": self.max_abs_diff,
            "batch32_s": self.batch32_s,
            "rounds32_s": self.rounds32_s,
            "packed_rounds_s": self.packed_rounds_s,
            "server_s": self.server_s,
        }


class InProcessEmbedder:
    """The embedding model loaded with sentence-transformers in this process."""

    def __init__(self, folder: Path) -> None:
        from sentence_transformers import SentenceTransformer

        from server.models.packed_encoder import PackedEncoder

        self.model = SentenceTransformer(str(folder), device="cpu")
        # Built on a copy: building one switches the encoder's attention implementation, and
        # the padded baselines must run sentence-transformers exactly as it ships.
        self.packed, self.not_packed = PackedEncoder.build(
            SentenceTransformer(str(folder), device="cpu")
        )

    def encode(self, sentences: list[str], batch_size: int) -> tuple[float, np.ndarray]:
        """Seconds to embed `sentences` `batch_size` at a time, and the vectors."""
        started = time.perf_counter()
        vectors = self._encode(sentences, batch_size)
        return time.perf_counter() - started, vectors

    def encode_rounds(self, sentences: list[str], size: int) -> float:
        """Seconds to embed `sentences` one `encode` call per group of `size`, as they arrive."""
        return _time_rounds(sentences, size, lambda group: self._encode(group, size))

    def encode_rounds_packed(self, sentences: list[str], size: int) -> float | None:
        """As encode_rounds, with the server's unpadded pass; None where the model pads."""
        packed = self.packed
        if packed is None:
            return None
        with torch.inference_mode():
            return _time_rounds(sentences, size, packed.encode)

    def _encode(self, sentences: list[str], batch_size: int) -> np.ndarray:
        vectors = self.model.encode(
            sentences, batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False
        )
        return np.asarray(vectors, dtype=np.float32)


def _time_rounds(sentences: list[str], size: int, embed: Callable[[list[str]], object]) -> float:
    """Seconds for `embed` to take `sentences` in groups of `size`, one call per group."""
    started = time.perf_counter()
    for first in range(0, len(sentences), size):
        embed(sentences[first : first + size])
    return time.perf_counter() - started


class ServerEmbedder:
    """Concurrent Embed calls over one grpc.aio channel, on an event loop kept between calls.

    The loop and channel live as long as this object, so every timed pass reuses a connection
    that is already up, as a long-running client's would.
    """

    def __init__(self, target: str) -> None:
        self._runner = asyncio.Runner()
        self._channel: grpc.aio.Channel | None = None
        self._target = target

    def _stub(self) -> pb_grpc.GlmServiceStub:
        if self._channel is None:
            self._channel = self._runner.run(self._open())
        return glm_stub(self._channel)

    async def _open(self) -> grpc.aio.Channel:
        # Created inside the loop: a grpc.aio channel belongs to the loop it was made on.
        return grpc.aio.insecure_channel(self._target)

    def rounds(self, sentences: list[str], concurrency: int) -> tuple[float, np.ndarray]:
        """Embed `sentences` in rounds of `concurrency` simultaneous one-sentence calls."""
        stub = self._stub()
        return self._runner.run(self._rounds(stub, sentences, concurrency))

    @staticmethod
    async def _rounds(
        stub: pb_grpc.GlmServiceStub, sentences: list[str], concurrency: int
    ) -> tuple[float, np.ndarray]:
        responses: list[pb.EmbedResponse] = []
        started = time.perf_counter()
        for first in range(0, len(sentences), concurrency):
            calls = [
                stub.Embed(pb.EmbedRequest(prompt=[text]), timeout=60.0)
                for text in sentences[first : first + concurrency]
            ]
            responses.extend(await asyncio.gather(*calls))
        elapsed = time.perf_counter() - started
        # Unpacking the floats is left out of the timing: in-process encode has no such step.
        vectors = np.array([r.data[0].values for r in responses], dtype=np.float32)
        return elapsed, vectors

    def close(self) -> None:
        """Close the channel, then the loop."""
        if self._channel is not None:
            self._runner.run(self._channel.close(None))
        self._runner.close()


def run_embed(
    embedder: InProcessEmbedder,
    target: str,
    *,
    repeats: int,
    concurrency: int,
    rounds: int,
    say: Say,
) -> EmbedResults:
    """Interleave in-process and server passes over the same sentences `repeats` times."""
    sentences = make_sentences(concurrency * rounds)
    results = EmbedResults(sentences=len(sentences), concurrency=concurrency, rounds=rounds)
    server = ServerEmbedder(target)
    try:
        # Warm-up, not timed: first forward passes, the connection, the server's batcher task.
        embedder.encode(sentences[:concurrency], concurrency)
        embedder.encode_rounds_packed(sentences[:concurrency], concurrency)
        if embedder.packed is None:
            say(f"  embed: no unpadded baseline, the model pads its batches: {embedder.not_packed}")
        server.rounds(sentences[:concurrency], concurrency)
        for i in range(repeats):
            # The two sides of the main ratio run back to back.
            rounds_s = embedder.encode_rounds(sentences, concurrency)
            server_s, vectors = server.rounds(sentences, concurrency)
            packed_s = embedder.encode_rounds_packed(sentences, concurrency)
            b32_s, reference = embedder.encode(sentences, 32)
            results.rounds32_s.append(rounds_s)
            results.batch32_s.append(b32_s)
            results.server_s.append(server_s)
            if packed_s is not None:
                results.packed_rounds_s.append(packed_s)
            results.max_abs_diff = max(
                results.max_abs_diff, float(np.max(np.abs(vectors - reference)))
            )
            n = len(sentences)
            say(
                f"  embed {i + 1}/{repeats}: in-process b32 per round {n / rounds_s:6.1f}, "
                f"whole set {n / b32_s:6.1f}, unpadded per round "
                f"{'-' if packed_s is None else format(n / packed_s, '6.1f')} sent/s | "
                f"server {n / server_s:6.1f} sent/s "
                f"({concurrency} concurrent x {rounds} rounds)"
            )
    finally:
        server.close()
    return results


def run(args: argparse.Namespace, say: Say) -> Section:
    """The embed part: the in-process model, then a server of its own, then the passes."""
    from bench.models import embed_model_folder, quiet_transformers

    quiet_transformers()
    folder = embed_model_folder()
    say(f"embed: in-process model from {folder}")
    # Loaded before the server starts, so that the server's start-up time is its own.
    embedder = InProcessEmbedder(folder)
    with ServerProcess() as server:
        say(f"embed: python -m server on {server.target} (pid {server.pid})")
        server.wait_ready()
        say(
            f"embed: {args.repeats} x (in-process encode of rounds of {args.concurrency} and of "
            f"the whole set, server with {args.concurrency} concurrent one-sentence calls x "
            f"{args.rounds} rounds)"
        )
        load = BackgroundLoad(server.pid)
        before = load.snapshot()
        results = run_embed(
            embedder,
            server.target,
            repeats=args.repeats,
            concurrency=args.concurrency,
            rounds=args.rounds,
            say=say,
        )
        busy = load.cores_between(before, load.snapshot())
    say(f"  largest |server - in-process| vector component: {results.max_abs_diff:.2e}")
    metrics = [*results.metrics(), Metric("embed: other processes' CPU load", busy, "cores")]
    return Section(
        results.as_dict() | {"server": server.figures(), "background_cores": busy},
        flagged(metrics, is_noisy(busy)) + server.metrics("embed"),
    )

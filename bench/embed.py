"""Embedding benchmark: 32 concurrent one-sentence Embed calls against in-process batches of 32.

The server only reaches batch-32 throughput if its dynamic batcher gathers the concurrent calls
into shared forward passes, so this measures the batcher as much as the transport. In-process
encode at batch 1 is reported too: it is what the server would do without batching.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import numpy as np

from bench.defaults import CONCURRENCY, EMBED_RATIO_TARGET, ROUNDS
from bench.report import Metric, median
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
    batch1_s: list[float] = field(default_factory=list)
    server_s: list[float] = field(default_factory=list)
    max_abs_diff: float = 0.0

    def _rate(self, seconds: Sequence[float]) -> float:
        return self.sentences / median(seconds)

    @property
    def batch32_per_s(self) -> float:
        return self._rate(self.batch32_s)

    @property
    def batch1_per_s(self) -> float:
        return self._rate(self.batch1_s)

    @property
    def server_per_s(self) -> float:
        return self._rate(self.server_s)

    @property
    def ratio(self) -> float:
        """The median of the per-repeat ratios (each pair ran back to back; see chat.py)."""
        return median(
            [b32 / server for b32, server in zip(self.batch32_s, self.server_s, strict=True)]
        )

    def metrics(self) -> list[Metric]:
        """The lines of the final table."""
        return [
            Metric("embed: in-process encode batch 32", self.batch32_per_s, "sent/s", digits=1),
            Metric("embed: in-process encode batch 1", self.batch1_per_s, "sent/s", digits=1),
            Metric(
                f"embed: server, {self.concurrency} concurrent clients",
                self.server_per_s,
                "sent/s",
                digits=1,
            ),
            Metric(
                "embed: server / in-process encode batch 32", self.ratio, "", EMBED_RATIO_TARGET
            ),
        ]

    def as_dict(self) -> dict[str, Any]:
        """Samples and summaries, JSON-ready."""
        return {
            "sentences": self.sentences,
            "concurrency": self.concurrency,
            "rounds": self.rounds,
            "batch32_per_s": self.batch32_per_s,
            "batch1_per_s": self.batch1_per_s,
            "server_per_s": self.server_per_s,
            "ratio": self.ratio,
            "ratio_of_medians": self.server_per_s / self.batch32_per_s,
            "max_abs_diff_vs_in_process": self.max_abs_diff,
            "batch32_s": self.batch32_s,
            "batch1_s": self.batch1_s,
            "server_s": self.server_s,
        }


class InProcessEmbedder:
    """The embedding model loaded with sentence-transformers in this process."""

    def __init__(self, folder: Path) -> None:
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(str(folder), device="cpu")

    def encode(self, sentences: list[str], batch_size: int) -> tuple[float, np.ndarray]:
        """Seconds to embed `sentences` `batch_size` at a time, and the vectors."""
        started = time.perf_counter()
        vectors = self.model.encode(
            sentences, batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False
        )
        return time.perf_counter() - started, np.asarray(vectors, dtype=np.float32)


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
        return pb_grpc.GlmServiceStub(self._channel)

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
            self._runner.run(self._channel.close())
        self._runner.close()


def run_embed(
    embedder: InProcessEmbedder,
    target: str,
    *,
    repeats: int,
    concurrency: int = CONCURRENCY,
    rounds: int = ROUNDS,
    say: Callable[[str], None] = print,
) -> EmbedResults:
    """Interleave in-process and server passes over the same sentences `repeats` times."""
    sentences = make_sentences(concurrency * rounds)
    results = EmbedResults(sentences=len(sentences), concurrency=concurrency, rounds=rounds)
    server = ServerEmbedder(target)
    try:
        # Warm-up, not timed: first forward passes, the connection, the server's batcher task.
        embedder.encode(sentences[:concurrency], concurrency)
        server.rounds(sentences[:concurrency], concurrency)
        for i in range(repeats):
            # The two sides of the ratio run back to back; batch 1 is context, so it goes last.
            b32_s, reference = embedder.encode(sentences, 32)
            server_s, vectors = server.rounds(sentences, concurrency)
            b1_s, _ = embedder.encode(sentences, 1)
            results.batch32_s.append(b32_s)
            results.batch1_s.append(b1_s)
            results.server_s.append(server_s)
            results.max_abs_diff = max(
                results.max_abs_diff, float(np.max(np.abs(vectors - reference)))
            )
            n = len(sentences)
            say(
                f"  embed {i + 1}/{repeats}: in-process b32 {n / b32_s:6.1f} sent/s, "
                f"b1 {n / b1_s:6.1f} sent/s | server {n / server_s:6.1f} sent/s "
                f"({concurrency} concurrent x {rounds} rounds)"
            )
    finally:
        server.close()
    return results

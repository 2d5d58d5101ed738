"""The embedding batcher with the real default embedding model (all-MiniLM-L6-v2).

Token-budget packing: results equal one-by-one `encode`, each request gets its rows in its own
order, long requests are split over passes within the budget, prompts are sorted by length,
concurrent requests share passes, and callers that leave or overflow the queue hurt nobody else.
A recording EngineObserver counts the passes and the tokens of each.
"""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from server.config import load_model_specs
from server.domain import ModelKind, Tokenization
from server.engine.embed import EmbedBatcher, measure_pass_overhead
from server.errors import ResourceExhaustedError, UnavailableError
from server.metrics import EngineObserver
from server.models.base import EmbeddingModel
from server.settings import DEFAULT_CONFIG
from tests.conftest import SHARED_MODELS, make_settings
from tests.devices import DEFAULT_EMBED_ATOL

SENTENCE = (
    "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing "
    "matches in old town halls under grey autumn skies"
)
WORDS = SENTENCE.split(" ")


def sentence(words: int, shift: int = 0) -> str:
    """A sentence of `words` words (the same word count gives the same token count here)."""
    return " ".join(WORDS[(shift + i) % len(WORDS)] for i in range(words))


def repeated(word_count: int) -> str:
    """'hello hello ...': exactly word_count + 2 tokens ([CLS] ... [SEP]) under MiniLM."""
    return " ".join(["hello"] * word_count)


@dataclass(frozen=True, slots=True)
class Pass:
    sequences: int
    tokens: int
    padded_tokens: int


class PassRecorder(EngineObserver):
    """Remembers every forward pass the batcher reports."""

    def __init__(self) -> None:
        self.passes: list[Pass] = []

    def forward_pass(
        self,
        *,
        phase: str,
        sequences: int,
        tokens: int,
        seconds: float,
        padded_tokens: int | None = None,
    ) -> None:
        assert phase == "embed"
        assert seconds >= 0
        self.passes.append(
            Pass(sequences, tokens, tokens if padded_tokens is None else padded_tokens)
        )


class GatedModel(EmbeddingModel):
    """The real model, whose `encode` waits for `gate` (so that a test can act mid-pass)."""

    def __init__(self, inner: EmbeddingModel) -> None:
        self.inner = inner
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.encode_calls = 0

    @property
    def max_input_tokens(self) -> int:
        return self.inner.max_input_tokens

    @property
    def context_length(self) -> int:
        return self.inner.context_length

    @property
    def device(self) -> torch.device:
        return self.inner.device

    @property
    def dimensions(self) -> int:
        return self.inner.dimensions

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        self.encode_calls += 1
        self.entered.set()
        assert self.gate.wait(30), "the test never opened the gate"
        return self.inner.encode(texts)

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return self.inner.count_tokens(texts)

    def tokenize(self, text: str, max_tokens: int) -> Tokenization:
        return self.inner.tokenize(text, max_tokens)

    def warmup(self) -> None:
        self.inner.warmup()


@pytest.fixture(scope="module")
def model() -> Iterator[EmbeddingModel]:
    spec = next(s for s in load_model_specs(DEFAULT_CONFIG) if s.kind is ModelKind.EMBEDDING)
    with SHARED_MODELS.lending() as loader:
        loaded = loader(spec, Path(make_settings().cache_dir))
        assert isinstance(loaded, EmbeddingModel)
        yield loaded


def alone(model: EmbeddingModel, texts: Sequence[str]) -> np.ndarray:
    """Each text embedded by itself: the reference every batched result must equal."""
    return np.stack([model.encode([t])[0] for t in texts])


async def running(batcher: EmbedBatcher) -> EmbedBatcher:
    await batcher.start()
    return batcher


async def embed_each(batcher: EmbedBatcher, texts: Sequence[str]) -> tuple[np.ndarray, list[int]]:
    """Each text as a request of its own, all at once, on `batcher` (started here, then stopped):
    the vectors in order, and each request's token count."""
    await batcher.start()
    try:
        results = await asyncio.gather(*(batcher.embed((t,)) for t in texts))
    finally:
        await batcher.stop()
    return np.stack([vectors[0] for vectors, _ in results]), [tokens for _, tokens in results]


@pytest.fixture
def recorder() -> PassRecorder:
    return PassRecorder()


def make_batcher(
    model: EmbeddingModel,
    observer: EngineObserver,
    *,
    max_batch_size: int = 32,
    max_batch_tokens: int = 8192,
    max_wait_s: float = 0.05,
    max_waiting_prompts: int = 4096,
    pass_overhead_tokens: float | None = None,
) -> EmbedBatcher:
    return EmbedBatcher(
        model,
        max_batch_size=max_batch_size,
        max_batch_tokens=max_batch_tokens,
        max_wait_s=max_wait_s,
        max_waiting_prompts=max_waiting_prompts,
        pass_overhead_tokens=pass_overhead_tokens,
        observer=observer,
    )


async def test_mixed_lengths_equal_one_by_one_encode_in_input_order(
    model: EmbeddingModel, recorder: PassRecorder
) -> None:
    # From one word to past the 256-token limit (truncated), shuffled into six requests.
    lengths = [1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144, 233, 400]
    texts = [sentence(n, shift=i) for i, n in enumerate(lengths * 2)]
    random.Random(5).shuffle(texts)
    requests = [tuple(texts[i::6]) for i in range(6)]
    batcher = await running(make_batcher(model, recorder, max_batch_size=8, max_batch_tokens=1024))
    try:
        results = await asyncio.gather(*(batcher.embed(r) for r in requests))
    finally:
        await batcher.stop()
    for request, (vectors, tokens) in zip(requests, results, strict=True):
        assert vectors.shape == (len(request), model.dimensions)
        np.testing.assert_allclose(vectors, alone(model, request), atol=DEFAULT_EMBED_ATOL)
        assert tokens == sum(model.count_tokens(request))
    # The 400-word prompts were truncated to the model's limit, as count_tokens says.
    assert max(model.count_tokens(texts)) == model.max_input_tokens
    assert len(recorder.passes) > 1
    assert sum(p.sequences for p in recorder.passes) == len(texts)
    for p in recorder.passes:
        # A pass over the budget holds one prompt only: one longer than the budget by itself.
        assert p.padded_tokens <= 1024 or p.sequences == 1
        assert p.sequences <= 8


async def test_a_request_larger_than_the_budget_is_split_across_passes(
    model: EmbeddingModel, recorder: PassRecorder
) -> None:
    texts = tuple(sentence(8 + i % 5, shift=i) for i in range(40))
    counts = model.count_tokens(texts)
    budget = 64
    batcher = await running(make_batcher(model, recorder, max_batch_tokens=budget))
    try:
        vectors, tokens = await batcher.embed(texts)
    finally:
        await batcher.stop()
    np.testing.assert_allclose(vectors, alone(model, texts), atol=DEFAULT_EMBED_ATOL)
    assert tokens == sum(counts)
    # Every pass within the budget, so at least total/budget of them, none of them empty.
    assert all(p.padded_tokens <= budget for p in recorder.passes)
    assert len(recorder.passes) >= -(-sum(counts) // budget)
    assert sum(p.sequences for p in recorder.passes) == len(texts)
    assert sum(p.tokens for p in recorder.passes) == sum(counts)
    assert batcher.batches_run == len(recorder.passes)


async def test_a_prompt_longer_than_the_budget_runs_alone(
    model: EmbeddingModel, recorder: PassRecorder
) -> None:
    texts = (repeated(3), repeated(100), repeated(4))
    batcher = await running(make_batcher(model, recorder, max_batch_tokens=32))
    try:
        vectors, _ = await batcher.embed(texts)
    finally:
        await batcher.stop()
    np.testing.assert_allclose(vectors, alone(model, texts), atol=DEFAULT_EMBED_ATOL)
    assert sorted((p.sequences, p.tokens) for p in recorder.passes) == [(1, 102), (2, 11)]


async def test_prompts_are_sorted_by_length_to_cut_padding(
    model: EmbeddingModel, recorder: PassRecorder
) -> None:
    # Short and long prompts alternate; in arrival order every pass of 4 would be half padding.
    texts = tuple(repeated(3) if i % 2 == 0 else repeated(60) for i in range(16))
    batcher = await running(make_batcher(model, recorder, max_batch_size=4))
    try:
        vectors, _ = await batcher.embed(texts)
    finally:
        await batcher.stop()
    np.testing.assert_allclose(vectors, alone(model, texts), atol=DEFAULT_EMBED_ATOL)
    assert len(recorder.passes) == 4
    # Sorted, every pass holds prompts of one length: no padding at all.
    assert [p.padded_tokens for p in recorder.passes] == [p.tokens for p in recorder.passes]
    assert sorted(p.tokens for p in recorder.passes) == [20, 20, 248, 248]


async def test_concurrent_requests_share_passes(
    model: EmbeddingModel, recorder: PassRecorder
) -> None:
    texts = [sentence(3 + i % 7, shift=i) for i in range(16)]
    got, tokens = await embed_each(make_batcher(model, recorder), texts)
    np.testing.assert_allclose(got, alone(model, texts), atol=DEFAULT_EMBED_ATOL)
    assert len(recorder.passes) < len(texts)
    assert max(p.sequences for p in recorder.passes) > 1
    assert tokens == model.count_tokens(texts)


async def test_one_long_prompt_in_a_round_of_short_ones_runs_in_its_own_pass(
    model: EmbeddingModel, recorder: PassRecorder
) -> None:
    # The overhead the server measures at start-up, on the real model.
    overhead = measure_pass_overhead(model)
    assert overhead is not None
    assert overhead >= 0
    short = [sentence(6 + i % 4, shift=i) for i in range(15)]
    long = sentence(400)  # cut at the model's limit
    texts = [*short[:7], long, *short[7:]]
    got, _ = await embed_each(make_batcher(model, recorder, pass_overhead_tokens=overhead), texts)
    np.testing.assert_allclose(got, alone(model, texts), atol=DEFAULT_EMBED_ATOL)
    # Padded together, the 16 prompts would cost 16 x 256 tokens; the long one runs alone.
    assert sorted(p.sequences for p in recorder.passes)[0] == 1
    longest = model.max_input_tokens
    assert Pass(1, longest, longest) in recorder.passes
    assert sum(p.padded_tokens for p in recorder.passes) < 4 * longest


async def test_cancelled_callers_do_not_break_the_others(
    model: EmbeddingModel, recorder: PassRecorder
) -> None:
    gated = GatedModel(model)
    # One prompt per pass, so that the requests are still being embedded when one leaves.
    batcher = await running(make_batcher(gated, recorder, max_batch_size=1))
    first = (sentence(4), sentence(5, 1))
    # The shortest prompt: its pass runs first, and its caller leaves while that pass runs.
    leaving = (sentence(2, 2), sentence(7, 3), sentence(8, 4))
    queued_then_leaving = (sentence(9, 5),)
    last = (sentence(10, 6), sentence(3, 7))
    try:
        tasks = [asyncio.create_task(batcher.embed(t)) for t in (first, leaving)]
        assert await asyncio.to_thread(gated.entered.wait, 30)  # the first pass is running
        tasks.append(asyncio.create_task(batcher.embed(queued_then_leaving)))
        tasks.append(asyncio.create_task(batcher.embed(last)))
        await asyncio.sleep(0.05)
        tasks[1].cancel()  # mid-pass, with prompts in this pass and in later ones
        tasks[2].cancel()  # still in the queue
        gated.gate.set()
        done = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 60)
    finally:
        gated.gate.set()
        await batcher.stop()
    assert isinstance(done[1], asyncio.CancelledError)
    assert isinstance(done[2], asyncio.CancelledError)
    for texts, result in ((first, done[0]), (last, done[3])):
        assert isinstance(result, tuple)
        np.testing.assert_allclose(result[0], alone(model, texts), atol=DEFAULT_EMBED_ATOL)
    # Their later prompts were never embedded, and none is counted as waiting any more.
    assert sum(p.sequences for p in recorder.passes) == 1 + len(first + last)
    assert batcher.waiting_prompts == 0


async def test_too_many_waiting_prompts_are_refused_at_once(
    model: EmbeddingModel, recorder: PassRecorder
) -> None:
    gated = GatedModel(model)
    batcher = await running(make_batcher(gated, recorder, max_waiting_prompts=4))
    try:
        held = asyncio.create_task(batcher.embed((sentence(3), sentence(4), sentence(5))))
        assert await asyncio.to_thread(gated.entered.wait, 30)
        assert batcher.waiting_prompts == 3
        with pytest.raises(ResourceExhaustedError, match="limit 4"):
            await asyncio.wait_for(batcher.embed((sentence(6), sentence(7))), 1)
        fits = asyncio.create_task(batcher.embed((sentence(8),)))
        gated.gate.set()
        (vectors, _), (one, _) = await asyncio.wait_for(asyncio.gather(held, fits), 60)
        assert vectors.shape == (3, model.dimensions)
        assert one.shape == (1, model.dimensions)
        assert batcher.waiting_prompts == 0
        # Room again: the refused request is accepted now.
        again, _ = await batcher.embed((sentence(6), sentence(7)))
        assert again.shape == (2, model.dimensions)
    finally:
        gated.gate.set()
        await batcher.stop()


async def test_stop_answers_waiting_callers_and_refuses_new_ones(
    model: EmbeddingModel, recorder: PassRecorder
) -> None:
    gated = GatedModel(model)
    batcher = await running(make_batcher(gated, recorder))
    in_pass = asyncio.create_task(batcher.embed((sentence(3),)))
    assert await asyncio.to_thread(gated.entered.wait, 30)
    queued = asyncio.create_task(batcher.embed((sentence(4),)))
    await asyncio.sleep(0)
    await batcher.stop()
    gated.gate.set()
    for task in (in_pass, queued):
        with pytest.raises(UnavailableError):
            await asyncio.wait_for(task, 10)
    with pytest.raises(UnavailableError):
        await batcher.embed((sentence(5),))


async def test_a_burst_shares_one_pass_and_a_pause_ends_the_wait(
    model: EmbeddingModel, recorder: PassRecorder
) -> None:
    """Requests arriving one after another join one pass; a lone one never waits long."""
    # A long limit: only the burst's end (a pause of IDLE_S) can start the passes here.
    batcher = await running(make_batcher(model, recorder, max_wait_s=60.0))
    try:

        async def trickle(i: int) -> tuple[np.ndarray, int]:
            for _ in range(3 * i):  # each arrives some event-loop turns after the one before
                await asyncio.sleep(0)
            return await batcher.embed((sentence(5, shift=i),))

        burst = await asyncio.wait_for(asyncio.gather(*(trickle(i) for i in range(8))), 30)
        assert [p.sequences for p in recorder.passes] == [8]
        lone = await asyncio.wait_for(batcher.embed((sentence(6),)), 30)
    finally:
        await batcher.stop()
    assert [p.sequences for p in recorder.passes] == [8, 1]
    assert len(burst) == 8
    assert lone[0].shape == (1, model.dimensions)

"""The scheduler's step logic on a fake batch: which prompt chunks share a prefill pass, and the
short wait for more requests when it wakes from idle. The real model's side of the same logic
(bit-identical results, shared passes under load): tests/integration/test_batching.py."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from server.domain import ChatMessage, ChatRequest, Role, SamplingParams
from server.engine import scheduler as scheduler_module
from server.engine.batching import SequenceBatch
from server.engine.scheduler import Job, Scheduler

VOCAB = 8
STOP = 5  # every sequence ends at its first token: the tests are about prefill passes


class RecordingBatch(SequenceBatch):
    """Records the chunks of each prefill pass; every pass's logits pick the stop token."""

    def __init__(self, max_sequences: int, shared_min: int | None) -> None:
        super().__init__(max_sequences)
        self.shared_min = shared_min
        self.passes: list[list[tuple[int, int]]] = []  # [(slot, chunk length)] per pass

    @property
    def shared_prefill_min_tokens(self) -> int | None:
        return self.shared_min

    @staticmethod
    def _logits() -> torch.Tensor:
        logits = torch.zeros(VOCAB)
        logits[STOP] = 1.0
        return logits

    def prefill(self, slot: int, token_ids: Sequence[int]) -> torch.Tensor:
        self.passes.append([(slot, len(token_ids))])
        return self._logits()

    def prefill_shared(self, chunks: Sequence[tuple[int, Sequence[int]]]) -> list[torch.Tensor]:
        assert self.shared_min is not None
        assert all(len(ids) >= self.shared_min for _, ids in chunks)
        self.passes.append([(slot, len(ids)) for slot, ids in chunks])
        return [self._logits() for _ in chunks]

    def decode(self, tokens: Mapping[int, int]) -> Mapping[int, torch.Tensor]:
        return {slot: self._logits() for slot in tokens}

    def release(self, slot: int) -> None:
        pass


class Decoder:
    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return "x" * len(token_ids)


MODEL = SimpleNamespace(device=torch.device("cpu"), decoder=Decoder(), stop_token_ids={STOP})


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def run(
    monkeypatch: pytest.MonkeyPatch,
    loop: asyncio.AbstractEventLoop,
    prompt_lengths: Sequence[int],
    *,
    shared_min: int | None = 12,
    max_batch_tokens: int = 256,
    max_wait_s: float = 0.0,
    spacing_s: float = 0.0,
    batch: RecordingBatch | None = None,
    prefix_cache_bytes: int = 0,
) -> list[list[tuple[int, int]]]:
    """Submit one job per prompt length, `spacing_s` apart, to an idle scheduler; its passes."""
    batch = RecordingBatch(8, shared_min) if batch is None else batch
    monkeypatch.setattr(scheduler_module, "open_batch", lambda *args: batch)
    scheduler = Scheduler(
        MODEL,  # type: ignore[arg-type]  # the scheduler reads only these attributes
        max_concurrent=8,
        max_batch_tokens=max_batch_tokens,
        max_wait_s=max_wait_s,
        prefix_cache_bytes=prefix_cache_bytes,
    )
    scheduler.wait_open()
    done = threading.Semaphore(0)
    request = ChatRequest(
        model="m",
        messages=(ChatMessage(Role.USER, "hi"),),
        sampling=SamplingParams(temperature=0.0, max_tokens=4),
    )
    queues: list[asyncio.Queue[Any]] = []
    try:
        for length in prompt_lengths:
            queue: asyncio.Queue[Any] = asyncio.Queue()
            queues.append(queue)
            scheduler.submit(Job(request, [1] * length, 4, loop, queue, on_done=done.release))
            if spacing_s:
                time.sleep(spacing_s)
        for _ in prompt_lengths:
            # on_done runs on the job's loop: let the loop run until every job is done.
            while not done.acquire(timeout=0.01):
                loop.run_until_complete(asyncio.sleep(0))
    finally:
        scheduler.stop()
        scheduler.join(10)
    return batch.passes


def test_chunks_long_enough_share_a_pass_in_arrival_order_within_the_budget(
    monkeypatch: pytest.MonkeyPatch, loop: asyncio.AbstractEventLoop
) -> None:
    # Waiting for all of them to arrive first (a generous gap), so that the passes are known.
    monkeypatch.setattr(scheduler_module, "ARRIVAL_GAP_S", 0.5)
    passes = run(monkeypatch, loop, [40, 40, 5, 40, 40, 40], max_batch_tokens=96, max_wait_s=5)
    # Budget 96, chunks of 88: two 40s share; the 5-token prompt is too short to share and runs
    # alone; the next step's budget (after one decode token per running sequence) takes two.
    assert passes[0] == [(0, 40), (1, 40)]
    assert passes[1] == [(2, 5)]
    assert sorted(n for p in passes for _, n in p) == sorted([40, 40, 5, 40, 40, 40])
    assert all(len(p) <= 2 for p in passes)


def test_a_batch_that_cannot_share_runs_every_chunk_alone(
    monkeypatch: pytest.MonkeyPatch, loop: asyncio.AbstractEventLoop
) -> None:
    monkeypatch.setattr(scheduler_module, "ARRIVAL_GAP_S", 0.5)
    passes = run(monkeypatch, loop, [40, 40, 40], shared_min=None, max_wait_s=5)
    assert passes == [[(0, 40)], [(1, 40)], [(2, 40)]]


def test_a_long_prompt_goes_in_chunks_and_shares_only_one_per_pass(
    monkeypatch: pytest.MonkeyPatch, loop: asyncio.AbstractEventLoop
) -> None:
    monkeypatch.setattr(scheduler_module, "ARRIVAL_GAP_S", 0.5)
    # Budget 64, chunks of 56: the 150-token prompt is 56 + 56 + 38.
    passes = run(monkeypatch, loop, [150, 20], max_batch_tokens=64, max_wait_s=5)
    slot0 = [n for p in passes for slot, n in p if slot == 0]
    assert slot0 == [56, 56, 38]
    assert all(len({slot for slot, _ in p}) == len(p) for p in passes)


def test_an_idle_scheduler_waits_for_a_burst_to_arrive(
    monkeypatch: pytest.MonkeyPatch, loop: asyncio.AbstractEventLoop
) -> None:
    monkeypatch.setattr(scheduler_module, "ARRIVAL_GAP_S", 0.5)
    passes = run(monkeypatch, loop, [40] * 4, max_wait_s=5, spacing_s=0.01)
    assert passes[0] == [(0, 40), (1, 40), (2, 40), (3, 40)]


def test_without_a_wait_the_first_request_starts_at_once(
    monkeypatch: pytest.MonkeyPatch, loop: asyncio.AbstractEventLoop
) -> None:
    passes = run(monkeypatch, loop, [40] * 3, max_wait_s=0.0, spacing_s=0.2)
    assert passes[0] == [(0, 40)]


def test_the_wait_is_capped(
    monkeypatch: pytest.MonkeyPatch, loop: asyncio.AbstractEventLoop
) -> None:
    # Requests keep arriving well within the gap, but the first pass starts at the cap.
    monkeypatch.setattr(scheduler_module, "ARRIVAL_GAP_S", 0.5)
    passes = run(monkeypatch, loop, [20] * 8, max_wait_s=0.1, spacing_s=0.05)
    assert 1 <= len(passes[0]) < 8


def test_other_model_work_runs_on_the_scheduler_thread_between_steps(
    monkeypatch: pytest.MonkeyPatch, loop: asyncio.AbstractEventLoop
) -> None:
    batch = RecordingBatch(8, 12)
    monkeypatch.setattr(scheduler_module, "open_batch", lambda *args: batch)
    scheduler = Scheduler(
        MODEL,  # type: ignore[arg-type]  # the scheduler reads only these attributes
        max_concurrent=8,
        max_batch_tokens=256,
    )
    scheduler.wait_open()
    ran: list[tuple[str, int]] = []
    done = threading.Event()
    release = threading.Event()

    def call(name: str, then: threading.Event | None = None) -> Callable[[], None]:
        def run() -> None:
            # Where it ran, and how many prefill passes the scheduler had run by then.
            ran.append((threading.current_thread().name, len(batch.passes)))
            if then is not None:
                then.set()
            release.wait(5)

        return run

    try:
        # From idle: a call alone wakes the thread.
        assert scheduler.call_between_steps(call("first", done))
        assert done.wait(5)
        assert ran[0][0].startswith("chat-scheduler-")
        # While the thread runs a call, a request and a second call arrive: the call runs first,
        # then the step that prefills the request (calls run before each step).
        queue: asyncio.Queue[Any] = asyncio.Queue()
        request = ChatRequest(
            model="m",
            messages=(ChatMessage(Role.USER, "hi"),),
            sampling=SamplingParams(temperature=0.0, max_tokens=4),
        )
        finished = threading.Semaphore(0)
        scheduler.submit(Job(request, [1] * 20, 4, loop, queue, on_done=finished.release))
        second = threading.Event()
        assert scheduler.call_between_steps(call("second", second))
        release.set()
        assert second.wait(5)
        while not finished.acquire(timeout=0.01):
            loop.run_until_complete(asyncio.sleep(0))
        assert ran[1] == (ran[0][0], 0)
        assert batch.passes == [[(0, 20)]]
    finally:
        release.set()
        scheduler.stop()
        scheduler.join(10)
    # Once stopping, calls are refused (their callers run them elsewhere).
    assert not scheduler.call_between_steps(call("late"))
    assert len(ran) == 2


class CountingBatch(RecordingBatch):
    """Every pass's logits pick token 2 + slot (never the stop token): sequences run to length."""

    def _slot_logits(self, slot: int) -> torch.Tensor:
        logits = torch.zeros(VOCAB)
        logits[2 + slot] = 1.0
        return logits

    def prefill(self, slot: int, token_ids: Sequence[int]) -> torch.Tensor:
        super().prefill(slot, token_ids)
        return self._slot_logits(slot)

    def prefill_shared(self, chunks: Sequence[tuple[int, Sequence[int]]]) -> list[torch.Tensor]:
        super().prefill_shared(chunks)
        return [self._slot_logits(slot) for slot, _ in chunks]

    def decode(self, tokens: Mapping[int, int]) -> Mapping[int, torch.Tensor]:
        return {slot: self._slot_logits(slot) for slot in tokens}


def test_each_step_reads_every_sequences_token_back_in_one_transfer(
    monkeypatch: pytest.MonkeyPatch, loop: asyncio.AbstractEventLoop
) -> None:
    """On a GPU each read of a picked token waits for the device: one read per step, whatever
    the number of sequences, and no per-sequence `.item()`."""
    batch = CountingBatch(8, 12)
    monkeypatch.setattr(scheduler_module, "open_batch", lambda *args: batch)
    monkeypatch.setattr(scheduler_module, "ARRIVAL_GAP_S", 0.5)
    reads: list[int] = []
    tolist = torch.Tensor.tolist

    def counted(self: torch.Tensor) -> Any:
        reads.append(self.numel())
        return tolist(self)

    def refused(self: torch.Tensor) -> Any:
        raise AssertionError("a sampled token was read back on its own")

    scheduler = Scheduler(
        MODEL,  # type: ignore[arg-type]  # the scheduler reads only these attributes
        max_concurrent=8,
        max_batch_tokens=256,
        max_wait_s=5,
    )
    scheduler.wait_open()
    done = threading.Semaphore(0)
    queues: list[asyncio.Queue[Any]] = []
    monkeypatch.setattr(torch.Tensor, "tolist", counted)
    monkeypatch.setattr(torch.Tensor, "item", refused)
    try:
        for penalty in (1.0, 1.3, 1.0):  # one of them reads its history on the device
            request = ChatRequest(
                model="m",
                messages=(ChatMessage(Role.USER, "hi"),),
                sampling=SamplingParams(temperature=0.0, max_tokens=4, repetition_penalty=penalty),
            )
            queue: asyncio.Queue[Any] = asyncio.Queue()
            queues.append(queue)
            scheduler.submit(Job(request, [1] * 40, 4, loop, queue, on_done=done.release))
        for _ in range(3):
            while not done.acquire(timeout=0.01):
                loop.run_until_complete(asyncio.sleep(0))
    finally:
        monkeypatch.undo()
        scheduler.stop()
        scheduler.join(10)
    counters = scheduler.counters
    # One shared prefill pass gives the three first tokens; three decode passes the others.
    assert (counters.prefill_passes, counters.decode_passes) == (1, 3)
    assert reads == [3, 3, 3, 3]
    for queue in queues:
        events = []
        while not queue.empty():
            events.append(queue.get_nowait())
        assert events[-1].usage.completion_tokens == 4


class CopyingBatch(RecordingBatch):
    """A RecordingBatch whose slots' keys and values can be copied (for the prefix cache)."""

    def __init__(self, fail_copy_in: bool = False) -> None:
        super().__init__(8, 12)
        self.copied_in: list[int] = []
        self.fail_copy_in = fail_copy_in

    @property
    def copies_prefixes(self) -> bool:
        return True

    def copy_out(self, slot: int, start: int, end: int) -> Any:
        return [torch.zeros(end - start)]

    def copy_in(self, slot: int, parts: Sequence[Any]) -> int:
        if self.fail_copy_in:
            raise RuntimeError("no memory")
        length = sum(part[0].shape[0] for part in parts)
        self.copied_in.append(length)
        return length


def test_prompts_start_from_cached_blocks_and_compute_only_the_rest(
    monkeypatch: pytest.MonkeyPatch, loop: asyncio.AbstractEventLoop
) -> None:
    batch = CopyingBatch()
    # Chunks of 248 tokens; one prompt at a time (each ends at its first token).
    passes = run(
        monkeypatch,
        loop,
        [300, 300, 400, 100],
        batch=batch,
        prefix_cache_bytes=1 << 20,
        spacing_s=0.3,
    )
    # 300: two chunks computed; 300 again: found whole, no pass; 400: the first 248 found, the
    # rest computed; 100: nothing in common with a whole block.
    assert passes == [[(0, 248)], [(0, 52)], [(0, 152)], [(0, 100)]]
    assert batch.copied_in == [300, 248]


def test_a_failed_restore_computes_the_prompt(
    monkeypatch: pytest.MonkeyPatch, loop: asyncio.AbstractEventLoop
) -> None:
    batch = CopyingBatch(fail_copy_in=True)
    passes = run(
        monkeypatch, loop, [50, 50], batch=batch, prefix_cache_bytes=1 << 20, spacing_s=0.3
    )
    assert passes == [[(0, 50)], [(0, 50)]]

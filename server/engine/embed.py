"""Token-budget batching of Embed calls: concurrent requests share forward passes.

One worker task per embedding model gathers a round (until `max_batch_size` prompts wait, no new
request came for `IDLE_S`, or `max_wait_s` passed), counts its tokens once, sorts the prompts by
length and cuts them into passes within `max_batch_tokens` (for a model that pads, where the
padding saved is worth more than another pass), then runs the passes on the chat scheduler's
thread between its steps where there is one. Each request is answered when its last row is done.
Past `max_waiting_prompts` a request is refused with RESOURCE_EXHAUSTED. Why each choice:
docs/architecture.md, "The embedding engine".
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np

from server.engine.threads import run_in_fresh_thread
from server.errors import ResourceExhaustedError, UnavailableError
from server.metrics import NULL_OBSERVER, EngineObserver
from server.models.base import EmbeddingModel

log = logging.getLogger(__name__)

# Runs a model call off the event loop and awaits its result (default: run_in_fresh_thread; the
# registry hands in the chat scheduler's thread where there is one).
ModelRunner = Callable[[Callable[[], np.ndarray]], Awaitable[np.ndarray]]

# A pause this long between arrivals ends a burst: the round starts without waiting further.
IDLE_S = 0.001


@dataclass(slots=True, eq=False)
class _Request:
    """One Embed call: its prompts, its future, and the rows computed so far."""

    texts: tuple[str, ...]
    future: asyncio.Future[tuple[np.ndarray, int]]
    # Token counts of the prompts, once the round that holds the request counted them.
    counts: list[int] = field(default_factory=list)
    # The prompts as the passes get them: cut to little more than the model reads
    # (EmbeddingModel.clip), once the round that holds the request counted them.
    clipped: list[str] = field(default_factory=list)
    # Rows still to be embedded; the batcher's waiting count holds exactly these.
    remaining: int = 0
    vectors: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.remaining = len(self.texts)


@dataclass(slots=True, eq=False)
class _Row:
    """One prompt of one request: where its vector goes and what it costs."""

    request: _Request
    index: int
    tokens: int


def plan_passes(
    rows: list[_Row], max_rows: int, max_tokens: int, pass_overhead_tokens: float | None = None
) -> list[list[_Row]]:
    """Cut rows into forward passes by length: each pass's rows x longest row <= max_tokens.

    Rows are sorted by length (a stable sort: rows of equal length keep their arrival order) and
    each pass takes a run of neighbours. A pass always takes at least one row, so a row longer
    than max_tokens runs alone.

    `pass_overhead_tokens` is what one pass costs beyond its padded tokens, in tokens (see
    `measure_pass_overhead`). Given, the cut minimises the round's cost, `passes x overhead +
    padded tokens`: a round of short and long prompts becomes two passes when the padding saved
    outweighs one more pass. None: as few passes as the limits allow (each filled greedily).
    """
    ordered = sorted(rows, key=lambda r: r.tokens)
    if pass_overhead_tokens is None:
        return _fill_passes(ordered, max_rows, max_tokens)
    return _cheapest_passes(ordered, max_rows, max_tokens, pass_overhead_tokens)


def _fill_passes(ordered: list[_Row], max_rows: int, max_tokens: int) -> list[list[_Row]]:
    passes: list[list[_Row]] = []
    current: list[_Row] = []
    for row in ordered:
        # Ascending order: the row being added is the longest of the pass so far.
        if current and (
            len(current) + 1 > max_rows or (len(current) + 1) * max(row.tokens, 1) > max_tokens
        ):
            passes.append(current)
            current = []
        current.append(row)
    if current:
        passes.append(current)
    return passes


def _cheapest_passes(
    ordered: list[_Row], max_rows: int, max_tokens: int, overhead: float
) -> list[list[_Row]]:
    # Dynamic programming over the sorted rows: best[j] is the cheapest cut of the first j rows,
    # whose last pass is ordered[start[j]:j] (padded to the length of row j - 1, its longest).
    # O(rows x max_rows): about a millisecond for a round of 256 prompts.
    n = len(ordered)
    best = [0.0] * (n + 1)
    start = [0] * (n + 1)
    for j in range(1, n + 1):
        longest = max(ordered[j - 1].tokens, 1)
        best[j] = best[j - 1] + overhead + longest
        start[j] = j - 1
        for i in range(j - 2, max(-1, j - 1 - max_rows), -1):
            size = j - i
            if size * longest > max_tokens:
                break
            cost = best[i] + overhead + size * longest
            # On a tie the larger pass wins: fewer passes for the same cost.
            if cost <= best[j]:
                best[j] = cost
                start[j] = i
    passes: list[list[_Row]] = []
    j = n
    while j > 0:
        passes.append(ordered[start[j] : j])
        j = start[j]
    passes.reverse()
    return passes


def measure_pass_overhead(
    model: EmbeddingModel, repeats: int = 3, clock: Callable[[], float] = time.perf_counter
) -> float | None:
    """What one forward pass of `model` costs beyond its padded tokens, in tokens.

    A pass costs about `fixed + per_token x rows x longest`: the fixed part is reading every
    weight once plus the per-call work, and it dominates small passes (MiniLM on 2 CPU cores:
    about 9 ms fixed against 0.15 ms a token, so one more pass costs what 70-90 padded tokens
    do). Timed on a one-prompt pass and an 8 x 32-token pass, the fastest of `repeats` each.
    None when the larger pass is not slower (nothing to divide by): passes are then as large as
    the limits allow. On a GPU, where small passes cost about the same as larger ones, the
    overhead comes out so large that the cut is the fewest passes anyway. Blocks; run it off the
    event loop.
    """
    short = ["hello"]
    long = [" ".join(["hello"] * 30)] * 8
    short_tokens = sum(model.count_tokens(short))
    long_tokens = len(long) * max(model.count_tokens(long))
    if long_tokens <= short_tokens:
        return None  # inputs cut this short leave nothing to compare

    def fastest(texts: list[str]) -> float:
        times = []
        for _ in range(repeats):
            started = clock()
            model.encode(texts)
            times.append(clock() - started)
        return min(times)

    small_s = fastest(short)
    large_s = fastest(long)
    per_token = (large_s - small_s) / (long_tokens - short_tokens)
    if per_token <= 0:
        return None
    return max(0.0, small_s / per_token - short_tokens)


class EmbedBatcher:
    """Batches the Embed calls of one embedding model. Call start() before use, stop() after."""

    def __init__(
        self,
        model: EmbeddingModel,
        *,
        max_batch_size: int,
        max_batch_tokens: int,
        max_wait_s: float,
        max_waiting_prompts: int,
        pass_overhead_tokens: float | None = None,
        run_model: ModelRunner | None = None,
        observer: EngineObserver = NULL_OBSERVER,
    ) -> None:
        self._model = model
        self._max_batch = max_batch_size
        self._max_tokens = max_batch_tokens
        self._max_wait_s = max_wait_s
        self._max_waiting = max_waiting_prompts
        self._pass_overhead = pass_overhead_tokens
        self._run_model: ModelRunner = run_model or run_in_fresh_thread
        self._observer = observer
        self._queue: deque[_Request] = deque()
        # The requests of the round being embedded (so that stop() can answer them too).
        self._round: list[_Request] = []
        # Prompts accepted and not embedded yet: queued ones and the round's unfinished ones.
        self._pending = 0
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # Forward passes run so far (tests and benchmarks read it).
        self.batches_run = 0

    @property
    def waiting_prompts(self) -> int:
        """Prompts accepted and not embedded yet (what the waiting limit counts)."""
        return self._pending

    async def start(self) -> None:
        """Start the worker task."""
        if self._task is None:
            self._task = asyncio.create_task(self._worker(), name="embed-batcher")

    async def stop(self) -> None:
        """Stop the worker; requests not answered yet fail with UNAVAILABLE."""
        # Taken before the worker is cancelled: it forgets its round as it unwinds.
        in_round = list(self._round)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for request in [*in_round, *self._queue]:
            if not request.future.done():
                request.future.set_exception(UnavailableError("the server is shutting down"))
        self._round = []
        self._queue.clear()

    async def embed(self, texts: tuple[str, ...]) -> tuple[np.ndarray, int]:
        """The raw vectors of `texts` (one row each, in order) and the tokens they took."""
        if self._task is None:
            raise UnavailableError("the embedding batcher is not running")
        if self._pending and self._pending + len(texts) > self._max_waiting:
            raise ResourceExhaustedError(
                f"{self._pending} prompts are already waiting to be embedded "
                f"(limit {self._max_waiting}); retry later"
            )
        if not texts:
            return np.zeros((0, self._model.dimensions), dtype=np.float32), 0
        future: asyncio.Future[tuple[np.ndarray, int]] = asyncio.get_running_loop().create_future()
        request = _Request(texts, future)
        # However the future ends (result, error, the caller cancelling it), the rows it still
        # had leave the waiting count.
        future.add_done_callback(lambda _: self._forget(request))
        self._queue.append(request)
        self._pending += len(texts)
        self._wakeup.set()
        return await future

    def _forget(self, request: _Request) -> None:
        self._pending -= request.remaining
        request.remaining = 0

    def _queued_live(self) -> int:
        return sum(r.remaining for r in self._queue if not r.future.done())

    def _take_round(self) -> list[_Request]:
        """Every request still wanted, in arrival order; the queue is left empty."""
        taken = [r for r in self._queue if not r.future.done()]
        self._queue.clear()
        return taken

    async def _worker(self) -> None:
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
            # Let a burst of concurrent calls join this round (see the module docstring).
            deadline = time.monotonic() + self._max_wait_s
            while self._queued_live() < self._max_batch:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), min(left, IDLE_S))
                except TimeoutError:
                    break
            self._round = self._take_round()
            try:
                if self._round:
                    await self._run_round(self._round)
            finally:
                self._round = []

    async def _run_round(self, requests: list[_Request]) -> None:
        try:
            # Counting and cutting on a worker thread: for a round of hundreds of prompts they
            # take milliseconds the event loop spends answering calls instead.
            passes, answer_at_end = await asyncio.to_thread(self._plan_round, requests)
        except Exception as exc:
            log.exception("planning a round of %d requests failed", len(requests))
            _fail(requests, exc)
            return
        done: list[_Request] = []
        for rows_of_pass in passes:
            live = [row for row in rows_of_pass if not row.request.future.done()]
            if live:
                done.extend(await self._run_pass(live))
            if not answer_at_end:
                _answer(done)
                done = []
        _answer(done)

    def _plan_round(self, requests: list[_Request]) -> tuple[list[list[_Row]], bool]:
        """Count the round's tokens (as the model will see them) and cut it into passes.

        Also says whether to answer every request at the end of the round rather than each as
        soon as its rows are done: when the limits would have let the whole round run as one
        padded pass. Then every caller would have waited for that one pass anyway, the cheaper
        cut ends sooner, and answering between passes would only slow the next one down: the
        replies and the calls they bring back keep the event loop busy while the next pass
        runs, and each of its many small operations waits for the GIL (measured with 32
        concurrent one-sentence clients: rounds cut in two and answered between the passes took
        129-138 ms against 105-117 ms for one padded pass, and served 0.94 of the sentences a
        second of one-pass rounds; answered at the end, 1.01).
        """
        counts, clipped = self._model.clip([t for r in requests for t in r.texts])
        rows: list[_Row] = []
        at = 0
        for request in requests:
            request.counts = counts[at : at + len(request.texts)]
            request.clipped = clipped[at : at + len(request.texts)]
            at += len(request.texts)
            rows.extend(_Row(request, i, n) for i, n in enumerate(request.counts))
        passes = plan_passes(rows, self._max_batch, self._max_tokens, self._pass_overhead)
        longest = max(max(row.tokens for row in rows), 1)
        one_pass_fits = len(rows) == 1 or (
            len(rows) <= self._max_batch and len(rows) * longest <= self._max_tokens
        )
        return passes, one_pass_fits

    async def _run_pass(self, rows: list[_Row]) -> list[_Request]:
        """Embed `rows` and store each row's vector; the requests whose rows are now all done."""
        texts = [row.request.clipped[row.index] for row in rows]
        started = time.monotonic()
        try:
            vectors = await self._run_model(functools.partial(self._model.encode, texts))
        except Exception as exc:
            log.exception("embedding pass of %d prompts failed", len(texts))
            _fail(list({id(row.request): row.request for row in rows}.values()), exc)
            return []
        tokens = [row.tokens for row in rows]
        self.batches_run += 1
        self._observer.forward_pass(
            phase="embed",
            sequences=len(rows),
            tokens=sum(tokens),
            # What the pass computed: every row as long as the longest, unless the model packs.
            padded_tokens=len(rows) * max(tokens) if self._model.pads_batches else sum(tokens),
            seconds=time.monotonic() - started,
        )
        finished: list[_Request] = []
        for row, vector in zip(rows, vectors, strict=True):
            request = row.request
            if request.future.done():  # its caller left while the pass ran
                continue
            if request.vectors is None:
                request.vectors = np.empty((len(request.texts), vector.shape[0]), np.float32)
            request.vectors[row.index] = vector
            request.remaining -= 1
            self._pending -= 1
            if request.remaining == 0:
                finished.append(request)
        return finished


def _answer(requests: list[_Request]) -> None:
    for request in requests:
        if not request.future.done():  # a caller may leave while its answer waits
            assert request.vectors is not None
            request.future.set_result((request.vectors, sum(request.counts)))


def _fail(requests: list[_Request], exc: Exception) -> None:
    for request in requests:
        if not request.future.done():
            request.future.set_exception(exc)

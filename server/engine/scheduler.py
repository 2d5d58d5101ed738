"""The continuous-batching scheduler: one thread per chat model runs the steps of every sequence.

One iteration of the loop is one *step*:

1. Admit: requests handed over by the engine (each already holds one of the `max_concurrent`
   places) take the lowest free slot; one cancelled meanwhile is dropped without starting.
2. Reap: cancelled sequences leave, freeing their slot and its cache memory at once.
3. Decode: ONE forward pass feeds every decoding sequence its last token; each sequence picks its
   next token from its own row of logits with its own sampler, stops and detokenizer.
4. Prefill: prompts of newly admitted sequences are fed in chunks. Chunks long enough to give the
   same results in a shared pass as alone (SequenceBatch.shared_prefill_min_tokens, in passes of at
   most shared_prefill_max_tokens, probed on the model) share passes, one chunk per prompt, in
   arrival order: a pass of several chunks costs less per token than each alone (225 tokens: about
   0.6 of five 45-token passes), so waiting prompts get their first token sooner. Shorter chunks
   run alone. A step's token budget (`max_batch_tokens`) is shared: the decode pass takes one token
   per running sequence, prompt chunks take the rest, and at least one chunk runs per step. Chunk
   boundaries are fixed multiples of `max_batch_tokens - max_concurrent` from the prompt's start,
   whatever else runs, so a prompt is always computed the same way (greedy output does not depend
   on the load) and a long prompt never holds the running sequences up for more than one chunk per
   step. A sequence whose prompt is complete picks its first token from the last chunk's logits, so
   its first text goes out in the step that finished its prompt; it joins the decode pass from the
   next step on.

Between steps the thread also runs the process's other model work handed to it
(`call_between_steps`: embedding passes), so that one OpenMP team serves all of it.

The loop sleeps while there is nothing to do. Events for the consumers are handed to their event
loops after each decode pass and each completed prompt, in one call per event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from server.domain import ChatRequest, FinishReason, GenerationEvent, Usage
from server.engine.batching import ForwardLoopBatch, SequenceBatch
from server.engine.detokenize import IncrementalDetokenizer
from server.engine.kv_slots import SlotBatch, unsupported_reason
from server.engine.prefix_cache import PrefixCache, PrefixCacheStats, block_keys
from server.engine.sampling import TokenSampler
from server.engine.stops import StopStringMatcher
from server.errors import UnavailableError
from server.models.base import ChatModel

log = logging.getLogger(__name__)

__all__ = ["ARRIVAL_GAP_S", "Job", "Scheduler", "SchedulerCounters", "StepObserver"]

# A pause this long between arrivals ends a burst (see Scheduler._wait_for_work): twice the gaps
# seen between concurrent clients' requests, short next to a prefill pass (~130 ms).
ARRIVAL_GAP_S = 0.008

# What a consumer receives: events, or an exception that ends its stream.
Item = GenerationEvent | BaseException
# Reports one forward pass: (phase "prefill" or "decode", sequences, tokens, padded tokens, s).
StepObserver = Callable[[str, int, int, int, float], None]


def open_batch(
    model: ChatModel,
    max_sequences: int,
    max_pass_tokens: int = 0,
    lean_decode: bool = True,
    compile_decode: bool = False,
) -> SequenceBatch:
    """The best `SequenceBatch` for `model`: batched when its causal LM supports it.

    `max_pass_tokens`: the most tokens a prefill pass is given (chunks of several prompts share
    passes up to that size where the model allows it). `lean_decode`: decode passes in few
    operations where the model allows it (server/engine/lean_decode.py); `compile_decode`: that
    pass compiled (server/engine/compiled_decode.py).
    """
    causal_lm = model.causal_lm
    if causal_lm is not None:
        reason = unsupported_reason(causal_lm)
        if reason is None:
            return SlotBatch(
                causal_lm,
                model.device,
                max_sequences,
                max_pass_tokens,
                lean_decode=lean_decode,
                compile_decode=compile_decode,
            )
        log.warning("chat model decodes one sequence per forward pass: %s", reason)
    return ForwardLoopBatch(model, max_sequences)


@dataclass(slots=True)
class Job:
    """One request's generation, shared by its consumer (event loop) and the scheduler thread."""

    request: ChatRequest
    prompt_ids: list[int]
    max_new_tokens: int
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[Item]
    # Called on the job's event loop once the job holds no slot any more (exactly once).
    on_done: Callable[[], None]
    cancelled: threading.Event = field(default_factory=threading.Event)


@dataclass(frozen=True, slots=True)
class SchedulerCounters:
    """What the scheduler has done since it started (for tests and metrics)."""

    forward_passes: int
    decode_passes: int
    # Sequence-tokens decoded (the sum of the real rows of all decode passes).
    decode_tokens: int
    # Rows computed by decode passes, padding rows included.
    decode_rows: int
    prefill_passes: int
    # Prompt chunks fed (a pass shared by several prompts feeds one chunk of each).
    prefill_chunks: int
    prefill_tokens: int
    # Prompts that reused cached prompt blocks, and the prompt tokens those saved.
    prefix_cache_hits: int = 0
    prefix_cache_tokens: int = 0


class _Sequence:
    """A job in a slot: its prompt progress, sampler, detokenizer, stops and output so far."""

    def __init__(self, job: Job, slot: int, model: ChatModel) -> None:
        self.job = job
        self.slot = slot
        params = job.request.sampling
        self.sampler = TokenSampler(params, model.device)
        self.detok = IncrementalDetokenizer(model.decoder, job.prompt_ids)
        self.stops = StopStringMatcher(params.stop)
        self.stop_ids = model.stop_token_ids | frozenset(params.stop_token_ids)
        n_prompt = len(job.prompt_ids)
        # Prompt and generated ids, only for a repetition penalty: preallocated on the sampler's
        # device, read as a prefix, and each pick written in place there (no copy per step).
        self.history: torch.Tensor | None = None
        if self.sampler.uses_history:
            self.history = torch.empty(
                n_prompt + job.max_new_tokens, dtype=torch.long, device=model.device
            )
            self.history[:n_prompt] = torch.tensor(job.prompt_ids, dtype=torch.long)
        self.length = n_prompt
        self.prefilled = 0
        self.generated = 0
        # The token the next decode pass feeds (None while the prompt is being fed).
        self.next_token: int | None = None
        # With a prefix cache: each prompt block's (key, start, end), see prefix_cache.py.
        self.blocks: list[tuple[bytes, int, int]] = []

    @property
    def prompt_left(self) -> int:
        return len(self.job.prompt_ids) - self.prefilled

    def pick(self, logits: torch.Tensor) -> torch.Tensor:
        """The next token from `logits`, on the device (`accept` takes it once read back)."""
        history = self.history
        token = self.sampler.pick(None if history is None else history[: self.length], logits)
        if history is not None and self.length < history.shape[0]:
            # Kept only if `accept` moves `length` past it.
            history[self.length] = token
        return token

    def accept(self, token: int) -> tuple[str, FinishReason | None]:
        """Take the picked token; return the text it releases and why the sequence ended."""
        self.generated += 1
        if token in self.stop_ids:
            return "", FinishReason.STOP
        text, stopped = self.stops.feed(self.detok.push(token))
        if stopped:
            return text, FinishReason.STOP
        if self.generated >= self.job.max_new_tokens:
            return text, FinishReason.LENGTH
        self.length += 1
        self.next_token = token
        return text, None

    def final_event(self, text: str, finish: FinishReason) -> GenerationEvent:
        """The last event: remaining text, finish reason and usage."""
        if not self.stops.stopped:
            # Text held back for an incomplete character or a possible stop string is released
            # now, unless it completes a stop string.
            tail, stopped = self.stops.feed(self.detok.flush())
            if stopped:
                finish = FinishReason.STOP
                text += tail
            else:
                text += tail + self.stops.flush()
        usage = Usage(prompt_tokens=len(self.job.prompt_ids), completion_tokens=self.generated)
        return GenerationEvent(text, finish_reason=finish, usage=usage)


class Scheduler:
    """Runs the chat sequences of one model on a thread of its own (see the module docstring)."""

    def __init__(
        self,
        model: ChatModel,
        *,
        max_concurrent: int,
        max_batch_tokens: int,
        max_wait_s: float = 0.0,
        observer: StepObserver | None = None,
        prefix_cache_bytes: int = 0,
        lean_decode: bool = True,
        compile_decode: bool = False,
    ) -> None:
        if max_batch_tokens <= max_concurrent:
            raise ValueError(
                f"max_batch_tokens ({max_batch_tokens}) must be larger than max_concurrent "
                f"({max_concurrent}): a step holds one token per running sequence plus a chunk "
                "of a prompt"
            )
        self._model = model
        self._max_concurrent = max_concurrent
        self._max_batch_tokens = max_batch_tokens
        self._chunk = max_batch_tokens - max_concurrent
        self._max_wait_s = max_wait_s
        self._observer = observer
        self._prefix_cache_bytes = prefix_cache_bytes
        self._lean_decode = lean_decode
        self._compile_decode = compile_decode
        # Set when the batch opens, if it can copy keys and values (see prefix_cache.py).
        self._prefix: PrefixCache | None = None
        self._cond = threading.Condition()
        self._inbox: deque[Job] = deque()
        # Other model work (embedding passes) run on this thread between steps.
        self._calls: deque[Callable[[], None]] = deque()
        self._stopping = False
        # Why the thread ended, for requests submitted after that (None: still running).
        self._ended: BaseException | None = None
        # Owned by the scheduler thread.
        self._batch: SequenceBatch | None = None
        self._slots: list[_Sequence | None] = [None] * max_concurrent
        self._prefilling: deque[_Sequence] = deque()
        self._outbox: dict[asyncio.AbstractEventLoop, list[tuple[Job, Item | None]]] = {}
        self._counts = dict.fromkeys(
            (
                "decode_passes",
                "decode_tokens",
                "decode_rows",
                "prefill_passes",
                "prefill_chunks",
                "prefill_tokens",
            ),
            0,
        )
        # Set once the thread has opened the batch (or failed to); see wait_open.
        self._opened = threading.Event()
        self._thread = threading.Thread(
            target=self._main, name=f"chat-scheduler-{id(self):x}", daemon=True
        )
        self._thread.start()

    # -- the engine's side (any thread) ---------------------------------------------------------

    def submit(self, job: Job) -> None:
        """Hand a job over; it starts at the next step (or fails at once after `stop`)."""
        with self._cond:
            if not self._stopping:
                self._inbox.append(job)
                self._cond.notify()
                return
        items: list[tuple[Job, Item | None]] = [(job, self._ended or _shutting_down()), (job, None)]
        job.loop.call_soon_threadsafe(_deliver, items)

    def call_between_steps(self, call: Callable[[], None]) -> bool:
        """Run `call` on the scheduler thread before its next step; False once stopping.

        For the other model work of the process (embedding passes): on a CPU it then shares
        this thread's OpenMP team instead of starting one of its own, so both run at full speed
        instead of each at the throttled speed of two teams on too few CPUs (see
        server/engine/threads.py). `call` must not raise; it delays the next step by its length.
        """
        with self._cond:
            if self._stopping:
                return False
            self._calls.append(call)
            self._cond.notify()
            return True

    def wait_open(self) -> None:
        """Block until the batch is open; raise why it could not be opened.

        Opening measures how the model's linear layers run fastest (a second or two on a CPU),
        so the caller waits for it before reporting the model ready: measured while other
        models load or requests run, the choice would be skewed.
        """
        self._opened.wait()
        if self._batch is None:
            raise self._ended or RuntimeError("the chat scheduler stopped before it opened")

    def stop(self) -> None:
        """Stop after the current step; sequences still running fail with UNAVAILABLE."""
        with self._cond:
            self._stopping = True
            self._cond.notify()

    def join(self, timeout: float | None = None) -> None:
        """Wait for the thread to end (after `stop`)."""
        self._thread.join(timeout)

    @property
    def counters(self) -> SchedulerCounters:
        """A snapshot of what the scheduler has done."""
        batch = self._batch
        cache = self.prefix_cache_stats
        return SchedulerCounters(
            forward_passes=batch.forward_passes if batch is not None else 0,
            prefix_cache_hits=0 if cache is None else cache.hits,
            prefix_cache_tokens=0 if cache is None else cache.tokens_saved,
            **self._counts,
        )

    @property
    def prefix_cache_stats(self) -> PrefixCacheStats | None:
        """The prefix cache's counters (None: no prefix cache)."""
        cache = self._prefix
        return None if cache is None else cache.stats

    @property
    def batch(self) -> SequenceBatch | None:
        """The model side of the batch (None until the thread has opened it)."""
        return self._batch

    # -- the scheduler thread -------------------------------------------------------------------

    def _main(self) -> None:
        try:
            self._batch = open_batch(
                self._model,
                self._max_concurrent,
                self._max_batch_tokens,
                self._lean_decode,
                self._compile_decode,
            )
            if self._prefix_cache_bytes > 0:
                if self._batch.copies_prefixes:
                    self._prefix = PrefixCache(self._prefix_cache_bytes, self._chunk)
                    log.info(
                        "prefix cache: up to %.0f MiB of prompt blocks of %d tokens",
                        self._prefix_cache_bytes / (1 << 20),
                        self._chunk,
                    )
                else:
                    log.info("prefix cache off: this model's batch cannot copy keys and values")
        except BaseException as exc:
            log.exception("the chat scheduler could not start")
            self._fail_everything(exc)
            return
        finally:
            self._opened.set()
        try:
            while self._wait_for_work():
                self._run_calls()
                if self._inbox or self._busy():
                    self._step()
                    self._flush()
        except BaseException as exc:  # a bug: fail every request rather than hang them all
            log.exception("the chat scheduler failed")
            self._fail_everything(exc)
            self._run_calls()
            return
        self._fail_everything(_shutting_down())
        # Calls accepted before stopping still run: their callers are waiting for them.
        self._run_calls()

    def _run_calls(self) -> None:
        while True:
            with self._cond:
                if not self._calls:
                    return
                call = self._calls.popleft()
            call()

    def _wait_for_work(self) -> bool:
        """Block until there is something to do; False once stopping.

        Woken from idle by a request, wait while more keep arriving (a gap of ARRIVAL_GAP_S
        ends it; `max_wait_s` caps it): clients that start together reach the scheduler a few
        milliseconds apart (8 streams from one client process here: over 5-15 ms, up to 4 ms
        between two), and prompts that arrive before the first pass share it rather than wait for
        it (their median first token: 0.78 -> 0.50 s when a 4 ms gap cut such a burst in two). A
        lone request pays one gap. While sequences run there is no wait: new requests join at the
        next step.
        """
        with self._cond:
            idle = not self._busy()
            while not self._stopping and not self._inbox and not self._busy() and not self._calls:
                self._cond.wait()
            if idle and self._inbox and self._max_wait_s > 0:
                deadline = time.monotonic() + self._max_wait_s
                arrived = len(self._inbox)
                gap_ends = time.monotonic() + ARRIVAL_GAP_S
                while not self._stopping and len(self._inbox) < self._max_concurrent:
                    left = min(deadline, gap_ends) - time.monotonic()
                    if left <= 0:
                        break
                    # Woken by a request, by other work (which waits for the burst too), or by
                    # the timeout: only a new request restarts the gap.
                    self._cond.wait(left)
                    if len(self._inbox) != arrived:
                        arrived = len(self._inbox)
                        gap_ends = time.monotonic() + ARRIVAL_GAP_S
            return not self._stopping

    def _busy(self) -> bool:
        return any(seq is not None for seq in self._slots)

    def _step(self) -> None:
        self._admit()
        self._reap()
        decoded = self._decode()
        self._prefill(self._max_batch_tokens - decoded)

    def _admit(self) -> None:
        with self._cond:
            jobs = list(self._inbox)
            self._inbox.clear()
        complete: list[tuple[_Sequence, torch.Tensor]] = []
        for job in jobs:
            if job.cancelled.is_set():
                self._post(job, None)  # never started: only the place is given back
                continue
            slot = self._slots.index(None)  # the engine admits at most max_concurrent jobs
            seq = _Sequence(job, slot, self._model)
            self._slots[slot] = seq
            logits = self._restore(seq)
            if logits is None:
                self._prefilling.append(seq)
            else:
                complete.append((seq, logits))
        if complete:
            # Whole prompts found in the prefix cache: their first token goes out now.
            self._sample(complete)
            self._flush()

    def _restore(self, seq: _Sequence) -> torch.Tensor | None:
        """Start `seq` from the cached blocks its prompt begins with (see prefix_cache.py).

        Returns the logits after the prompt when the whole prompt was found (no prefill left).
        """
        cache, batch = self._prefix, self._batch
        if cache is None or batch is None:
            return None
        prompt = seq.job.prompt_ids
        seq.blocks = block_keys(prompt, self._chunk)
        found = cache.lookup(prompt)
        if not found:
            return None
        try:
            seq.prefilled = batch.copy_in(seq.slot, [block.kv for block in found])
        except Exception:
            log.exception("restoring a cached prompt prefix failed; the prompt is computed")
            batch.release(seq.slot)
            seq.prefilled = 0
            return None
        # A copy: sampling must never change what the cache holds.
        return found[-1].logits.clone() if seq.prompt_left == 0 else None

    def _remember(self, seq: _Sequence, start: int, end: int, logits: torch.Tensor) -> None:
        """Keep the prompt block [start, end) just computed for `seq` in the prefix cache."""
        cache, batch = self._prefix, self._batch
        if cache is None or batch is None or not seq.blocks:
            return
        index = start // self._chunk
        key, block_start, block_end = seq.blocks[index]
        if (block_start, block_end) != (start, end):
            return  # not a whole block (cannot happen with fixed chunk boundaries)
        parent = seq.blocks[index - 1][0] if index else None
        if not cache.wants(key, parent):
            cache.touch(key)
            return
        try:
            kv = batch.copy_out(seq.slot, start, end)
        except Exception:
            log.exception("copying a prompt block for the prefix cache failed")
            return
        tokens = seq.job.prompt_ids[start:end]
        cache.insert(key, parent, tokens, kv, logits.detach().clone())

    def _reap(self) -> None:
        for seq in self._slots:
            if seq is not None and seq.job.cancelled.is_set():
                self._leave(seq, None)

    def _leave(self, seq: _Sequence, last: Item | None) -> None:
        """Free the slot and memory of `seq`; send `last` (if any) and give its place back."""
        self._slots[seq.slot] = None
        if seq in self._prefilling:
            self._prefilling.remove(seq)
        assert self._batch is not None
        self._batch.release(seq.slot)
        self._post(seq.job, last)

    def _decode(self) -> int:
        """One forward pass for every decoding sequence; returns how many tokens it fed."""
        decoding = [s for s in self._slots if s is not None and s.next_token is not None]
        if not decoding:
            return 0
        batch = self._batch
        assert batch is not None
        tokens = {s.slot: s.next_token for s in decoding if s.next_token is not None}
        started = time.perf_counter()
        try:
            logits = batch.decode(tokens)
        except Exception as exc:
            log.exception("a decode pass failed (%d sequences)", len(decoding))
            for seq in decoding:
                self._leave(seq, exc)
            return len(decoding)
        self._report("decode", len(decoding), batch.decode_rows, time.perf_counter() - started)
        self._sample([(seq, logits[seq.slot]) for seq in decoding])
        self._flush()
        return len(decoding)

    def _prefill(self, budget: int) -> None:
        """Feed prompt chunks within `budget` tokens (at least one chunk when any is waiting)."""
        batch = self._batch
        assert batch is not None
        ran = False
        while True:
            group = self._next_chunks(budget, first=not ran)
            if not group:
                return
            chunks = [(seq.slot, seq.job.prompt_ids[start:end]) for seq, start, end in group]
            tokens = sum(end - start for _, start, end in group)
            started = time.perf_counter()
            try:
                if len(chunks) == 1:
                    results = [batch.prefill(*chunks[0])]
                else:
                    results = batch.prefill_shared(chunks)
            except Exception as exc:
                log.exception("a prefill pass failed (%d prompts)", len(group))
                for seq, _, _ in group:
                    self._leave(seq, exc)
                continue
            self._report("prefill", len(group), tokens, time.perf_counter() - started)
            ran = True
            budget -= tokens
            complete = []
            for (seq, start, end), logits in zip(group, results, strict=True):
                self._remember(seq, start, end, logits)
                seq.prefilled = end
                if seq.prompt_left == 0:
                    self._prefilling.remove(seq)
                    complete.append((seq, logits))
            self._sample(complete)
            self._flush()  # first texts go out now, not after the other prompts

    def _next_chunks(self, budget: int, *, first: bool) -> list[tuple[_Sequence, int, int]]:
        """The chunks the next prefill pass feeds: [(sequence, start, end)] of its prompt.

        The next chunk of the first waiting prompt, fitting `budget` unless it is the step's
        first; then, where the batch lets chunks share a pass, the next chunk of each following
        prompt while all are long enough to share and fit the budget together.
        """
        assert self._batch is not None
        shared_min = self._batch.shared_prefill_min_tokens
        shared_max = self._batch.shared_prefill_max_tokens
        group: list[tuple[_Sequence, int, int]] = []
        used = 0
        for seq in list(self._prefilling):
            if seq.job.cancelled.is_set():
                self._leave(seq, None)
                continue
            # The chunk ends at the next multiple of `_chunk` (fixed boundaries, see above).
            start = seq.prefilled
            end = min(len(seq.job.prompt_ids), (start // self._chunk + 1) * self._chunk)
            size = end - start
            if used + size > budget and not (first and not group):
                break
            if group and (size < (shared_min or 0) or used + size > (shared_max or budget)):
                break  # too short to share, or too many tokens: it runs in a pass of its own
            group.append((seq, start, end))
            used += size
            if shared_min is None or size < shared_min:
                break
        return group

    def _sample(self, pairs: list[tuple[_Sequence, torch.Tensor]]) -> None:
        """Each sequence picks its next token from its logits, then advances.

        The picks are read back in one transfer: on a GPU, each read waits for the device.
        """
        picked: list[tuple[_Sequence, torch.Tensor]] = []
        for seq, logits in pairs:
            try:
                picked.append((seq, seq.pick(logits)))
            except Exception as exc:
                log.exception("sampling failed")
                self._leave(seq, exc)
        if not picked:
            return
        try:
            tokens: list[int] = torch.stack([token for _, token in picked]).tolist()
        except Exception as exc:  # a device error surfaces when the picks are read
            log.exception("sampling failed (%d sequences)", len(picked))
            for seq, _ in picked:
                self._leave(seq, exc)
            return
        for (seq, _), token in zip(picked, tokens, strict=True):
            self._advance(seq, token)

    def _advance(self, seq: _Sequence, token: int) -> None:
        """Let `seq` take its next token; send its text; let it leave when it has ended."""
        try:
            text, finish = seq.accept(token)
        except Exception as exc:
            log.exception("sampling failed")
            self._leave(seq, exc)
            return
        if finish is not None:
            self._leave(seq, seq.final_event(text, finish))
        elif text:
            self._post(seq.job, GenerationEvent(text))

    def _report(self, phase: str, sequences: int, rows_or_tokens: int, seconds: float) -> None:
        if phase == "decode":
            self._counts["decode_passes"] += 1
            self._counts["decode_tokens"] += sequences
            self._counts["decode_rows"] += rows_or_tokens
            tokens, padded = sequences, rows_or_tokens
        else:
            self._counts["prefill_passes"] += 1
            self._counts["prefill_chunks"] += sequences
            self._counts["prefill_tokens"] += rows_or_tokens
            tokens = padded = rows_or_tokens
        if self._observer is not None:
            try:
                self._observer(phase, sequences, tokens, padded, seconds)
            except Exception:
                log.exception("the step observer failed")

    # -- handing results to the event loops -----------------------------------------------------

    def _post(self, job: Job, item: Item | None) -> None:
        """Queue `item` for the job's consumer; None marks the job done (its place is returned).

        A job is done when its last event or its error is posted, or when it leaves cancelled.
        """
        items = self._outbox.setdefault(job.loop, [])
        if item is not None:
            items.append((job, item))
        if item is None or isinstance(item, BaseException) or item.finish_reason is not None:
            items.append((job, None))

    def _flush(self) -> None:
        outbox, self._outbox = self._outbox, {}
        for loop, items in outbox.items():
            # A closed loop has nobody listening any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_deliver, items)

    def _fail_everything(self, exc: BaseException) -> None:
        """Fail every sequence and queued job with `exc` (the thread is ending)."""
        self._ended = exc
        for seq in self._slots:
            if seq is not None:
                self._slots[seq.slot] = None
                if self._batch is not None:
                    self._batch.release(seq.slot)
                self._post(seq.job, exc)
        self._prefilling.clear()
        with self._cond:
            self._stopping = True
            jobs = list(self._inbox)
            self._inbox.clear()
        for job in jobs:
            self._post(job, exc)
        self._flush()


def _shutting_down() -> UnavailableError:
    return UnavailableError("the chat engine is shutting down; retry on another server")


def _deliver(items: list[tuple[Job, Item | None]]) -> None:
    """On the event loop: put items in their consumers' queues; None gives a job's place back."""
    for job, item in items:
        if item is None:
            job.on_done()
        else:
            job.queue.put_nowait(item)

"""Chat generation: requests queue for a place, then share batched decode steps on one thread.

The event-loop side (this module) checks a request against the model's limits, bounds how many
requests run (`max_concurrent`) and wait (`max_waiting`; past that a request is refused at once),
and streams each request's events back. The work itself runs on the model's scheduler thread
(server/engine/scheduler.py): every step, one forward pass advances every running sequence by one
token, new requests join at the next step, and a finished or cancelled one leaves at once.

Why a thread and not the event loop: a forward pass takes milliseconds to seconds, and torch
releases the GIL inside its kernels, so the event loop keeps answering other calls meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass

from server.config import CHAT_MAX_BATCH_TOKENS
from server.domain import ChatRequest, GenerationEvent
from server.engine.batching import SequenceBatch
from server.engine.scheduler import Item, Job, Scheduler, SchedulerCounters
from server.engine.tool_calls import detect_tool_calls
from server.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    ResourceExhaustedError,
    UnavailableError,
)
from server.metrics import EngineObserver
from server.models.base import ChatModel

log = logging.getLogger(__name__)

__all__ = ["ChatEngine", "ChatEngineStats", "SchedulerCounters"]

# How long shutdown() waits for the scheduler's current step to end.
_SHUTDOWN_WAIT_S = 5.0


@dataclass(frozen=True, slots=True)
class ChatEngineStats:
    """What the engine is doing right now."""

    # Sequences that hold (or are about to take) a slot and its cache memory.
    running: int
    # Requests waiting for a place.
    waiting: int
    # Prompts that reused cached prompt blocks, and the prompt tokens that saved (prefix cache).
    prefix_cache_hits: int = 0
    prefix_cache_tokens_saved: int = 0


class ChatEngine:
    """Generates replies for one chat model, continuously batched."""

    def __init__(
        self,
        model: ChatModel,
        *,
        max_concurrent: int,
        max_waiting: int,
        max_new_tokens: int,
        max_batch_tokens: int = CHAT_MAX_BATCH_TOKENS,
        max_wait_s: float = 0.0,
        observer: EngineObserver | None = None,
        prefix_cache_bytes: int = 0,
        lean_decode: bool = True,
        compile_decode: bool = False,
    ) -> None:
        self._model = model
        self._max_concurrent = max_concurrent
        self._max_waiting = max_waiting
        self._max_new_tokens = max_new_tokens
        self._max_batch_tokens = max_batch_tokens
        self._places = asyncio.Semaphore(max_concurrent)
        self._waiting = 0
        self._running = 0
        self._closed = False

        def report(phase: str, sequences: int, tokens: int, padded: int, seconds: float) -> None:
            if observer is not None:
                observer.forward_pass(
                    phase=phase,
                    sequences=sequences,
                    tokens=tokens,
                    seconds=seconds,
                    padded_tokens=padded,
                )

        self._scheduler = Scheduler(
            model,
            max_concurrent=max_concurrent,
            max_batch_tokens=max_batch_tokens,
            max_wait_s=max_wait_s,
            observer=report if observer is not None else None,
            prefix_cache_bytes=prefix_cache_bytes,
            lean_decode=lean_decode,
            compile_decode=compile_decode,
        )

    @property
    def stats(self) -> ChatEngineStats:
        """How many sequences run and how many requests wait for a place."""
        cache = self._scheduler.prefix_cache_stats
        return ChatEngineStats(
            running=self._running,
            waiting=self._waiting,
            prefix_cache_hits=0 if cache is None else cache.hits,
            prefix_cache_tokens_saved=0 if cache is None else cache.tokens_saved,
        )

    @property
    def counters(self) -> SchedulerCounters:
        """Forward passes, decoded tokens and prefilled tokens so far (tests, metrics)."""
        return self._scheduler.counters

    @property
    def max_batch_tokens(self) -> int:
        """Tokens one scheduler step feeds (server/engine/scheduler.py)."""
        return self._max_batch_tokens

    @property
    def batch(self) -> SequenceBatch | None:
        """The model side of the batch (None until the scheduler has opened it)."""
        return self._scheduler.batch

    @property
    def cache_bytes(self) -> int | None:
        """Bytes of key/value memory the running sequences hold (None: the model cannot tell)."""
        batch = self._scheduler.batch
        return batch.cache_bytes if batch is not None else 0

    def call_between_steps(self, call: Callable[[], None]) -> bool:
        """Run other model work on the scheduler thread between steps (Scheduler's docstring)."""
        return self._scheduler.call_between_steps(call)

    async def start(self) -> None:
        """Wait until the scheduler can run sequences; raise why it cannot."""
        await asyncio.to_thread(self._scheduler.wait_open)

    def shutdown(self) -> None:
        """Stop the scheduler thread after its current step; what still runs fails UNAVAILABLE.

        New requests are refused from now on. Waits (a few seconds at most) for the thread to end,
        so that no forward pass is still running when the process exits.
        """
        self._closed = True
        self._scheduler.stop()
        self._scheduler.join(timeout=_SHUTDOWN_WAIT_S)

    def _plan(self, request: ChatRequest) -> tuple[list[int], int]:
        """Tokenize the prompt and check it and max_tokens against the model's limits."""
        if request.tools and not self._model.supports_tools:
            raise FailedPreconditionError(
                f"model {request.model!r} has no tool format; send the request without tools"
            )
        if request.prompt is not None:
            prompt_ids = self._model.encode_text(request.prompt)
        else:
            prompt_ids = self._model.build_prompt(request.messages, request.tools)
        n_prompt = len(prompt_ids)
        if n_prompt == 0:
            raise InvalidArgumentError("the prompt holds no tokens; give it some text")
        limit = self._model.max_input_tokens
        if n_prompt > limit:
            raise InvalidArgumentError(
                f"the prompt is {n_prompt} tokens, but model {request.model!r} accepts at most "
                f"{limit} input tokens (max_input_tokens); shorten the conversation"
            )
        room = self._model.context_length - n_prompt
        wanted = request.sampling.max_tokens
        if wanted is None:
            max_new = min(self._max_new_tokens, room)
        elif request.cap_max_tokens:
            max_new = min(wanted, self._max_new_tokens, room)
        elif wanted > self._max_new_tokens:
            raise InvalidArgumentError(
                f"max_tokens is {wanted}, but model {request.model!r} generates at most "
                f"{self._max_new_tokens} tokens per request (max_new_tokens)"
            )
        elif wanted > room:
            raise InvalidArgumentError(
                f"the prompt ({n_prompt} tokens) plus max_tokens ({wanted}) must fit in the "
                f"context of {self._model.context_length} tokens; "
                f"lower max_tokens to {room} or less"
            )
        else:
            max_new = wanted
        if max_new < 1:
            raise InvalidArgumentError(
                f"the prompt ({n_prompt} tokens) leaves no room to generate in the context of "
                f"{self._model.context_length} tokens; shorten the conversation"
            )
        return prompt_ids, max_new

    async def generate(
        self, request: ChatRequest, on_accepted: Callable[[], None] | None = None
    ) -> AsyncGenerator[GenerationEvent, None]:
        """Stream the reply as text pieces; the last event has finish_reason and usage.

        With tools offered, a reply that is a tool call comes back as one last event carrying
        `function_call` (server/engine/tool_calls.py). Closing the iterator early (client gone,
        deadline) stops the generation within one step. `on_accepted` is called once the
        request has passed every check and waits for its place (or has it): from then on only
        shutdown or a failing model can refuse it.
        """
        events = self._generate(request, on_accepted)
        if request.tools:
            events = detect_tool_calls(events, request.tools, self._model.parse_tool_call)
        async with contextlib.aclosing(events) as stream:
            async for event in stream:
                yield event

    async def _generate(
        self, request: ChatRequest, on_accepted: Callable[[], None] | None
    ) -> AsyncGenerator[GenerationEvent, None]:
        loop = asyncio.get_running_loop()
        prompt_ids, max_new = await asyncio.to_thread(self._plan, request)
        if self._closed:
            raise UnavailableError(f"model {request.model!r} is shutting down; retry later")

        if self._waiting >= self._max_waiting and self._places.locked():
            raise ResourceExhaustedError(
                f"model {request.model!r} is busy: {self._max_concurrent} replies are being "
                f"generated and {self._waiting} requests are waiting (max_waiting); retry later"
            )
        if on_accepted is not None:
            on_accepted()
        self._waiting += 1
        try:
            # A request cancelled here (deadline, client gone) never starts.
            await self._places.acquire()
        finally:
            self._waiting -= 1

        # The place is given back when the scheduler has freed the sequence's slot, not when the
        # consumer leaves, so `running` counts the sequences that still hold memory.
        self._running += 1
        queue: asyncio.Queue[Item] = asyncio.Queue()
        job = Job(request, prompt_ids, max_new, loop, queue, on_done=self._release)
        self._scheduler.submit(job)
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            # Seen by the scheduler at its next step; a no-op for a job that has ended.
            job.cancelled.set()

    def _release(self) -> None:
        self._running -= 1
        self._places.release()

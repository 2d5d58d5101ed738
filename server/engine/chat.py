"""Chat generation: one decode loop per request on a worker thread, streamed to the event loop.

Why threads and not the event loop: a forward pass takes milliseconds to seconds, and torch releases
the GIL inside its kernels, so concurrent requests progress in parallel while the event loop keeps
answering other calls. A bounded number of sequences run at once (`max_concurrent`); a bounded
number wait for a slot (`max_waiting`); past that a request is refused at once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field

import torch

from server.domain import ChatRequest, FinishReason, GenerationEvent, Usage
from server.engine.detokenize import IncrementalDetokenizer
from server.engine.sampling import TokenSampler
from server.engine.stops import StopStringMatcher
from server.errors import InvalidArgumentError, ResourceExhaustedError
from server.models.base import ChatModel

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Job:
    """One request's generation, shared between its worker thread and its consumer."""

    request: ChatRequest
    prompt_ids: list[int]
    max_new_tokens: int
    emit: Callable[[GenerationEvent | BaseException], None]
    cancelled: threading.Event = field(default_factory=threading.Event)


@dataclass(frozen=True, slots=True)
class ChatEngineStats:
    """What the engine is doing right now."""

    running: int
    waiting: int


class ChatEngine:
    """Generates replies for one chat model."""

    def __init__(
        self, model: ChatModel, *, max_concurrent: int, max_waiting: int, max_new_tokens: int
    ) -> None:
        self._model = model
        self._max_concurrent = max_concurrent
        self._max_waiting = max_waiting
        self._max_new_tokens = max_new_tokens
        self._slots = asyncio.Semaphore(max_concurrent)
        self._waiting = 0
        self._running = 0
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=max_concurrent, thread_name_prefix="chat"
        )
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def stats(self) -> ChatEngineStats:
        """How many sequences run and how many requests wait for a slot."""
        return ChatEngineStats(running=self._running, waiting=self._waiting)

    async def wait_idle(self) -> None:
        """Return once no sequence is running (used by tests and shutdown)."""
        await self._idle.wait()

    def shutdown(self) -> None:
        """Stop the worker threads once the running sequences end."""
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _plan(self, request: ChatRequest) -> tuple[list[int], int]:
        """Tokenize the prompt and check it and max_tokens against the model's limits."""
        prompt_ids = self._model.build_prompt(request.messages)
        n_prompt = len(prompt_ids)
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

    async def generate(self, request: ChatRequest) -> AsyncGenerator[GenerationEvent, None]:
        """Stream the reply as text pieces; the last event has finish_reason and usage.

        Closing the iterator early (client gone, deadline) stops the generation within one step.
        """
        loop = asyncio.get_running_loop()
        prompt_ids, max_new = await asyncio.to_thread(self._plan, request)

        if self._waiting >= self._max_waiting and self._slots.locked():
            raise ResourceExhaustedError(
                f"model {request.model!r} is busy: {self._max_concurrent} replies are being "
                f"generated and {self._waiting} requests are waiting (max_waiting); retry later"
            )
        self._waiting += 1
        try:
            # A request cancelled here (deadline, client gone) never starts.
            await self._slots.acquire()
        finally:
            self._waiting -= 1

        queue: asyncio.Queue[GenerationEvent | BaseException] = asyncio.Queue()

        def emit(item: GenerationEvent | BaseException) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        job = _Job(request, prompt_ids, max_new, emit)
        self._running += 1
        self._idle.clear()
        try:
            future = loop.run_in_executor(self._executor, self._run, job)
        except BaseException:
            self._release()
            raise
        # The slot is given back when the thread is really done, not when the consumer leaves, so
        # `running` counts the sequences that still hold memory.
        future.add_done_callback(lambda _: self._release())
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            job.cancelled.set()

    def _release(self) -> None:
        self._running -= 1
        self._slots.release()
        if self._running == 0:
            self._idle.set()

    def _run(self, job: _Job) -> None:
        """The decode loop, on a worker thread."""
        try:
            self._decode(job)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            log.exception("generation failed for model %s", job.request.model)
            job.emit(exc)

    def _decode(self, job: _Job) -> None:
        model = self._model
        params = job.request.sampling
        sampler = TokenSampler(params, model.device)
        detok = IncrementalDetokenizer(model.decoder, job.prompt_ids)
        stops = StopStringMatcher(params.stop)
        stop_ids = model.stop_token_ids | frozenset(params.stop_token_ids)
        history = torch.tensor(job.prompt_ids, dtype=torch.long, device=model.device)
        logits, cache = model.forward(job.prompt_ids, None)
        generated = 0
        finish = FinishReason.LENGTH
        string_stopped = False
        while generated < job.max_new_tokens:
            if job.cancelled.is_set():
                return
            token = sampler(history, logits)
            generated += 1
            if token in stop_ids:
                finish = FinishReason.STOP
                break
            text, string_stopped = stops.feed(detok.push(token))
            if text:
                job.emit(GenerationEvent(text))
            if string_stopped:
                finish = FinishReason.STOP
                break
            if generated == job.max_new_tokens:
                break
            history = torch.cat([history, history.new_tensor([token])])
            logits, cache = model.forward([token], cache)
        del cache
        tail = ""
        if not string_stopped:
            # Text held back for an incomplete character or a possible stop string is released
            # now, unless it completes a stop string.
            tail, string_stopped = stops.feed(detok.flush())
            if string_stopped:
                finish = FinishReason.STOP
            else:
                tail += stops.flush()
        job.emit(
            GenerationEvent(
                tail,
                finish_reason=finish,
                usage=Usage(prompt_tokens=len(job.prompt_ids), completion_tokens=generated),
            )
        )

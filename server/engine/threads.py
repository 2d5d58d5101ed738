"""Model work off the event loop: on a thread of its own that ends with the call, or handed to
a long-lived thread that runs it (`run_via`: the chat scheduler's, between its steps).

Why not `asyncio.to_thread`: its pool threads live on, and PyTorch's CPU builds use GNU OpenMP,
where every thread that has run a parallel region keeps a team of worker threads for good. Once
a process holds more such threads than it has CPUs, libgomp lets idle workers spin only ~100
times before they sleep (instead of ~3 ms), so each of the hundreds of small parallel regions of
a forward pass pays for waking a sleeping worker. Measured on 2 cores with SmolLM2: the chat
scheduler's decode step went from 40 ms to 70-90 ms once a pool thread had run one model pass
(loading, warm-up or an embedding batch). A thread that ends takes its team with it, but while
it runs, its own team and the scheduler's are two, and its pass is throttled so: an embedding
pass of 32 sentences took 15-20% longer on a fresh thread beside the scheduler's team than on
the thread that owns the only team (in-process; the embedding benchmark served 7% more
sentences a second with the passes moved there). So where a chat scheduler runs, the other
model work runs on its thread (server/engine/registry.py), and fresh threads serve the rest
(loading, warm-up, a process without a chat model).

Starting a thread costs tens of microseconds, nothing next to a model call.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
from collections.abc import Callable
from typing import ParamSpec, TypeVar

__all__ = ["run_in_fresh_thread", "run_via"]

P = ParamSpec("P")
T = TypeVar("T")


async def run_in_fresh_thread(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """`await fn(*args, **kwargs)` run on a new thread that ends when `fn` returns.

    Cancelling the caller does not stop `fn` (no thread can be interrupted); its result is then
    dropped.
    """
    return await run_via(_start_thread, fn, *args, **kwargs)


async def run_via(
    submit: Callable[[Callable[[], None]], bool],
    fn: Callable[P, T],
    *args: P.args,
    **kwargs: P.kwargs,
) -> T:
    """`await fn(*args, **kwargs)` run by `submit`, which hands a call to a thread that runs it.

    `submit` returns False when it refuses the call (its thread is stopping); `fn` then runs on a
    fresh thread instead. Cancelling the caller does not stop `fn`; its result is dropped.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(outcome: Callable[[], None]) -> None:
        # The caller may have been cancelled, or the loop closed, while fn ran.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(lambda: None if future.done() else outcome())

    def call() -> None:
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:
            # partial binds exc now: the name is unbound once the except block ends.
            settle(functools.partial(future.set_exception, exc))
        else:
            settle(functools.partial(future.set_result, result))

    call.__qualname__ = getattr(fn, "__qualname__", "model-call")
    if not submit(call):
        _start_thread(call)
    return await future


def _start_thread(call: Callable[[], None]) -> bool:
    threading.Thread(target=call, name=f"model-call {call.__qualname__}", daemon=True).start()
    return True

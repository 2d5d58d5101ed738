"""Model work off the event loop, each call on a thread of its own that ends with the call.

Why not `asyncio.to_thread`: its pool threads live on, and PyTorch's CPU builds use GNU OpenMP,
where every thread that has run a parallel region keeps a team of worker threads for good. Once
a process holds more such threads than it has CPUs, libgomp lets idle workers spin only ~100
times before they sleep (instead of ~3 ms), so each of the hundreds of small parallel regions of
a decode step pays for waking a sleeping worker. Measured on 2 cores with SmolLM2: the chat
scheduler's decode step went from 40 ms to 70-90 ms once a pool thread had run one model pass
(loading, warm-up or an embedding batch). A thread that ends takes its team with it, so the
chat schedulers are the only long-lived threads that run model code.

Starting a thread costs tens of microseconds, nothing next to a model call.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
from collections.abc import Callable
from typing import ParamSpec, TypeVar

__all__ = ["run_in_fresh_thread"]

P = ParamSpec("P")
T = TypeVar("T")


async def run_in_fresh_thread(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """`await fn(*args, **kwargs)` run on a new thread that ends when `fn` returns.

    Cancelling the caller does not stop `fn` (no thread can be interrupted); its result is then
    dropped.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(outcome: Callable[[], None]) -> None:
        # The caller may have been cancelled, or the loop closed, while fn ran.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(lambda: None if future.done() else outcome())

    def target() -> None:
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:
            # partial binds exc now: the name is unbound once the except block ends.
            settle(functools.partial(future.set_exception, exc))
        else:
            settle(functools.partial(future.set_result, result))

    name = getattr(fn, "__qualname__", "model-call")
    threading.Thread(target=target, name=f"model-call {name}", daemon=True).start()
    return await future

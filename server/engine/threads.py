"""Model work off the event loop: on a thread of its own that ends with the call, or handed to
a long-lived thread that runs it (`run_via`: the chat scheduler's, between its steps).

Not `asyncio.to_thread`: with GNU OpenMP every thread that ran a parallel region keeps its own
worker team, and more teams than CPUs make every small parallel region of a decode step pay for
waking sleeping workers. Why and what it cost: docs/architecture.md, "Concurrency and threading".
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

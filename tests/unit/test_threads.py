"""run_in_fresh_thread and run_via: results and errors come back, no fresh thread outlives its
call, and a refused call runs on a fresh thread."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

import pytest

from server.engine.threads import run_in_fresh_thread, run_via


async def test_the_result_comes_back_from_a_thread_that_then_ends() -> None:
    seen: list[threading.Thread] = []

    def work(a: int, *, b: int) -> int:
        seen.append(threading.current_thread())
        return a + b

    assert await run_in_fresh_thread(work, 2, b=3) == 5
    assert seen[0] is not threading.current_thread()
    seen[0].join(timeout=5)
    assert not seen[0].is_alive()
    assert await run_in_fresh_thread(work, 1, b=1) == 2
    assert seen[1] is not seen[0]


async def test_an_exception_is_raised_in_the_caller() -> None:
    def fail() -> None:
        raise ValueError("bad input")

    with pytest.raises(ValueError, match="bad input"):
        await run_in_fresh_thread(fail)


async def test_a_cancelled_caller_drops_the_result() -> None:
    release = threading.Event()
    done = threading.Event()

    def slow() -> int:
        release.wait(5)
        done.set()
        return 1

    task = asyncio.create_task(run_in_fresh_thread(slow))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    release.set()
    assert await asyncio.to_thread(done.wait, 5)
    await asyncio.sleep(0.05)  # the late result lands on a finished future without an error


async def test_run_via_hands_the_call_to_submit_and_falls_back_to_a_fresh_thread() -> None:
    worker_calls: list[Callable[[], None]] = []

    def accept(call: Callable[[], None]) -> bool:
        worker_calls.append(call)
        threading.Thread(target=call, name="the-worker").start()
        return True

    def where(x: int) -> tuple[str, int]:
        return threading.current_thread().name, x * 2

    assert await run_via(accept, where, 4) == ("the-worker", 8)
    assert len(worker_calls) == 1
    # Refused (the worker is stopping): the call runs on a thread of its own instead.
    name, doubled = await run_via(lambda call: False, where, 5)
    assert doubled == 10
    assert name.startswith("model-call ")


async def test_run_via_raises_the_error_of_the_call() -> None:
    def fail() -> None:
        raise ValueError("bad input")

    with pytest.raises(ValueError, match="bad input"):
        await run_via(lambda call: bool(threading.Thread(target=call).start() or True), fail)

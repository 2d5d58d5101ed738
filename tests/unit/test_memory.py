"""MemoryReleaser: a trim a moment after a large request, one for a burst, none for small ones.

The trim function is a stand-in that counts its calls: malloc_trim's effect on the resident size
is measured with a real server process in tests/process/test_memory.py.
"""

from __future__ import annotations

import asyncio
import threading

from server.memory import MemoryReleaser


class CountingTrim:
    def __init__(self) -> None:
        self.calls: list[int] = []
        self.called = threading.Event()

    def __call__(self, pad: int) -> int:
        self.calls.append(pad)
        self.called.set()
        return 1


async def settle(releaser: MemoryReleaser, trim: CountingTrim, trims: int) -> None:
    """Wait until `trims` trims have run (the delay is tiny in these tests)."""
    for _ in range(1000):
        if releaser.trims >= trims and len(trim.calls) >= trims:
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"{len(trim.calls)} trims ran, {trims} expected")


async def test_small_requests_trim_nothing() -> None:
    trim = CountingTrim()
    releaser = MemoryReleaser(threshold_bytes=1000, delay_s=0.0, trim=trim)
    releaser.after_request(999)
    await asyncio.sleep(0.05)
    assert releaser.trims == 0
    assert trim.calls == []


async def test_a_large_request_trims_once_after_the_delay() -> None:
    trim = CountingTrim()
    releaser = MemoryReleaser(threshold_bytes=1000, delay_s=0.01, trim=trim)
    releaser.after_request(1000)
    assert trim.calls == []  # not while the request's reply may still be alive
    await settle(releaser, trim, 1)
    assert trim.calls == [0]


async def test_a_burst_of_large_requests_trims_once_then_again_after() -> None:
    trim = CountingTrim()
    releaser = MemoryReleaser(threshold_bytes=10, delay_s=0.02, trim=trim)
    for _ in range(5):
        releaser.after_request(1_000_000)
    await settle(releaser, trim, 1)
    await asyncio.sleep(0.05)
    assert len(trim.calls) == 1
    releaser.after_request(1_000_000)  # a large request after the trim gets one of its own
    await settle(releaser, trim, 2)


async def test_the_real_c_library_is_found_on_glibc() -> None:
    # The test machines run glibc; elsewhere MemoryReleaser does nothing, quietly.
    releaser = MemoryReleaser(threshold_bytes=1, delay_s=0.0)
    assert releaser.available
    releaser.after_request(10)
    for _ in range(1000):
        if releaser.trims:
            break
        await asyncio.sleep(0.005)
    assert releaser.trims == 1

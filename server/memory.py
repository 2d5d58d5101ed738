"""Giving memory back to the system after large requests.

A large request (megabytes of text, tokenized into hundreds of thousands of tokens) makes the
process allocate much more than usual, and glibc's malloc keeps most of what is freed afterwards
for reuse: a heap gives memory back only from its top, so pages freed below a chunk still in use
stay with the process, and the server stays near the size of its largest request.
`malloc_trim(0)` gives back the free pages of every arena, wherever they are. It walks the free
lists, so it runs only after requests of at least `threshold_bytes`, a moment after they end
(their replies are freed only once gRPC has sent them), on a thread of its own, and once for a
burst of such requests. Where the C library has no malloc_trim (musl, macOS), nothing is done.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

# Requests this large (in serialized bytes) are followed by a trim.
LARGE_REQUEST_BYTES = 64 * 1024
# How long after a large request the trim runs.
TRIM_DELAY_S = 1.0


def _find_malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    # ctypes releases the GIL for the call: the event loop and the model threads run on.
    return trim


class MemoryReleaser:
    """Schedules malloc_trim after large requests; call `after_request` on the event loop."""

    def __init__(
        self,
        threshold_bytes: int = LARGE_REQUEST_BYTES,
        delay_s: float = TRIM_DELAY_S,
        trim: Callable[[int], int] | None = None,
    ) -> None:
        self._threshold = threshold_bytes
        self._delay_s = delay_s
        self._trim = trim if trim is not None else _find_malloc_trim()
        self._scheduled = False
        # Trims started so far (tests read it).
        self.trims = 0

    @property
    def available(self) -> bool:
        """Whether the C library can give memory back (glibc)."""
        return self._trim is not None

    def after_request(self, request_bytes: int) -> None:
        """Note a request that just ended; a large one schedules a trim unless one is pending."""
        if request_bytes < self._threshold or self._trim is None or self._scheduled:
            return
        self._scheduled = True
        asyncio.get_running_loop().call_later(self._delay_s, self._start)

    def _start(self) -> None:
        # A large request that ends from now on schedules a trim of its own.
        self._scheduled = False
        self.trims += 1
        threading.Thread(target=self._run, name="malloc-trim", daemon=True).start()

    def _run(self) -> None:
        assert self._trim is not None
        try:
            self._trim(0)
        except Exception:  # never worth more than a log line
            log.exception("malloc_trim failed")

"""Stop strings: cut generated text where the first stop string begins.

Generated text arrives in pieces, and a stop string may be split across them, so text that could
still turn out to be the start of a stop string is held back until the next piece decides it.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["StopStringMatcher"]


class StopStringMatcher:
    """Find stop strings in streamed text; emit only text that cannot be part of one."""

    def __init__(self, stops: Sequence[str]) -> None:
        # Empty strings would match everywhere; duplicates only cost time.
        self._stops: tuple[str, ...] = tuple(dict.fromkeys(s for s in stops if s))
        # The longest held-back tail that can still grow into a stop string.
        self._max_hold = max((len(s) for s in self._stops), default=1) - 1
        self._held = ""
        self._stopped = False

    @property
    def stopped(self) -> bool:
        """Whether a stop string has been found."""
        return self._stopped

    def feed(self, text: str) -> tuple[str, bool]:
        """Add generated text; return (text safe to emit now, whether a stop string was found).

        On a stop, the stop string and everything after it are dropped. Generation is expected to
        end then; later calls return ("", True).
        """
        if self._stopped:
            return "", True
        buffer = self._held + text
        if not self._stops:
            return buffer, False
        # The held text contained no whole stop string, so any match here is new. When several
        # stops are complete, the one that starts first wins, so no stop text leaks out.
        starts = [i for i in (buffer.find(s) for s in self._stops) if i >= 0]
        if starts:
            self._stopped = True
            self._held = ""
            return buffer[: min(starts)], True
        hold = self._partial_stop_length(buffer)
        self._held = buffer[len(buffer) - hold :]
        return buffer[: len(buffer) - hold], False

    def flush(self) -> str:
        """Release the held-back text; call when generation ends for a reason other than a stop."""
        held, self._held = self._held, ""
        return held

    def _partial_stop_length(self, buffer: str) -> int:
        """The length of the longest tail of `buffer` that is a proper prefix of a stop string.

        Any unfinished stop string that starts inside `buffer` makes its tail such a prefix, so
        holding the longest one back keeps every candidate.
        """
        for length in range(min(len(buffer), self._max_hold), 0, -1):
            tail = buffer[-length:]
            if any(stop.startswith(tail) for stop in self._stops):
                return length
        return 0

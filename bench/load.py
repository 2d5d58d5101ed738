"""How much CPU other processes used while a benchmark ran.

On a small shared machine, a test suite or a build started by someone else steals cores from the
server and the in-process baseline, and it does not hit them alike: a busy core slows the
benchmark's own multi-threaded torch passes far more than the server's, so ratios measured under
load flatter the server. The benchmark cannot prevent that, but it can say so next to its numbers.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import psutil

# Above this many cores kept busy by other processes on average, a benchmark's verdicts are
# marked as unreliable.
BUSY_CORES_LIMIT = 0.2


def is_noisy(busy_cores: float) -> bool:
    """Whether other processes kept enough cores busy to make a measurement unreliable."""
    return busy_cores > BUSY_CORES_LIMIT


def _busy_cpu_s() -> float:
    """CPU-seconds the whole machine spent on anything but idling, since boot."""
    times = psutil.cpu_times()
    idle = times.idle + getattr(times, "iowait", 0.0)
    guest = getattr(times, "guest", 0.0) + getattr(times, "guest_nice", 0.0)
    return float(sum(times)) - idle - guest


def _process_cpu_s(pid: int) -> float:
    """CPU-seconds used so far by one process (all its threads), 0 once it is gone."""
    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return 0.0
    return float(times.user + times.system)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The machine's and the benchmark's CPU counters at one moment."""

    wall_s: float
    busy_s: float
    ours_s: float


class BackgroundLoad:
    """Measures the average number of cores busy outside `pids` (this process by default)."""

    def __init__(self, *pids: int) -> None:
        self._pids = (os.getpid(), *pids)

    def snapshot(self) -> Snapshot:
        """The counters now; pass two of them to cores_between()."""
        ours = sum(_process_cpu_s(pid) for pid in self._pids)
        return Snapshot(time.monotonic(), _busy_cpu_s(), ours)

    @staticmethod
    def cores_between(start: Snapshot, end: Snapshot) -> float:
        """The average number of cores other processes kept busy between two snapshots."""
        wall = end.wall_s - start.wall_s
        if wall <= 0:
            return 0.0
        others = (end.busy_s - start.busy_s) - (end.ours_s - start.ours_s)
        # Per-process and system counters tick separately, so a quiet machine can read slightly
        # below zero.
        return max(0.0, others / wall)

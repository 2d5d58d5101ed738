"""Metrics with targets, each part's results, and the table that closes a benchmark run."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

Comparison = Literal[">=", "<"]
# Where a part prints its progress (print, flushed, in `python -m bench`).
Say = Callable[[str], object]


@dataclass(frozen=True, slots=True)
class Target:
    """What a metric should reach: `value >= threshold` or `value < threshold`."""

    op: Comparison
    threshold: float

    def met_by(self, value: float) -> bool:
        """Whether `value` meets the target."""
        return value >= self.threshold if self.op == ">=" else value < self.threshold

    def __str__(self) -> str:
        return f"{self.op} {self.threshold:g}"


def format_value(value: float | None, unit: str, digits: int) -> str:
    """A figure as the table shows it: `digits` decimals and its unit, "-" when not measured."""
    if value is None:
        return "-"
    text = f"{value:.{digits}f}"
    return f"{text} {unit}" if unit else text


@dataclass(frozen=True, slots=True)
class Metric:
    """One line of the final table; a metric without a target is reported for context only."""

    name: str
    value: float | None
    unit: str = ""
    target: Target | None = None
    digits: int = 2
    # Measured while other processes were busy: the verdict gets a "*" and the table a footnote.
    noisy: bool = False

    @property
    def verdict(self) -> str:
        """PASS or FAIL against the target; "info" without one; "n/a" when not measured."""
        if self.value is None:
            return "n/a"
        if self.target is None:
            return "info"
        verdict = "PASS" if self.target.met_by(self.value) else "FAIL"
        return verdict + "*" if self.noisy else verdict

    def formatted_value(self) -> str:
        """The value with its unit, or "-" when it was not measured."""
        return format_value(self.value, self.unit, self.digits)

    def as_dict(self) -> dict[str, object]:
        """The metric as plain JSON-ready values."""
        return {
            "name": self.name,
            "value": self.value,
            "unit": self.unit,
            "digits": self.digits,
            "target": str(self.target) if self.target else None,
            "verdict": self.verdict,
            "noisy": self.noisy,
        }


@dataclass(frozen=True, slots=True)
class Section:
    """What one part of the benchmark measured: its figures for the JSON file, its table lines."""

    figures: dict[str, Any]
    metrics: list[Metric]


def flagged(metrics: list[Metric], noisy: bool) -> list[Metric]:
    """The metrics, marked as measured on a busy machine when `noisy`."""
    return [replace(m, noisy=True) for m in metrics] if noisy else metrics


def median(values: Sequence[float]) -> float:
    """The median; medians, not means, because one descheduled run must not move the result."""
    return statistics.median(values)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), linear between the closest ranks (numpy's default)."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("percentile of no values")
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def format_table(metrics: Sequence[Metric]) -> str:
    """A plain-text table: metric, value, target, result."""
    header = ("Metric", "Value", "Target", "Result")
    rows = [
        (m.name, m.formatted_value(), str(m.target) if m.target else "-", m.verdict)
        for m in metrics
    ]
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        # Values are right-aligned so that their decimal points line up.
        return "  ".join(
            cell.rjust(widths[i]) if i == 1 else cell.ljust(widths[i])
            for i, cell in enumerate(cells)
        ).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(r) for r in rows)])

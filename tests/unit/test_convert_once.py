"""A cached conversion is made by one caller while the others wait (server.models.sources)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from server.models.sources import convert_once


def _writer(
    calls: list[str], name: str, started: threading.Event, release: threading.Event
) -> Callable[[Path], None]:
    def write(staging: Path) -> None:
        calls.append(name)
        started.set()
        assert release.wait(30)
        (staging / "config.json").write_text("{}")

    return write


def test_a_second_caller_waits_and_reuses_the_first_conversion(tmp_path: Path) -> None:
    target = tmp_path / "converted" / "model-abc"
    calls: list[str] = []
    first_started, release, never = threading.Event(), threading.Event(), threading.Event()
    results: dict[str, Path] = {}

    first = threading.Thread(
        target=lambda: results.setdefault(
            "first", convert_once(target, _writer(calls, "first", first_started, release))
        )
    )
    first.start()
    assert first_started.wait(30)
    second_done = threading.Event()

    def second_caller() -> None:
        results["second"] = convert_once(target, _writer(calls, "second", never, release))
        second_done.set()

    second = threading.Thread(target=second_caller)
    second.start()
    # While the first conversion runs, the second caller is blocked on the lock.
    assert not second_done.wait(0.5)
    release.set()
    first.join(30)
    second.join(30)
    assert calls == ["first"]
    assert results == {"first": target, "second": target}
    assert (target / "config.json").is_file()


def test_a_failed_conversion_leaves_no_target_and_the_next_caller_converts(
    tmp_path: Path,
) -> None:
    target = tmp_path / "converted" / "model-abc"

    def broken(staging: Path) -> None:
        (staging / "partial.bin").write_bytes(b"x")
        raise RuntimeError("out of disk")

    with pytest.raises(RuntimeError, match="out of disk"):
        convert_once(target, broken)
    assert not target.exists()
    assert [p.name for p in target.parent.iterdir() if not p.name.endswith(".lock")] == []
    convert_once(target, lambda staging: (staging / "config.json").write_text("{}"))
    assert (target / "config.json").is_file()

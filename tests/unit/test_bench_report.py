"""`python -m bench --json` and the performance page generated from it.

The parts are replaced by synthetic ones (running servers is the benchmark's job, not the test
suite's); the results file, its machine description and the page rendered from it are real.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest

import bench.__main__ as bench_main
from bench import report_md
from bench.report import Metric, Section, Target

ROOT = Path(__file__).resolve().parents[2]
_ABOUTS = {name: part.about for name, part in bench_main.PARTS.items()}


def _fake_run_part(name: str, args: argparse.Namespace) -> Section:
    if name == "embed":
        raise RuntimeError("the server did not start")
    return Section(
        {"tok_s_ratio": 1.25},
        [
            Metric("chat: server stream", 20.0, "tok/s", digits=1),
            Metric("chat: server tok/s / in-process generate tok/s", 1.25, "", Target(">=", 0.9)),
            Metric("chat: time to first token added", 25.04, "ms", Target("<", 20.0), 1),
            Metric("chat: other processes' CPU load", 0.05, "cores"),
        ],
    )


def _run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    monkeypatch.setattr(bench_main, "run_part", _fake_run_part)
    out = tmp_path / "perf" / "latest.json"
    code = bench_main.main(["--only", "embed,chat", "--json", str(out)])
    assert code == 1  # one part could not run
    results: dict[str, Any] = json.loads(out.read_text())
    return results


def test_only_takes_part_names_in_the_tables_order() -> None:
    assert bench_main.parse_args(["--only", "envoy,chat"]).only == ("chat", "envoy")
    assert bench_main.parse_args(["--only", "all"]).only == tuple(bench_main.PARTS)
    assert bench_main.parse_args([]).only == tuple(bench_main.PARTS)
    with pytest.raises(SystemExit):
        bench_main.parse_args(["--only", "chat,nonsense"])


def test_the_json_holds_the_machine_the_date_every_figure_and_the_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    results = _run(tmp_path, monkeypatch)
    machine = results["machine"]
    assert machine["cpus"] >= 1
    assert machine["cpu_model"]
    assert machine["versions"]["torch"] != "?"
    assert results["date"].startswith("20")
    assert results["parts"] == {"chat": {"tok_s_ratio": 1.25}}
    assert results["errors"] == {"embed": "RuntimeError: the server did not start"}
    ratio = results["metrics"][1]
    assert ratio == {
        "part": "chat",
        "name": "chat: server tok/s / in-process generate tok/s",
        "value": 1.25,
        "unit": "",
        "digits": 2,
        "target": ">= 0.9",
        "verdict": "PASS",
        "noisy": False,
    }


def test_the_page_has_one_row_per_figure_with_target_and_verdict(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    results = _run(tmp_path, monkeypatch)
    page = report_md.render(results, "docs/perf/latest.json", _ABOUTS)
    assert "python -m bench.report_md docs/perf/latest.json" in page
    assert f"Measured {results['date']} on {results['machine']['cpus']} CPUs" in page
    assert results["machine"]["cpu_model"] in page
    assert "| chat | server stream | 20.0 tok/s | - | info |" in page
    assert "| chat | server tok/s / in-process generate tok/s | 1.25 | ≥ 0.9 | PASS |" in page
    assert "| chat | time to first token added | 25.0 ms | < 20 ms | **FAIL** |" in page
    assert "Parts that could not run: embed: RuntimeError: the server did not start." in page
    # 0.05 cores of other processes' load is a quiet machine: nothing said about it.
    assert "busy during the run" not in page
    # The parts the run took, failed or not, described as the run described them.
    assert f"- `chat`: {bench_main.PARTS['chat'].about}." in page
    assert f"- `embed`: {bench_main.PARTS['embed'].about}." in page
    assert "- `streams`" not in page
    assert report_md.render(results, "r.json", {}) == report_md.render(results, "r.json", _ABOUTS)


def test_a_busy_machine_is_said_on_the_machine_line() -> None:
    results = {
        "date": "2026-01-02T03:04:05+00:00",
        "machine": {"cpus": 2, "cpu_model": "Some CPU", "versions": {"torch": "2.13.0"}},
        "busy_cores_limit": 0.2,
        "metrics": [
            {
                "part": "envoy",
                "name": "envoy: a | b",
                "value": 1.5,
                "unit": "ms",
                "digits": 2,
                "target": "< 1",
                "verdict": "FAIL*",
                "noisy": True,
            },
            {
                "part": "envoy",
                "name": "envoy: other processes' CPU load",
                "value": 0.75,
                "unit": "cores",
                "digits": 2,
                "target": None,
                "verdict": "info",
                "noisy": True,
            },
        ],
    }
    page = report_md.render(results, "r.json", _ABOUTS)
    assert "Other processes kept up to 0.75 cores busy during the run" in page
    assert "| envoy | a \\| b | 1.50 ms | < 1 ms | **FAIL*** |" in page
    assert "torch 2.13.0" in page


def test_the_committed_page_is_generated_from_the_committed_results() -> None:
    source = "docs/perf/latest.json"
    results = json.loads((ROOT / source).read_text())
    page = report_md.render(results, source, _ABOUTS)
    assert (ROOT / "docs" / "performance.md").read_text() == page, "run: make perf-doc"

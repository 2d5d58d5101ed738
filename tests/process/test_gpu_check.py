"""scripts/gpu_check.py, the one-shot device check, run here as CI runs it: on the CPU, quick.

On the CPU the engine's promises are known (batch-invariant operations, finite float16 attention,
packed embeddings within tolerance and repeatable), so its checks must all pass here; on a GPU
the same script measures what holds there.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_check.py"
SECTIONS = [
    "environment",
    "op_invariance",
    "tiny_models",
    "fp16_overflow",
    "decode_profile",
    "kv_memory",
    "embeddings",
    "gpu_tests",
    "bench_half",
]


def run(*args: str, timeout: float = 400) -> tuple[int, list[dict[str, Any]], str]:
    """The script's exit status, its JSON lines, and the rest of its output."""
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--no-install", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    rest = "\n".join(line for line in done.stdout.splitlines() if not line.startswith("{"))
    return done.returncode, [json.loads(line) for line in lines], rest + done.stderr


@pytest.mark.slow
def test_every_section_runs_on_the_cpu_and_its_checks_pass() -> None:
    status, reports, rest = run("--device", "cpu", "--quick", "--budget-s", "480", timeout=600)
    assert status == 0, rest
    assert [r["section"] for r in reports] == SECTIONS
    by_name = {r["section"]: r for r in reports}
    for report in reports:
        assert report["ok"], report
        assert "skipped" not in report, report
        failed = [name for name, ok in report.get("checks", {}).items() if not ok]
        assert not failed, (report["section"], failed)
    # What each section reports, beyond its checks.
    assert by_name["environment"]["torch"] == torch.__version__
    invariance = by_name["op_invariance"]["differs_at_rows"]
    assert set(invariance["linear (engine plan)"]) == {"float32", "bfloat16"}
    assert by_name["op_invariance"]["checks"][
        "attention (engine decode) batch-invariant in float32"
    ]
    models = by_name["tiny_models"]["models"]
    assert set(models) == {
        "llama float32",
        "llama bfloat16",
        "chatglm3 float32",
        "chatglm3 bfloat16",
    }
    assert "greedy_tokens_as_float32" in models["chatglm3 bfloat16"]
    assert by_name["fp16_overflow"]["synthetic_scores_max"] > 65504
    for rows in ("1 rows", "8 rows"):
        step = by_name["decode_profile"][rows]
        assert step["engine"]["wall_ms"] > 0
        assert step["baseline"]["compile_skipped"] == "quick mode"
    assert by_name["kv_memory"]["cache_bytes"] == by_name["kv_memory"]["formula_bytes"] > 0
    assert by_name["embeddings"]["packed_vs_padded_max_diff"] > 0  # other dtype paths, not equal
    assert by_name["gpu_tests"]["counts"].get("skipped", 0) > 0  # they skip without CUDA
    figures = by_name["bench_half"]["figures"]
    assert by_name["bench_half"]["dtype"] == "bfloat16"
    assert figures["chat: server stream"][0] > 0
    assert figures["embed: server, 32 concurrent clients"][0] > 0
    assert "findings" not in rest  # the summary table: every section "ok"
    assert rest.count(" ok ") >= len(SECTIONS)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_failing_section_reports_its_error_and_the_others_still_run() -> None:
    status, reports, rest = run(
        "--device", "cuda", "--only", "environment,kv_memory,op_invariance", "--budget-s", "120"
    )
    assert status == 1
    assert [r["section"] for r in reports] == ["environment", "op_invariance", "kv_memory"]
    for report in reports:
        assert not report["ok"]
        assert report["error"]
    assert "ERROR" in rest

"""The llama bench part: skipped with a line without a binary; ratios of glm-api to the peer."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from bench import llama
from bench.llama import GLM, LLAMA, ServerFigures


def test_the_part_is_skipped_with_a_line_when_llama_server_is_absent(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("GLM_LLAMA_SERVER", raising=False)
    monkeypatch.setattr(llama, "DEFAULT_BINARY", tmp_path / "missing" / "llama-server")
    monkeypatch.setattr(llama, "PROJECT_ROOT", tmp_path)
    said: list[str] = []
    section = llama.run(argparse.Namespace(llama_server=None, stream_tokens=8), said.append)
    assert section.metrics == []
    assert section.figures == {"skipped": "no llama-server binary"}
    [line] = said
    assert "skipped" in line
    assert "scripts/build_llama_server.sh" in line


def test_an_executable_given_or_in_the_environment_is_found(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Whether this checkout has built the peer must not matter.
    monkeypatch.delenv("GLM_LLAMA_SERVER", raising=False)
    monkeypatch.setattr(llama, "DEFAULT_BINARY", tmp_path / "missing" / "llama-server")
    binary = tmp_path / "llama-server"
    binary.write_text("#!/bin/sh\n")
    assert llama.find_binary(binary) is None  # not executable
    binary.chmod(0o755)
    assert llama.find_binary(binary) == binary
    monkeypatch.setenv("GLM_LLAMA_SERVER", str(binary))
    assert llama.find_binary(None) == binary


def test_ratios_are_glm_api_over_llama_server() -> None:
    results = {
        GLM: ServerFigures(40.0, 160.0, 100.0, 20.0),
        LLAMA: ServerFigures(80.0, 128.0, 50.0, None),
    }
    values = {m.name.split("llama-server ", 1)[1]: m.value for m in llama.metrics(results)}
    assert values == {
        "one stream decode tok/s": 0.5,
        "8 streams aggregate tok/s": 1.25,
        "cold first token ms": 2.0,
        "repeated-prompt first token ms": None,
    }


def test_the_package_gguf_is_found() -> None:
    path = llama.package_gguf()
    assert path.suffix == ".gguf"
    assert path.is_file()


def test_each_glm_api_variant_gets_its_ratios() -> None:
    results = {
        GLM: ServerFigures(40.0, 160.0, 100.0, 20.0),
        f"{GLM} compiled": ServerFigures(60.0, 200.0, 100.0, 20.0),
        LLAMA: ServerFigures(80.0, 128.0, 50.0, 40.0),
    }
    values = {m.name: m.value for m in llama.metrics(results)}
    assert values["llama: glm-api / llama-server one stream decode tok/s"] == 0.5
    assert values["llama: glm-api compiled / llama-server one stream decode tok/s"] == 0.75
    assert values["llama: glm-api compiled / llama-server repeated-prompt first token ms"] == 0.5
    assert len(values) == 8

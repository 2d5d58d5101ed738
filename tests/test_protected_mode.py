"""Protected mode on the real `python -m server` process: no keys, no public address."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parent.parent


def run_server(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("GLM_")}
    return subprocess.run(
        [sys.executable, "-m", "server"],
        cwd=ROOT,
        env={**clean, "GLM_CACHE_DIR": str(tmp_path), **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_public_address_without_keys_refuses_to_start(tmp_path: Path) -> None:
    port = free_port()
    result = run_server(tmp_path, GLM_GRPC_ADDRESS=f"0.0.0.0:{port}")
    assert result.returncode == 2
    assert "protected mode" in result.stderr
    assert f"GLM_GRPC_ADDRESS 0.0.0.0:{port}" in result.stderr
    # The message says how to fix it.
    assert "python -m server keys add NAME" in result.stderr
    assert "GLM_AUTH=none" in result.stderr


def test_an_explicit_opt_out_or_a_keys_file_passes_protected_mode(tmp_path: Path) -> None:
    """Both get past the check and stop at the next one: a models config that does not exist
    (so that nothing listens on a public address during the test)."""
    missing = str(tmp_path / "no-such-models.toml")
    public = {"GLM_GRPC_ADDRESS": f"0.0.0.0:{free_port()}", "GLM_CONFIG": missing}
    for extra in ({"GLM_AUTH": "none"}, {"GLM_API_KEYS_FILE": str(tmp_path / "keys.toml")}):
        result = run_server(tmp_path, **public, **extra)
        assert result.returncode == 2, result.stderr
        assert "protected mode" not in result.stderr
        assert "no-such-models.toml" in result.stderr

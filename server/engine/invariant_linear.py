"""Batch-invariant, fast linear layers for small passes (decode steps), chosen by measurement.

A decode pass multiplies every linear layer's weight by a handful of rows, one per running
sequence. Two facts about BLAS libraries shape how that is done here:

- Invariance. A BLAS takes other code paths for other row counts, and the paths differ in the
  last bits (MKL on a 2-core x86 machine: 1 row, 2-3 rows, 5-7 rows each give a row other bits
  than 4 or 8 rows do). A request's greedy output must not depend on what else runs, so a pass
  is cut into *groups* of a fixed number of rows, the last one padded with zero rows, and the
  kernel is called once per group. A group size qualifies when a row's result in a group does not
  depend on its place in the group or on the other rows (probed on the model's own weights); one
  row per group always qualifies.
- Speed. The operand order matters more than the row count: for 2-8 rows, MKL computes
  `weight @ x.T` (the weight as the left operand) at close to memory bandwidth, 2-3x faster than
  `x @ weight.T` (what `torch.nn.functional.linear` calls), whose small-row path re-packs the
  weight on every call. Both orders are candidates; the fastest qualifying (kernel, group) on
  the average pass of 1..max_rows rows is kept. Measured, not assumed: it depends on the BLAS, the
  CPU, the thread count and the device.

Passes of more rows than the plan covers (prompt chunks) call the layer as it is: they run one
sequence alone, so they need no invariance, and large GEMMs are fast either way.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

__all__ = ["KERNELS", "LinearPlan", "choose_plan", "install"]

# (weight (out, in), x (rows, in)) -> (rows, out).
Kernel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _input_first(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, weight)


def _weight_first(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.mm(weight, x.T).T


KERNELS: dict[str, Kernel] = {"input_first": _input_first, "weight_first": _weight_first}


@dataclass(frozen=True, slots=True)
class LinearPlan:
    """How passes of up to `max_rows` rows go through every linear layer of a model."""

    kernel: str
    # Rows per kernel call; a pass is padded with zero rows to a multiple of it.
    group: int
    # Passes of more rows call the layer as it is.
    max_rows: int

    def padded(self, rows: int) -> int:
        """The rows a pass of `rows` rows computes, padding included."""
        if rows > self.max_rows:
            return rows
        return -(-rows // self.group) * self.group

    def apply(self, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """`x (rows, in) @ weight.T`, computed group by group (rows <= max_rows)."""
        rows, group = x.shape[0], self.group
        padded = self.padded(rows)
        # Operands and results are always laid out row-major: a BLAS takes another code path
        # (other last bits) for a transposed or strided operand, and so may the ops after it.
        if padded != rows:
            x = torch.cat((x, x.new_zeros(padded - rows, x.shape[1])))
        else:
            x = x.contiguous()
        kernel = KERNELS[self.kernel]
        if padded == group:
            return kernel(weight, x).contiguous()[:rows]
        parts = [kernel(weight, x[i : i + group]) for i in range(0, padded, group)]
        return torch.cat(parts)[:rows]


def _forward(plan: LinearPlan, module: torch.nn.Linear) -> Callable[[torch.Tensor], torch.Tensor]:
    weight, bias = module.weight, module.bias

    def forward(x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if rows == 0 or rows > plan.max_rows:
            return F.linear(x, weight, bias)
        out = plan.apply(weight, x.reshape(rows, x.shape[-1]))
        if bias is not None:
            out = out + bias
        return out.reshape(*x.shape[:-1], out.shape[-1])

    return forward


def install(causal_lm: torch.nn.Module, plan: LinearPlan) -> int:
    """Route every `torch.nn.Linear` of `causal_lm` through `plan`; returns how many.

    A module that accelerate dispatched over several devices calls `_old_forward` from a hook
    that moves its inputs, so that is what gets replaced there, keeping the hook.
    """
    count = 0
    for module in _linears(causal_lm):
        forward = _forward(plan, module)
        # setattr: nn.Module's typing knows neither attribute as a plain callable.
        setattr(module, "_old_forward" if hasattr(module, "_old_forward") else "forward", forward)
        count += 1
    return count


def _linears(causal_lm: torch.nn.Module) -> Iterable[torch.nn.Linear]:
    return (m for m in causal_lm.modules() if isinstance(m, torch.nn.Linear))


def _group_sizes(max_rows: int) -> list[int]:
    """1, 2, 4, ... up to the first power of two >= max_rows."""
    sizes = [1]
    while sizes[-1] < max_rows:
        sizes.append(sizes[-1] * 2)
    return sizes


def _qualifies(kernel: Kernel, group: int, probes: list[tuple[torch.Tensor, torch.Tensor]]) -> bool:
    """Whether a row's result in a `group`-row call ignores its place and its neighbours."""
    if group == 1:
        return True
    for weight, x in probes:
        rows = x[:group]
        full = kernel(weight, rows)
        if not torch.equal(kernel(weight, rows.flip(0)), full.flip(0)):
            return False
        others = rows.clone()
        others[1:] = x[group : 2 * group - 1]
        if not torch.equal(kernel(weight, others)[0], full[0]):
            return False
    return True


def _sync(devices: set[torch.device]) -> None:
    for device in devices:
        if device.type == "cuda":
            torch.cuda.synchronize(device)


def _pass_seconds(
    kernel: Kernel,
    layers: list[torch.nn.Linear],
    inputs: dict[tuple[object, ...], torch.Tensor],
    devices: set[torch.device],
) -> float:
    """Seconds for one call of every layer on its (group, in_features) input."""
    _sync(devices)
    started = time.perf_counter()
    for m in layers:
        kernel(m.weight, inputs[_input_key(m)])
    _sync(devices)
    return time.perf_counter() - started


def _input_key(m: torch.nn.Linear) -> tuple[object, ...]:
    return (m.in_features, m.weight.device, m.weight.dtype)


@torch.inference_mode()
def choose_plan(causal_lm: torch.nn.Module, max_rows: int) -> LinearPlan:
    """The fastest batch-invariant way to run passes of 1..max_rows rows (see the module doc)."""
    layers = list(_linears(causal_lm))
    devices = {m.weight.device for m in layers}
    generator = torch.Generator().manual_seed(0)
    distinct: dict[tuple[object, ...], torch.nn.Linear] = {}
    for m in layers:
        distinct.setdefault((tuple(m.weight.shape), m.weight.dtype, m.weight.device), m)
    sizes = _group_sizes(max_rows)
    probes = [
        (
            m.weight,
            torch.randn(2 * sizes[-1], m.in_features, generator=generator).to(
                m.weight.device, m.weight.dtype
            ),
        )
        for m in distinct.values()
    ]
    candidates = [
        (name, group)
        for name in KERNELS
        for group in sizes
        if _qualifies(KERNELS[name], group, probes)
    ]
    inputs = {
        group: {
            _input_key(m): torch.randn(group, m.in_features, generator=generator).to(
                m.weight.device, m.weight.dtype
            )
            for m in layers
        }
        for group in sizes
    }

    def average_pass(group: int, seconds: float) -> float:
        # The average pass of 1..max_rows rows takes ceil(rows / group) calls.
        return seconds * sum(-(-rows // group) for rows in range(1, max_rows + 1)) / max_rows

    # A first round warms every candidate up and drops those far behind; the best of two more
    # interleaved rounds decides (another process's burst of load then slows one round of every
    # candidate rather than every round of one).
    costs = {
        (name, group): average_pass(
            group, _pass_seconds(KERNELS[name], layers, inputs[group], devices)
        )
        for name, group in candidates
    }
    fastest = min(costs.values())
    costs = {c: float("inf") for c, cost in costs.items() if cost <= 2 * fastest}
    for _ in range(2):
        for name, group in costs:
            seconds = _pass_seconds(KERNELS[name], layers, inputs[group], devices)
            costs[(name, group)] = min(costs[(name, group)], average_pass(group, seconds))
    (name, group), cost = min(costs.items(), key=lambda item: item[1])
    plan = LinearPlan(kernel=name, group=group, max_rows=-(-max_rows // group) * group)
    log.info(
        "decode linear layers: %s in groups of %d rows (%.1f ms for an average pass; %s)",
        name,
        group,
        cost * 1000,
        ", ".join(f"{n}/{g} {c * 1000:.1f}" for (n, g), c in sorted(costs.items())),
    )
    return plan

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
- A third candidate on a CPU in float32: oneDNN's linear kernel over a copy of the weight laid
  out once in the blocked format it reads (`torch.ops.mkldnn`, what inductor's frozen CPU graphs
  call). Its small passes read each weight once for all rows, so 8 rows cost little more than
  1, and the probe finds one row count class for most shapes. The copy doubles the linear
  weights' memory: it is kept only for shapes whose plan uses it, and not tried at all where it
  would take more than a quarter of the available memory.

Passes of more rows than a plan covers (prompt chunks) run in one call of whichever operand
order is faster for prompt-sized passes (measured too: `x @ weight.T` by 15-25% at 45 and 254
rows here). A chunk run alone needs only be deterministic; chunks of several prompts can share
one pass (cheaper per token: 225 rows in one pass cost about 0.6 of five 45-row passes here)
only where a row's bits do not depend on the pass's size either. `shared_pass_window` probes over
which range of pass sizes that holds (MKL on one machine: 12 rows and more give a row one result,
9-11 rows not even the same result in another place of the call; on another, 81 to 192 rows, and
other bits again at 256), with room for two chunks; chunks run alone where there is no such range.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, MutableMapping, Sequence
from dataclasses import dataclass, replace
from functools import partial

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

log = logging.getLogger(__name__)

__all__ = [
    "KERNELS",
    "LinearPlan",
    "ShapeKey",
    "choose_plans",
    "install",
    "shape_key",
    "shared_pass_window",
]

# (weight (out, in), x (rows, in)) -> (rows, out).
Kernel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# What layers share a plan: (weight shape, dtype, device).
ShapeKey = tuple[tuple[int, ...], torch.dtype, torch.device]


def _input_first(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, weight)


def _weight_first(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.mm(weight, x.T).T


_MKLDNN = bool(torch.backends.mkldnn.is_available())  # type: ignore[no-untyped-call]
# oneDNN's copy of each weight, laid out once in the blocked format its CPU kernels read, with the
# storage it was made from; an entry goes when its weight does.
_reordered: MutableMapping[torch.Tensor, tuple[int, torch.Tensor]] = WeakIdKeyDictionary()


def _onednn_weight(weight: torch.Tensor) -> torch.Tensor:
    found = _reordered.get(weight)
    if found is not None and found[0] == weight.data_ptr():
        return found[1]
    reordered: torch.Tensor = torch.ops.mkldnn._reorder_linear_weight(weight.detach())
    _reordered[weight] = (weight.data_ptr(), reordered)
    return reordered


def _onednn_call(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(
        x, _onednn_weight(weight), None, "none", [], ""
    )
    return out


# The oneDNN kernel as one operator that a compiled pass (server/engine/compiled_decode.py) calls
# as it is: its reordered weight is an opaque tensor that torch.compile cannot trace through.
_onednn_op = torch.library.custom_op("glm::onednn_linear", mutates_args=())(_onednn_call)


@_onednn_op.register_fake
def _onednn_fake(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x.new_empty((x.shape[0], weight.shape[0]))


def _onednn(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # Eager calls skip the operator's dispatch: same kernel, less time per call.
    if torch.compiler.is_compiling():
        out: torch.Tensor = _onednn_op(x, weight)
        return out
    return _onednn_call(x, weight)


KERNELS: dict[str, Kernel] = {
    "input_first": _input_first,
    "weight_first": _weight_first,
    "onednn": _onednn,
}


def _usable(name: str, weight: torch.Tensor) -> bool:
    """Whether kernel `name` runs on `weight` (oneDNN's: CPU float32 weights only)."""
    if name != "onednn":
        return True
    return weight.device.type == "cpu" and weight.dtype == torch.float32 and _MKLDNN


def _copies_fit(layers: Iterable[torch.nn.Linear]) -> bool:
    """Whether a second copy of these weights leaves most of the memory available (Linux)."""
    needed = sum(m.weight.nbytes for m in layers)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return needed <= int(line.split()[1]) * 1024 // 4
    except OSError:
        pass
    return False


def _forget_unused(modules: Iterable[torch.nn.Linear], plans: dict[ShapeKey, LinearPlan]) -> int:
    """Drop the reordered weights of `modules` that no plan reads (timing the candidates
    reordered them all); returns the bytes the kept ones hold."""
    kept = 0
    for m in modules:
        plan = plans.get(shape_key(m))
        found = _reordered.get(m.weight)
        if found is None:
            continue
        if plan is not None and plan.kernel == "onednn":
            kept += found[1].nbytes
        else:
            del _reordered[m.weight]
    return kept


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


def _large_pass(
    kernel: str, weight: torch.Tensor, flat: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """A pass of more rows than the plan covers, (rows, in) -> (rows, out), in one call."""
    if kernel == "input_first":
        return F.linear(flat, weight, bias)  # bias fused into the GEMM
    out = KERNELS[kernel](weight, flat.contiguous()).contiguous()
    return out if bias is None else out + bias


def _forward(plan: LinearPlan, module: torch.nn.Linear) -> Callable[[torch.Tensor], torch.Tensor]:
    def forward(x: torch.Tensor) -> torch.Tensor:
        # Read at each call: the module may be given new parameters after the plan is installed.
        weight, bias = module.weight, module.bias
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if rows == 0:
            return F.linear(x, weight, bias)
        flat = x.reshape(rows, x.shape[-1])
        if rows > plan.max_rows:
            out = _large_pass(plan.large_kernel, weight, flat, bias)
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


def _output_layer(causal_lm: torch.nn.Module) -> torch.nn.Module | None:
    """The layer that turns hidden states into logits (a causal LM's lm_head), if any."""
    get_output = getattr(causal_lm, "get_output_embeddings", None)
    output = get_output() if callable(get_output) else None
    return output if isinstance(output, torch.nn.Module) else None


def _linears(causal_lm: torch.nn.Module) -> Iterable[torch.nn.Linear]:
    return (m for m in causal_lm.modules() if isinstance(m, torch.nn.Linear))


def _by_shape(
    modules: Iterable[torch.nn.Linear], skip: torch.nn.Module | None = None
) -> dict[ShapeKey, list[torch.nn.Linear]]:
    """The linear layers `modules` (but `skip`) grouped by the plan they share."""
    by_shape: dict[ShapeKey, list[torch.nn.Linear]] = {}
    for m in modules:
        if m is not skip:
            by_shape.setdefault(shape_key(m), []).append(m)
    return by_shape


def _call_sizes(max_rows: int) -> list[int]:
    """1..8, then powers of two up to the first one >= max_rows."""
    sizes = list(range(1, min(max_rows, 8) + 1))
    while sizes[-1] < max_rows:
        sizes.append(sizes[-1] * 2)
    return sizes


def _bits(t: torch.Tensor) -> bytes:
    """The bytes of `t`, whatever its dtype (numpy has no bfloat16: read them as raw bytes)."""
    return bytes(t.detach().contiguous().view(torch.uint8).cpu().numpy().tobytes())


# Half-precision probes: how many result rows they compare, and the exponents (base 2) of
# their inputs' small values and of the largest term they plant (see `_probe_input`).
_HALF_PROBE_ROWS = 32
_SMALL = -10
_PLANTED = 13


def _full_precision(weight: torch.Tensor) -> bool:
    return weight.dtype in (torch.float32, torch.float64)


def _probe_rows(weight: torch.Tensor) -> int:
    """Result rows a probe compares: row 0 in full precision, more in half precision."""
    return 1 if _full_precision(weight) else _HALF_PROBE_ROWS


def _probe_input(weight: torch.Tensor, rows: int, generator: torch.Generator) -> torch.Tensor:
    """`rows` probe rows for calls of `weight`, on its device and in its dtype.

    In full precision, normal random rows: another summation order shows in the result's last
    bits. A half-precision result rounds most such differences away (two float32 sums that
    differ in their last bits mostly round to one float16), so there each row makes one result,
    output j, show them: small values, but for two weights w[j, p] and w[j, q] the inputs
    c * w[j, q] and -c * w[j, p] add +A and -A exactly. Output j is then small, and the rounding
    of its partial sums at A's scale, which depends on the order the terms are added in, is
    far above its half-precision spacing.
    """
    x = torch.randn(rows, weight.shape[1], generator=generator)
    if _full_precision(weight) or weight.shape[1] < 2:
        return x.to(weight.device, weight.dtype)
    x *= 2.0**_SMALL
    w = weight.detach().float().cpu()
    # The planted inputs meet every output's weights: no product may leave the dtype's range.
    largest = max(1.0, float(w.abs().max()))
    outputs = torch.randint(w.shape[0], (rows,), generator=generator)
    for r, j in enumerate(outputs.tolist()):
        row = w[j]
        # Two of the output's larger weights, so that A is large.
        strong = torch.nonzero(row.abs() >= row.abs().median()).flatten()
        if strong.numel() < 2:
            continue
        chosen = strong[torch.randperm(strong.numel(), generator=generator)[:2]]
        p, q = int(chosen[0]), int(chosen[1])
        larger = max(abs(float(row[p])), abs(float(row[q])))
        scale = 2.0 ** math.floor(math.log2(2.0**_PLANTED / largest / larger))
        x[r, p] = scale * row[q]
        x[r, q] = -scale * row[p]
    return x.to(weight.device, weight.dtype)


def _row_bits(
    kernel: Kernel, size: int, weight: torch.Tensor, x: torch.Tensor, rows: int = 1
) -> bytes | None:
    """The result bytes of x's first `rows` rows in `size`-row calls, or None where the calls
    are not invariant (`x` holds at least rows + 2 * size rows).

    Invariant: a row's result ignores its place in the call (reversed rows give reversed
    results) and the other rows (replaced, row 0 is unchanged).
    """
    results = []
    for at in range(0, rows, size):
        part = x[at : at + size].contiguous()
        full = kernel(weight, part).contiguous()
        if size > 1:
            if not torch.equal(kernel(weight, part.flip(0).contiguous()), full.flip(0)):
                return None
            others = part.clone()
            others[1:] = x[at + size : at + 2 * size - 1]
            if not torch.equal(kernel(weight, others)[0], full[0]):
                return None
        results.append(full)
    return _bits(torch.cat(results)[:rows])


def _classes(
    kernel: Kernel, sizes: list[int], probe: tuple[torch.Tensor, torch.Tensor], rows: int = 1
) -> list[list[int]]:
    """The invariant call sizes of `kernel`, grouped by the bits they give `rows` rows."""
    by_bits: dict[bytes, list[int]] = {}
    for size in sizes:
        bits = _row_bits(kernel, size, *probe, rows)
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


# Kernels for prompt-sized passes. Not oneDNN's: it changes its code path at a larger pass size
# than MKL, so chunks would need to be much longer to share a prefill pass.
_LARGE_KERNELS = ("input_first", "weight_first")
# Prompt chunks are timed at this many rows (a typical chat prompt) and at the largest pass.
_PROMPT_ROWS = 48
# Prompt-sized passes are timed on layers holding at least this many bytes of weights.
_TIMED_BYTES = 256 << 20
# Probing pass sizes for shared passes on a CPU stops being worth it past this many FLOPs (about
# 2 s here): a large model on a CPU then runs prompt chunks alone.
_CPU_PROBE_FLOPS = 1e11


def _fastest_large(
    layers: list[torch.nn.Linear],
    sizes: list[int],
    generator: torch.Generator,
) -> str:
    """The kernel whose passes of `sizes` rows are never far from the fastest (best of two).

    Kept: the smallest worst ratio to the faster kernel over the sizes. One size is not enough:
    MKL here has `x @ weight.T` 25% faster at 45 rows, 15% at 254, and both alike at 64.
    Timed on as many of the layers as hold _TIMED_BYTES of weights (all of a small model's):
    more memory than caches hold, without a large model's prompt-sized passes taking minutes.
    """
    timed: list[torch.nn.Linear] = []
    timed_bytes = 0
    for m in layers:
        timed.append(m)
        timed_bytes += m.weight.nbytes
        if timed_bytes >= _TIMED_BYTES:
            break
    layers = timed
    weight = layers[0].weight
    names = _LARGE_KERNELS
    seconds = {(name, size): float("inf") for name in names for size in sizes}
    inputs = {}
    for size in sizes:
        x = torch.randn(size, weight.shape[1], generator=generator)
        inputs[size] = x.to(weight.device, weight.dtype)
    # Timed as such passes run, result made row-major included (for `weight @ x.T`, a strided
    # copy that costs it about 0.1 ms a call at 45 rows: enough to turn the choice here).
    passes: dict[str, Kernel] = {name: partial(_large_pass, name) for name in names}
    for round_ in range(3):
        for (name, size), best in seconds.items():
            s = _seconds(passes[name], layers, inputs[size])
            if round_:
                seconds[(name, size)] = min(best, s)
    fastest = {size: min(seconds[(name, size)] for name in names) for size in sizes}
    return min(names, key=lambda name: max(seconds[(name, n)] / fastest[n] for n in sizes))


@torch.inference_mode()
def choose_plans(
    causal_lm: torch.nn.Module,
    max_rows: int,
    max_pass_rows: int = 0,
    extra: torch.nn.Module | None = None,
    kernels: Sequence[str] | None = None,
) -> dict[ShapeKey, LinearPlan]:
    """The fastest batch-invariant plan per weight shape for passes of 1..max_rows rows.

    Larger passes (prompt chunks, up to `max_pass_rows` rows) get the kernel faster there. The
    linear layers of `extra` (a decode pass's fused projections) are planned too. `kernels`: the
    candidates for small passes (default: all of KERNELS).
    """
    modules = list(_linears(causal_lm))
    if extra is not None:
        modules += _linears(extra)
    by_shape = _by_shape(modules)
    output = _output_layer(causal_lm)
    sizes = _call_sizes(max_rows)
    kernels = list(KERNELS if kernels is None else kernels)
    if "onednn" in kernels and not _copies_fit(modules):
        kernels.remove("onednn")
        log.info(
            "decode linear layers: no oneDNN candidate (a second copy of the weights would "
            "not leave most of the available memory)"
        )
    generator = torch.Generator().manual_seed(0)
    plans: dict[ShapeKey, LinearPlan] = {}
    summary: list[str] = []
    for key, layers in by_shape.items():
        weight = layers[0].weight
        rows = _probe_rows(weight)
        x_rows = 2 * sizes[-1] if rows == 1 else rows + 2 * sizes[-1]
        x = _probe_input(weight, x_rows, generator)
        candidates = [
            (name, cls)
            for name in kernels
            if _usable(name, weight)
            for cls in _classes(KERNELS[name], sizes, (weight, x), rows)
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
        if all(m is output for m in layers):
            large = "input_first"  # given each sequence's last row only: never a large pass
        else:
            at = sorted({max(_PROMPT_ROWS, max_rows + 1), max(max_pass_rows, max_rows + 1)})
            large = _fastest_large(layers, at, generator)
        plans[key] = replace(plan, large_kernel=large)
        summary.append(
            f"{key[0]} x{len(layers)}: {plan.kernel} calls {plan.calls[1:]} "
            f"({sum(per_n) / max_rows * 1000:.1f} ms per average pass), {large} beyond"
        )
    log.info("decode linear layers: %s", "; ".join(summary))
    kept = _forget_unused(modules, plans)
    if kept:
        log.info("decode linear layers: oneDNN's reordered weights hold %.0f MiB", kept / 2**20)
    return plans


def _large_sizes(max_rows: int, max_pass_rows: int) -> list[int]:
    """Pass sizes probed past max_rows: each of the next 16, then steps of 1.5x, and the largest."""
    sizes = set(range(max_rows + 1, min(max_rows + 17, max_pass_rows + 1)))
    size = max_rows + 16
    while size < max_pass_rows:
        sizes.add(size)
        size = size * 3 // 2
    sizes.add(max_pass_rows)
    return sorted(sizes)


def _size_bits(
    call: Callable[[torch.Tensor], torch.Tensor], sizes: list[int], x: torch.Tensor, head: int
) -> list[bytes | None]:
    """For each of `sizes`: the bytes of the first `head` rows in a pass of that size, or None
    where a row's result depends on its place in the pass (the same rows shifted by three give
    other results)."""
    shift = 3
    found: list[bytes | None] = []
    for size in sizes:
        full = call(x[shift : shift + size].contiguous()).contiguous()
        shifted = call(x[:size].contiguous()).contiguous()
        same_place = torch.equal(shifted[shift:], full[: size - shift])
        found.append(_bits(full[:head]) if same_place else None)
    return found


def _window(by_shape: list[list[bytes | None]], sizes: list[int]) -> tuple[int, int] | None:
    """The pass sizes [low, high] of `sizes` over which every shape gives its rows one result,
    with room for two chunks of `low` rows in a pass of `high`: the smallest low, then the
    largest high; None where there is none."""

    def one_result(bits: list[bytes | None], i: int, j: int) -> bool:
        return bits[i] is not None and all(bits[k] == bits[i] for k in range(i, j + 1))

    for i, low in enumerate(sizes):
        for j in range(len(sizes) - 1, i - 1, -1):
            if 2 * low > sizes[j]:
                break
            if all(one_result(bits, i, j) for bits in by_shape):
                return low, sizes[j]
    return None


@torch.inference_mode()
def shared_pass_window(
    causal_lm: torch.nn.Module, plans: dict[ShapeKey, LinearPlan], max_pass_rows: int
) -> tuple[int, int] | None:
    """(fewest rows a prompt chunk needs to share a pass, most rows such a pass may hold).

    A chunk of at least `low` rows gets bit-identical results from every linear layer alone or
    packed with other chunks in a pass of up to `high` rows (at most `max_pass_rows`), so where
    it runs cannot change a greedy reply. None: no such sizes (or nothing to share), so chunks
    must run alone. The output layer is not probed: a prefill pass gives it only each chunk's
    last row, a decode-sized pass.
    """
    by_shape = {
        key: layers[0]
        for key, layers in _by_shape(_linears(causal_lm), _output_layer(causal_lm)).items()
    }
    if not by_shape or not plans:
        return None
    max_rows = max(plans[key].max_rows for key in by_shape)
    if max_pass_rows <= max_rows:
        return None
    sizes = _large_sizes(max_rows, max_pass_rows)
    flops = sum(4 * sum(sizes) * m.weight.numel() for m in by_shape.values())
    if flops > _CPU_PROBE_FLOPS and any(m.weight.device.type == "cpu" for m in by_shape.values()):
        log.info(
            "prompt chunks run alone: probing pass sizes up to %d rows is too slow on a CPU for "
            "this model (%.0f GFLOP)",
            max_pass_rows,
            flops / 1e9,
        )
        return None
    generator = torch.Generator().manual_seed(2)
    bits: list[list[bytes | None]] = []
    for key, m in by_shape.items():
        plan = plans[key]
        weight, bias = m.weight, m.bias
        x = _probe_input(weight, max_pass_rows + 3, generator)
        call = partial(_large_pass, plan.large_kernel, weight, bias=bias)
        bits.append(_size_bits(call, sizes, x, head=max_rows + 1))
    window = _window(bits, sizes)
    if window is None:
        log.info(
            "prompt chunks run alone: no range of pass sizes up to %d rows gives a row one "
            "result with room for two chunks",
            max_pass_rows,
        )
        return None
    log.info(
        "prompt chunks of %d+ tokens share prefill passes of up to %d tokens", window[0], window[1]
    )
    return window

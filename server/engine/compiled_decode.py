"""The lean decode pass compiled by torch.compile: one graph per bucket of row counts.

Why: even the lean pass (server/engine/lean_decode.py) dispatches thousands of small operations a
step from Python, and at a few rows that dispatch costs about as much as the arithmetic around the
linear layers. Inductor turns the pass's norms, rotary embedding, residual sums and softmax into a
few fused C++ loops and calls the matrix products directly, so Python leaves the hot path.

Shapes: the linear plans (server/engine/invariant_linear.py) cut a pass into calls by its row
count, so the row count is static: a pass is padded up to the next bucket (1, 2, 4, ... and the
batch's size), which adds rows the engine already treats as padding. The key length and the
memory's length are dynamic, so a growing sequence never recompiles. Once the batch has compiled its
buckets, a call whose shapes no graph covers runs the lean pass eagerly rather than compiling in
the middle of serving.

Same results: a bucket's graph computes each row in loops of their own, so a row's bits do not
depend on the other rows; `SlotBatch` checks that on every bucket when it opens, and that the
logits stay within rounding of the eager pass's (fused loops may sum in another order), and keeps
the eager pass where either check fails or compilation fails, saying why.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence

import torch

from server.engine.lean_decode import LeanDecoder

log = logging.getLogger(__name__)

__all__ = ["KERNELS", "CompiledDecode", "row_buckets", "why_not_compiled"]

# The linear kernels a compiled pass's plans may use (server/engine/invariant_linear.py).
# Not "weight_first": inductor lays out its transposed operand as it sees fit per graph, so a
# row's bits could change with the bucket, which the check on opening then refuses.
KERNELS = ("input_first", "onednn")

DecodeFn = Callable[
    [
        torch.Tensor,
        torch.Tensor,
        torch.Tensor,
        Sequence[tuple[torch.Tensor, torch.Tensor]],
        torch.Tensor,
    ],
    torch.Tensor,
]


def row_buckets(max_rows: int) -> tuple[int, ...]:
    """The row counts graphs are compiled for: powers of two below `max_rows`, and `max_rows`."""
    if max_rows < 1:
        raise ValueError(f"max_rows must be at least 1, not {max_rows}")
    buckets = []
    size = 1
    while size < max_rows:
        buckets.append(size)
        size *= 2
    buckets.append(max_rows)
    return tuple(buckets)


def why_not_compiled(lean: LeanDecoder, device: torch.device) -> str | None:
    """Why `lean` is not compiled on `device`, or None if it is."""
    if device.type != "cpu":
        return "compiled passes run on CPUs only for now"
    if any(type(m) is not torch.nn.Linear for m in lean.fused):
        # Tried: the batch's check refused them, so compiling them only lengthened start-up.
        return "int8 layers: their compiled products disagree with the eager int8 kernel's"
    return None


class CompiledDecode:
    """`LeanDecoder.decode` compiled for passes of `buckets` rows (call `bucket` to pad to one)."""

    def __init__(self, lean: LeanDecoder, max_rows: int) -> None:
        self.buckets = row_buckets(max_rows)
        # The same pass, not compiled (what a failed graph hands over to).
        self.eager: DecodeFn = lean.decode
        # Every bucket of every compiled batch in the process is one more graph of the same code;
        # past dynamo's per-code limit a call would silently run eagerly.
        torch._dynamo.config.recompile_limit += len(self.buckets)
        # No pattern matcher: its mm + add -> addmm rewrite folds a residual into the matrix
        # product only where no padding slice sits between them, so a row's bits would change
        # with the bucket.
        self._compiled: DecodeFn = torch.compile(
            lean.decode, dynamic=False, fullgraph=True, options={"pattern_matcher": False}
        )
        # Set once every bucket has its graph: from then on nothing compiles while serving.
        self._frozen = False

    def bucket(self, rows: int) -> int:
        """The rows a pass of `rows` rows runs with, padding included."""
        for size in self.buckets:
            if size >= rows:
                return size
        raise ValueError(f"a decode pass has at most {self.buckets[-1]} rows, not {rows}")

    @property
    def frozen(self) -> bool:
        """Whether every bucket has its graph (calls no longer compile)."""
        return self._frozen

    def freeze(self) -> None:
        """From now on run a call no graph covers eagerly instead of compiling a new graph."""
        self._frozen = True

    def __call__(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor,
        memory: Sequence[tuple[torch.Tensor, torch.Tensor]],
        rows_index: torch.Tensor,
    ) -> torch.Tensor:
        """`LeanDecoder.decode`'s logits, from the graph of this pass's bucket."""
        # The key length and the memory's length change as sequences come and grow. (The caller
        # passes the memory of the pass's rows only: its capacity in rows changes too.)
        torch._dynamo.mark_dynamic(mask, 3)
        for keys, values in memory:
            torch._dynamo.mark_dynamic(keys, 2)
            torch._dynamo.mark_dynamic(values, 2)
        stance = (
            torch.compiler.set_stance("eager_on_recompile")
            if self._frozen
            else contextlib.nullcontext()
        )
        with stance:
            return self._compiled(ids, positions, mask, memory, rows_index)

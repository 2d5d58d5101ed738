"""Experiment (issue #18): the cost of one decode pass's linear layers per kernel and row count.

SmolLM2-135M's linear shapes (30 layers and the output layer), random float32 weights: seconds
for all of them at 1 and 8 rows with `x @ w.T` (input_first), `w @ x.T` (weight_first) MKL's
packed GEMM (`torch.ops.mkl._mkl_linear`, weights packed once for one row count) and
oneDNN's linear (weights reordered once, `torch.ops.mkldnn._linear_pointwise`), and whether each
kernel gives a row the same bits alone, reversed, among other rows and at 1 vs 8 rows.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--layers", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    weights = [torch.randn(s) * 0.05 for _ in range(args.layers) for s in SHAPES]
    weights.append(torch.randn(49152, 576) * 0.05)
    packed = {m: [torch.ops.mkl._mkl_reorder_linear_weight(w, m) for w in weights] for m in (1, 8)}
    xs = {w.shape[1]: torch.randn(24, w.shape[1]) for w in weights}

    def input_first(i: int, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weights[i])

    def weight_first(i: int, x: torch.Tensor) -> torch.Tensor:
        return torch.mm(weights[i], x.T).T.contiguous()

    def mkl_packed(i: int, x: torch.Tensor) -> torch.Tensor:
        m = x.shape[0]
        out: torch.Tensor = torch.ops.mkl._mkl_linear(x, packed[m][i], weights[i], None, m)
        return out

    reordered = [torch.ops.mkldnn._reorder_linear_weight(w, 8) for w in weights]

    def onednn(i: int, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(
            x, reordered[i], None, "none", [], ""
        )
        return out

    kernels: dict[str, Callable[[int, torch.Tensor], torch.Tensor]] = {
        "input_first": input_first,
        "weight_first": weight_first,
        "mkl_packed": mkl_packed,
        "onednn": onednn,
    }
    with torch.inference_mode():
        for name, k in kernels.items():
            for rows in (1, 8):
                best = float("inf")
                for _ in range(4):
                    started = time.perf_counter()
                    for i, w in enumerate(weights):
                        k(i, xs[w.shape[1]][:rows].contiguous())
                    best = min(best, time.perf_counter() - started)
                print(f"{name} {rows} rows: {best * 1e3:.1f} ms per pass", flush=True)
            same_1_8 = same_place = same_others = True
            for i in [*range(len(SHAPES)), len(weights) - 1]:
                x = xs[weights[i].shape[1]]
                eight = k(i, x[:8].contiguous())
                one = k(i, x[:1].contiguous())
                same_1_8 &= torch.equal(one[0], eight[0])
                same_place &= torch.equal(k(i, x[:8].flip(0).contiguous()), eight.flip(0))
                same_others &= torch.equal(k(i, torch.cat((x[:1], x[8:15])))[0], eight[0])
            print(
                f"{name}: row bits 1 vs 8 rows {same_1_8}, place-invariant {same_place}, "
                f"others-invariant {same_others}",
                flush=True,
            )


if __name__ == "__main__":
    main()

"""Experiment (issue #18): torch.compile over SlotBatch's decode step, against eager.

Loads the default chat model, opens a slot batch of 8 rows, prefills 8 prompts eagerly, then
times decode steps of 1 and 8 rows eagerly and with the model compiled (inductor, static shapes),
and compares the logits bit for bit: compiled vs eager, and compiled 1 row vs the same row in 8.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from bench.decode_profile import _default_model


def snapshot(batch: Any) -> Any:
    layers = [(layer.keys.clone(), layer.values.clone()) for layer in batch.cache.slot_layers()]
    return layers, list(batch._lengths)


def restore(batch: Any, state: Any) -> None:
    layers, lengths = state
    for layer, (k, v) in zip(batch.cache.slot_layers(), layers, strict=True):
        layer.keys.copy_(k)
        layer.values.copy_(v)
    batch._lengths[:] = lengths


def step(batch: Any, rows: int, state: Any) -> dict[int, torch.Tensor]:
    restore(batch, state)
    out = batch.decode({r: 7 + r for r in range(rows)})
    return {k: v.clone() for k, v in out.items()}


def timed(batch: Any, rows: int, steps: int) -> float:
    tokens = {r: 7 for r in range(rows)}
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        for _ in range(steps):
            batch.decode(tokens)
            for r in range(rows):
                batch._lengths[r] -= 1  # stay at one length (one kv_len): no recompiles
        best = min(best, (time.perf_counter() - started) / steps)
    return best * 1e3


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--mode", default="default")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument(
        "--no-onednn",
        action="store_true",
        help="plans without oneDNN's kernel (inductor lowers it only for frozen weights)",
    )
    args = parser.parse_args()
    if args.no_onednn:
        from server.engine import invariant_linear

        invariant_linear.KERNELS.pop("onednn")
    if args.threads:
        torch.set_num_threads(args.threads)
    from server.engine.kv_slots import SlotBatch

    model = _default_model("none")
    lm = model.causal_lm
    batch = SlotBatch(lm, model.device, 8, 256)
    for slot in range(8):
        batch.prefill(slot, list(range(100 + slot, 130 + slot)))
    state = snapshot(batch)
    eager = {rows: step(batch, rows, state) for rows in (1, 8)}
    eager_ms = {rows: timed(batch, rows, args.steps) for rows in (1, 8)}
    restore(batch, state)
    print(f"eager: 1 row {eager_ms[1]:.2f} ms/step, 8 rows {eager_ms[8]:.2f} ms/step", flush=True)
    same = torch.equal(eager[1][0], eager[8][0])
    print(f"eager 1 row vs 8 rows, row 0 bit-identical: {same}", flush=True)

    from torch._dynamo.utils import counters

    compiled = torch.compile(lm, dynamic=False, mode=None if args.mode == "default" else args.mode)
    batch._lm = compiled
    comp: dict[int, dict[int, torch.Tensor]] = {}
    for rows in (1, 8):
        started = time.perf_counter()
        comp[rows] = step(batch, rows, state)
        print(f"compile {rows} rows: {time.perf_counter() - started:.1f} s", flush=True)
    print("graph breaks:", dict(counters["graph_break"]), flush=True)
    comp_ms = {rows: timed(batch, rows, args.steps) for rows in (1, 8)}
    print(f"compiled: 1 row {comp_ms[1]:.2f} ms/step, 8 rows {comp_ms[8]:.2f} ms/step", flush=True)
    for rows in (1, 8):
        diff = max(float((comp[rows][r] - eager[rows][r]).abs().max()) for r in comp[rows])
        ident = all(torch.equal(comp[rows][r], eager[rows][r]) for r in comp[rows])
        argmax = all(
            int(comp[rows][r].argmax()) == int(eager[rows][r].argmax()) for r in comp[rows]
        )
        print(
            f"{rows} rows compiled vs eager: bit-identical {ident}, max diff {diff:.3g}, "
            f"same argmax {argmax}",
            flush=True,
        )
    print("compiled 1 row vs 8 rows, row 0 bit-identical:", torch.equal(comp[1][0], comp[8][0]))


if __name__ == "__main__":
    main()

"""``python -m bench.decode_profile``: where one decode step of the default chat model spends time.

Loads the default chat model as the server does, opens its slot batch (which measures the linear
plans), fills `rows` slots with a prompt each, then profiles decode steps with torch.profiler and
splits their CPU time into matrix products (the BLAS calls of the linear layers and attention),
the other operators (elementwise, norms, softmax, indexing, copies), and what no operator accounts
for (Python, transformers' module calls, the profiler itself). Prints one line per batch size.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any

import torch

# Operators whose self time is BLAS work.
_BLAS = (
    "aten::mm",
    "aten::addmm",
    "aten::bmm",
    "aten::baddbmm",
    "aten::_weight_int8pack_mm",
    "mkldnn::_linear_pointwise",
)


def _default_model(quantize: str) -> Any:
    import dataclasses

    from server.config import load_model_specs
    from server.domain import ModelKind
    from server.models.loader import load_model
    from server.settings import DEFAULT_CONFIG, Settings

    spec = next(s for s in load_model_specs(DEFAULT_CONFIG) if s.kind is ModelKind.CHAT)
    return load_model(dataclasses.replace(spec, quantize=quantize), Settings().cache_dir)


def profile_rows(batch: Any, rows: int, steps: int) -> dict[str, float]:
    """Per-step milliseconds of a `rows`-sequence decode: wall, BLAS, other ops, the rest."""
    from torch.profiler import ProfilerActivity, profile

    for slot in range(batch.max_sequences):
        batch.release(slot)
    prompt = list(range(100, 140))
    for slot in range(rows):
        batch.prefill(slot, prompt)
    tokens = dict.fromkeys(range(rows), 7)
    for _ in range(3):
        batch.decode(tokens)
    started = time.perf_counter()
    for _ in range(steps):
        batch.decode(tokens)
    wall = (time.perf_counter() - started) / steps
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            batch.decode(tokens)
    blas = other = 0.0
    calls = 0
    for event in prof.key_averages():
        calls += event.count
        if event.key in _BLAS:
            blas += event.self_cpu_time_total
        else:
            other += event.self_cpu_time_total
    profiled = sum(e.self_cpu_time_total for e in prof.key_averages()) / 1e3 / steps
    return {
        "rows": rows,
        "wall_ms": wall * 1e3,
        "profiled_ms": profiled,
        "blas_ms": blas / 1e3 / steps,
        "other_ops_ms": other / 1e3 / steps,
        "ops_per_step": calls / steps,
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.decode_profile", description=__doc__)
    parser.add_argument("--rows", default="1,8", help="batch sizes (%(default)s)")
    parser.add_argument("--steps", type=int, default=40, help="steps per size (%(default)s)")
    parser.add_argument("--top", type=int, default=0, help="also print the N costliest operators")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: its default)")
    parser.add_argument("--quantize", default="none", help="the model's quantize option")
    parser.add_argument(
        "--no-lean",
        action="store_true",
        help="decode with the model's own forward, not the lean pass",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from server.engine.kv_slots import SlotBatch

    model = _default_model(args.quantize)
    sizes = [int(r) for r in args.rows.split(",")]
    batch = SlotBatch(model.causal_lm, model.device, max(sizes), 256, lean_decode=not args.no_lean)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{'lean' if batch.lean else 'the model' + chr(39) + 's own'} decode passes",
        flush=True,
    )
    for key, plan in batch.linear_plans.items():
        at_max = plan.calls[max(sizes)] if max(sizes) <= plan.max_rows else "one call"
        print(f"  linear {key[0]}: {plan.kernel}, {max(sizes)} rows as calls {at_max}")
    for rows in sizes:
        r = profile_rows(batch, rows, args.steps)
        wall = r["wall_ms"]
        rest = wall - r["blas_ms"] - r["other_ops_ms"]
        print(
            f"rows={rows}: wall {wall:.2f} ms/step ({rows * 1e3 / wall:.1f} tok/s), "
            f"BLAS {r['blas_ms']:.2f} ms ({100 * r['blas_ms'] / wall:.0f}%), "
            f"other ops {r['other_ops_ms']:.2f} ms ({100 * r['other_ops_ms'] / wall:.0f}%), "
            f"outside ops {rest:.2f} ms ({100 * rest / wall:.0f}%), "
            f"{r['ops_per_step']:.0f} ops/step",
            flush=True,
        )
        if args.top:
            from torch.profiler import ProfilerActivity, profile

            tokens = dict.fromkeys(range(rows), 7)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(args.steps):
                    batch.decode(tokens)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))


if __name__ == "__main__":
    main()

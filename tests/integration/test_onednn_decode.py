"""Decode passes whose linear layers run oneDNN's kernel (weights reordered once): a sequence's
greedy logits are bit-identical alone and in a batch, and match a plain forward.

The plans `SlotBatch` measures may or may not pick oneDNN on a given machine, so the tests here
install oneDNN plans themselves, with call sizes from the class the probe finds holding 8 rows.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from server.engine.invariant_linear import (
    KERNELS,
    LinearPlan,
    _best_calls,
    _classes,
    install,
    shape_key,
)
from server.engine.kv_slots import SlotBatch
from tests.integration.test_batching import TINY_MODELS, full_forward_logits, tiny, token_ids
from tests.tiny_models import greedy_logits

pytestmark = pytest.mark.skipif(
    not torch.backends.mkldnn.is_available(),  # type: ignore[no-untyped-call]
    reason="oneDNN is not built in",
)


def onednn_batch(lm: torch.nn.Module) -> SlotBatch:
    batch = SlotBatch(lm, torch.device("cpu"), max_sequences=8)
    generator = torch.Generator().manual_seed(0)
    plans: dict[Any, LinearPlan] = {}
    with torch.inference_mode():
        for m in lm.modules():
            if isinstance(m, torch.nn.Linear) and shape_key(m) not in plans:
                x = torch.randn(16, m.weight.shape[1], generator=generator)
                classes = _classes(KERNELS["onednn"], list(range(1, 9)), (m.weight, x))
                # The class holding 8-row calls, as a measured plan would mostly use.
                eight = next(c for c in classes if 8 in c)
                calls = _best_calls({size: 1.0 + size / 8 for size in eight}, max_rows=8)
                plans[shape_key(m)] = LinearPlan("onednn", calls)
    install(lm, plans)
    return batch


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_onednn_decode_is_batch_invariant_and_right(name: str) -> None:
    lm = tiny(name, "cpu", torch.float32)
    batch = onednn_batch(lm)
    lengths = [3, 17, 40, 63, 64, 90]
    alone = {n: greedy_logits(batch, {0: token_ids(n, n)}, 10)[0] for n in lengths}
    together = greedy_logits(batch, {7 - i: token_ids(n, n) for i, n in enumerate(lengths)}, 10)
    for i, n in enumerate(lengths):
        for a, b in zip(alone[n], together[7 - i], strict=True):
            assert torch.equal(a, b), f"prompt of {n} tokens differs in a batch"
    # The decoded tokens' logits are those of a plain forward over the whole sequence.
    ids = token_ids(17, 17)
    for logits in alone[17][:4]:
        ids.append(int(logits.argmax()))
    seen = alone[17][4]
    torch.testing.assert_close(seen, full_forward_logits(lm, ids), atol=1e-4, rtol=1e-4)

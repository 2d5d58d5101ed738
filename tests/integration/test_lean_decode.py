"""The lean decode pass (server/engine/lean_decode.py): the model's own decode results in fewer
operations, batch-invariant, no memory added, and the model's forward kept wherever it does not
apply or does not agree.
"""

from __future__ import annotations

import logging

import pytest
import torch

from server.engine.kv_slots import SlotBatch
from server.engine.lean_decode import LeanDecoder
from server.models.int8_linear import quantize_linears
from tests.integration.test_batching import full_forward_logits, token_ids
from tests.tiny_models import greedy_logits, tiny_glm, tiny_llama

LENGTHS = [3, 17, 40, 63, 64, 90]


def decoded(batch: SlotBatch, steps: int = 10) -> dict[int, list[torch.Tensor]]:
    """Each prompt's greedy logits alone, by prompt length."""
    return {n: greedy_logits(batch, {0: token_ids(n, n)}, steps)[0] for n in LENGTHS}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lean_pass_is_batch_invariant_and_gives_the_models_results(dtype: torch.dtype) -> None:
    lean = SlotBatch(tiny_llama().to(dtype=dtype), torch.device("cpu"), max_sequences=8)
    assert lean.lean
    alone = decoded(lean)
    together = greedy_logits(lean, {7 - i: token_ids(n, n) for i, n in enumerate(LENGTHS)}, 10)
    for i, n in enumerate(LENGTHS):
        for a, b in zip(alone[n], together[7 - i], strict=True):
            assert torch.equal(a, b), f"prompt of {n} tokens differs in a batch"
    own = SlotBatch(
        tiny_llama().to(dtype=dtype), torch.device("cpu"), max_sequences=8, lean_decode=False
    )
    assert not own.lean
    reference = decoded(own)
    atol = 1e-5 if dtype == torch.float32 else 2e-2
    for n in LENGTHS:
        for a, b in zip(alone[n], reference[n], strict=True):
            assert int(a.argmax()) == int(b.argmax()), f"prompt of {n} tokens: another token"
            torch.testing.assert_close(a, b, atol=atol, rtol=atol)
    if dtype == torch.float32:
        # And the decoded tokens' logits are a plain forward's over the whole sequence.
        ids = token_ids(17, 17)
        for logits in alone[17][:4]:
            ids.append(int(logits.argmax()))
        torch.testing.assert_close(
            alone[17][4], full_forward_logits(lean._lm, ids), atol=1e-4, rtol=1e-4
        )


def test_projections_become_views_of_the_fused_weights() -> None:
    lm = tiny_llama()
    before = {name: p.detach().clone() for name, p in lm.named_parameters()}
    batch = SlotBatch(lm, torch.device("cpu"), max_sequences=4)
    assert batch.lean
    for name, p in lm.named_parameters():
        assert torch.equal(p, before[name]), f"{name} changed value"
    attn = lm.model.layers[0].self_attn
    storage = attn.q_proj.weight.untyped_storage().data_ptr()
    assert attn.k_proj.weight.untyped_storage().data_ptr() == storage
    assert attn.v_proj.weight.untyped_storage().data_ptr() == storage
    # A second batch on the same model fuses nothing again: it reads the same memory.
    again = LeanDecoder.build(lm)
    assert isinstance(again, LeanDecoder)
    assert again.fused[0].weight.untyped_storage().data_ptr() == storage


def test_other_models_keep_their_own_forward(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="server.engine.kv_slots")
    glm = SlotBatch(tiny_glm(), torch.device("cpu"), max_sequences=4)
    assert not glm.lean
    assert "GlmForCausalLM is not one of" in caplog.text


def test_int8_projections_are_joined_too() -> None:
    lm = tiny_llama()
    quantize_linears(lm)
    lean = SlotBatch(lm, torch.device("cpu"), max_sequences=8)
    assert lean.lean
    attn = lm.model.layers[0].self_attn
    storage = attn.q_proj.qweight.untyped_storage().data_ptr()
    assert attn.v_proj.qweight.untyped_storage().data_ptr() == storage
    own = SlotBatch(lm, torch.device("cpu"), max_sequences=8, lean_decode=False)
    alone = decoded(lean)
    reference = decoded(own)
    for n in LENGTHS:
        for a, b in zip(alone[n], reference[n], strict=True):
            assert torch.equal(a, b), f"prompt of {n} tokens differs from the model's forward"
    together = greedy_logits(lean, {7 - i: token_ids(n, n) for i, n in enumerate(LENGTHS)}, 10)
    for i, n in enumerate(LENGTHS):
        for a, b in zip(alone[n], together[7 - i], strict=True):
            assert torch.equal(a, b), f"prompt of {n} tokens differs in a batch"


def test_a_lean_pass_that_disagrees_is_not_used(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real = LeanDecoder.decode

    def off(self: LeanDecoder, *args: torch.Tensor, **kwargs: object) -> torch.Tensor:
        logits = real(self, *args, **kwargs)  # type: ignore[arg-type]
        return logits + 0.01 * logits.abs().max()

    monkeypatch.setattr(LeanDecoder, "decode", off)
    caplog.set_level(logging.INFO, logger="server.engine.kv_slots")
    batch = SlotBatch(tiny_llama(), torch.device("cpu"), max_sequences=4)
    assert not batch.lean
    assert "the lean pass's logits differ" in caplog.text
    # It still decodes, through the model's forward.
    assert len(greedy_logits(batch, {0: token_ids(9, 1)}, 3)[0]) == 4

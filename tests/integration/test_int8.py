"""int8 weight-only linear layers: close to float32, batch-invariant, checked when a model loads."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest
import torch

from server.config import ConfigError, load_model_specs
from server.domain import ModelKind
from server.engine.kv_slots import SlotBatch
from server.models.int8_linear import Int8Linear, logit_error, prompt_logits, quantize_linears
from server.settings import DEFAULT_CONFIG, Settings
from tests.integration.test_batching import token_ids
from tests.tiny_models import tiny_llama


def test_an_int8_layer_is_close_to_float_and_gives_a_row_the_same_bits_in_any_batch() -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 40)
    layer = Int8Linear(linear)
    x = torch.randn(23, 96)
    together = layer(x)
    for i in (0, 7, 22):
        assert torch.equal(layer(x[i : i + 1])[0], together[i])
        assert torch.equal(layer(x[i : i + 3])[0], together[i])
    reference = linear(x).detach()
    error = (together - reference).abs().max() / reference.abs().max()
    assert 0 < error < 0.03
    assert layer(x.reshape(1, 23, 96)).shape == (1, 23, 40)
    assert layer.row_by_row is False


def test_row_by_row_layers_compute_the_same_values() -> None:
    torch.manual_seed(0)
    layer = Int8Linear(torch.nn.Linear(32, 16, bias=False))
    x = torch.randn(5, 32)
    batched = layer(x)
    layer.row_by_row = True
    assert torch.equal(layer(x), batched)


@torch.inference_mode()
def test_a_quantized_model_decodes_the_same_alone_and_batched() -> None:
    lm = tiny_llama()
    prompt = token_ids(30, 3)
    reference = prompt_logits(lm, prompt)
    assert quantize_linears(lm) == 2 * 7 + 1  # q, k, v, o, gate, up, down per layer; lm_head
    assert not any(isinstance(m, torch.nn.Linear) for m in lm.modules())
    error, agree = logit_error(reference, prompt_logits(lm, prompt))
    assert 0 < error < 0.1
    assert agree > 0.5

    batch = SlotBatch(lm, torch.device("cpu"), max_sequences=4, max_pass_tokens=64)
    alone = batch.prefill(0, prompt)
    steps_alone = [batch.decode({0: 5})[0] for _ in range(3)]
    batch.release(0)
    for slot in range(4):
        first = batch.prefill(slot, prompt if slot == 2 else token_ids(10 + slot, slot))
        if slot == 2:
            assert torch.equal(first, alone)
    tokens = {slot: 5 for slot in range(4)}
    for expected in steps_alone:
        assert torch.equal(batch.decode(tokens)[2], expected)


def test_quantize_is_a_chat_option(tmp_path: Path) -> None:
    config = tmp_path / "models.toml"
    base = '[[models]]\nid = "m"\npath = "/x"\n'
    config.write_text(base + 'kind = "embedding"\nquantize = "int8"\n')
    with pytest.raises(ConfigError, match="quantize"):
        load_model_specs(config)
    config.write_text(base + 'kind = "chat"\nquantize = "int4"\n')
    with pytest.raises(ConfigError, match="quantize"):
        load_model_specs(config)
    config.write_text(base + 'kind = "chat"\nquantize = "int8"\n')
    assert load_model_specs(config)[0].quantize == "int8"


def test_the_default_model_loads_in_int8_with_its_accuracy_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from server.models.causal_lm import INT8_LOGIT_TOLERANCE, TransformersChatModel

    [chat] = [s for s in load_model_specs(DEFAULT_CONFIG) if s.kind is ModelKind.CHAT]
    spec = dataclasses.replace(chat, quantize="int8")
    with caplog.at_level(logging.INFO, logger="server.models.causal_lm"):
        model = TransformersChatModel(spec, Settings().cache_dir)
    [line] = [r.getMessage() for r in caplog.records if "int8 weights in" in r.getMessage()]
    assert f"tolerance {INT8_LOGIT_TOLERANCE:.2f}" in line
    assert not any(isinstance(m, torch.nn.Linear) for m in model.causal_lm.modules())
    # Greedy generation still says something sensible.
    batch = SlotBatch(model.causal_lm, model.device, max_sequences=2, max_pass_tokens=64)
    from server.domain import ChatMessage, Role

    ids = model.build_prompt([ChatMessage(Role.USER, "What is the capital of France?")])
    token = int(batch.prefill(0, ids).argmax())
    out = [token]
    for _ in range(6):
        token = int(batch.decode({0: token})[0].argmax())
        out.append(token)
    assert "Paris" in model.decoder.decode(out)

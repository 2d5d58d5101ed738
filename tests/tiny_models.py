"""Tiny causal LMs with random weights, and greedy runs in a slot batch, for tests and
scripts/gpu_check.py.

Two layers, a 97-token vocabulary, four query heads over two key/value groups, SDPA attention:
small enough to build in a moment on a CPU, shaped like the real models where the slot batch
cares (grouped keys and values, rotary positions). The same seed gives the same weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from server.engine.kv_slots import SlotBatch

TINY_VOCAB = 97
# What the Llama and the GLM builds share; GLM's default head size does not follow from these.
_SHAPE: dict[str, Any] = {
    "vocab_size": TINY_VOCAB,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 512,
    "attn_implementation": "sdpa",
}


def _seeded(model_class: Any, config: Any) -> torch.nn.Module:
    torch.manual_seed(0)
    model: torch.nn.Module = model_class(config).eval()
    return model


def tiny_llama() -> torch.nn.Module:
    """A LlamaForCausalLM of the tiny shape, in float32 on the CPU."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return _seeded(LlamaForCausalLM, LlamaConfig(**_SHAPE))


def tiny_glm() -> torch.nn.Module:
    """A GlmForCausalLM of the tiny shape, in float32 on the CPU."""
    from transformers import GlmConfig, GlmForCausalLM

    # GLM's default special ids lie past the tiny vocabulary.
    return _seeded(GlmForCausalLM, GlmConfig(**_SHAPE, pad_token_id=0, eos_token_id=1))


def greedy_logits(
    batch: SlotBatch, prompts: Mapping[int, list[int]], steps: int
) -> dict[int, list[torch.Tensor]]:
    """Each slot's logits (slot: prompt ids), its prompt's then those of `steps` greedy decode
    steps; the slots are released at the end."""
    seen: dict[int, list[torch.Tensor]] = {}
    nxt: dict[int, int] = {}
    for slot, ids in prompts.items():
        out = batch.prefill(slot, ids)
        seen[slot] = [out]
        nxt[slot] = int(out.argmax())
    for _ in range(steps):
        for slot, out in batch.decode(nxt).items():
            seen[slot].append(out)
            nxt[slot] = int(out.argmax())
    for slot in prompts:
        batch.release(slot)
    return seen

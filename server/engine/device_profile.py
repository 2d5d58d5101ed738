"""The chat engine's choices that depend on the kind of device, so CPU-sized ones stay on the CPU.

- Step budget: the default `max_batch_tokens` of a chat model whose config sets none. A CPU pass
  costs about in proportion to its tokens, so small steps keep running replies moving; a GPU pass
  of a few thousand tokens costs little more than one of a few hundred, and a long prompt fed in
  small chunks would take a pass per chunk.
- Prefill attention: on a CPU, SDPA with each chunk's additive mask (what the batch-invariance
  tests pin down). On a GPU, a causal kernel with no materialized mask: flash attention takes no
  mask, and a (chunk, context) mask of a long prompt is large.
- Key/value memory: a CPU grows it by fixed steps with no check. A GPU checks the device's free
  memory before each growth (a clear error instead of an out-of-memory crash in the middle of a
  pass) and grows at least twofold, since each growth copies the whole cache.

Decode attention is the same everywhere (server/engine/kv_slots.py `_attention`): plain matrix
products whose rows do not depend on the batch, which fused attention kernels do not promise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from server.config import CHAT_MAX_BATCH_TOKENS

__all__ = ["CPU", "CUDA", "DeviceProfile", "available_bytes", "profile_for"]


@dataclass(frozen=True, slots=True)
class DeviceProfile:
    """What the chat engine chooses for one kind of device."""

    # Chat tokens per scheduler step when the model's config sets no max_batch_tokens.
    chat_step_tokens: int
    # Prefill attention with the chunk's materialized additive mask (else a causal kernel).
    masked_prefill: bool
    # Check free device memory before the key/value cache grows, and grow it geometrically.
    kv_memory_checked: bool


CPU = DeviceProfile(
    chat_step_tokens=CHAT_MAX_BATCH_TOKENS, masked_prefill=True, kv_memory_checked=False
)
CUDA = DeviceProfile(chat_step_tokens=2048, masked_prefill=False, kv_memory_checked=True)


def profile_for(device: torch.device) -> DeviceProfile:
    """The choices for `device`: CUDA's on a CUDA device, the CPU's anywhere else."""
    return CUDA if device.type == "cuda" else CPU


def available_bytes(device: torch.device) -> int | None:
    """Bytes a new tensor on `device` can still take (None: not known, as on a CPU).

    The driver's free memory plus what torch's caching allocator holds unused: both can be given
    to a new allocation.
    """
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return int(free + cached)

"""Attention for decode passes whose results do not depend on the batch.

PyTorch's fused CPU attention gives a row slightly different results depending on the batch size
and on which thread computes it, so decode passes use plain matrix products and a softmax, per
row and head (server/engine/kv_slots.py explains the batch-invariance rules this is part of).
"""

from __future__ import annotations

import torch

__all__ = ["decode_attention"]


def decode_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor,
    scaling: float | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scaling + mask) v, (batch, heads, q, dim), in that layout.

    key and value: (batch, kv_heads, kv, dim); mask: (batch, 1, q, kv), additive.
    """
    batch, heads, q_len, dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    group = heads // kv_heads
    scale = dim**-0.5 if scaling is None else scaling
    # Query heads that share a key/value head (grouped-query attention) are stacked on the query
    # axis, so the keys and values are read as they are rather than repeated for every head.
    # Scaled before the product: in float16 an unscaled q·k can pass the largest float16 (inf,
    # then NaN after the softmax) where the scaled score is an ordinary number.
    grouped = (query * scale).reshape(batch, kv_heads, group * q_len, dim)
    scores = torch.matmul(grouped, key.transpose(2, 3))
    # mask (batch, 1, q, kv) -> (batch, 1, 1, q, kv) against scores (batch, kv_heads, group, q, kv).
    scores = scores.view(batch, kv_heads, group, q_len, kv_len) + mask.unsqueeze(2)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype)
    out = torch.matmul(probs.view(batch, kv_heads, group * q_len, kv_len), value)
    return out.view(batch, heads, q_len, -1)

"""Unpadded ("packed") forward passes for the encoder of a sentence-transformers pipeline.

sentence-transformers pads every text of a batch to the batch's longest, and the encoder's linear
layers, which are most of its work, then compute every padding position too. Here the texts'
real tokens are laid end to end in one row instead, each with its own position ids, so the
linear layers, layer norms and activations see only real tokens. Attention is the one step where
texts must not mix: it gathers each text's queries, keys and values into a padded
(texts, heads, longest, head_dim) block, runs one SDPA call with a key mask, and scatters the
result back. Pooling and normalization then run per text on the packed rows.

Measured with all-MiniLM-L6-v2 on 2 CPU cores, rounds of 32 of the benchmark's sentences (11-27
tokens, 18.6 on average): `encode` 113-124 ms a round, packed 99-100 ms (1.13-1.24x), the
vectors within 3e-8 of each other. Text-embeddings-inference does the same on GPUs with
variable-length flash attention.

Where it applies: a pipeline of [Transformer, Pooling (mean or CLS), Normalize (optional)] whose
encoder calls attention through transformers' attention-function registry (BERT and most
encoders in transformers 5) and accepts position ids. Anything else keeps sentence-transformers'
own padded `encode`, and so does a model whose packed vectors differ from `encode`'s on a check
run when it loads (a model with other position ids, for one): `PackedEncoder.build` says why.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

log = logging.getLogger(__name__)

__all__ = ["ATTENTION", "PackedEncoder"]

# The attention implementation packed encoders run with: SDPA, unless a packed pass is running.
ATTENTION = "glm_packed_sdpa"
# The keyword a packed pass hands every attention layer (transformers passes unknown keywords
# from the model's forward down to its attention functions).
_PACKING_KWARG = "glm_packing"
# Texts of different lengths the load-time check compares packed and padded vectors on.
_CHECK_TEXTS = (
    "hello",
    "The quick brown fox jumps over the lazy dog.",
    "你好，世界。今天天气很好。",
    " ".join(["sentence embeddings of different lengths"] * 6),
)
# The largest difference allowed between packed and padded vectors, by dtype: summation order
# differs (one row against a padded batch), nothing else.
_CHECK_ATOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}


@dataclass(frozen=True, slots=True)
class _Packing:
    """Where each text's tokens are in the packed row, for the attention layers."""

    # (texts, longest): the packed position of each text's j-th token (0 past its end).
    gather: torch.Tensor
    # (tokens,): where each packed token is in the flattened (texts * longest) block. An index
    # built once per pass: a boolean mask would cost a device-to-host sync in every layer.
    scatter: torch.Tensor
    # (texts, 1, 1, longest): the key mask of the padded block.
    key_mask: torch.Tensor


def _attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """SDPA; in a packed pass, SDPA over each text's own tokens (see the module docstring)."""
    packing: _Packing | None = kwargs.pop(_PACKING_KWARG, None)
    if packing is None:
        return sdpa_attention_forward(  # type: ignore[no-any-return]
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    # (1, heads, tokens, dim) -> (texts, heads, longest, dim)
    q, k, v = (t[0][:, packing.gather].transpose(0, 1) for t in (query, key, value))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=packing.key_mask, scale=scaling)
    # (texts, heads, longest, dim) -> (tokens, heads, dim) -> (1, tokens, heads, dim), the
    # layout attention functions return.
    texts, heads, longest, dim = out.shape
    block = out.transpose(1, 2).reshape(texts * longest, heads, dim)
    return block.index_select(0, packing.scatter).unsqueeze(0), None


AttentionInterface.register(ATTENTION, _attention)
AttentionMaskInterface.register(ATTENTION, sdpa_mask)


class PackedEncoder:
    """Embeds texts with one unpadded pass of a sentence-transformers pipeline's encoder."""

    def __init__(self, st: Any, pooling: str, normalize: bool) -> None:
        self._st = st
        self._encoder = st[0].auto_model
        self._pooling = pooling
        self._normalize = normalize

    @classmethod
    def build(cls, st: Any) -> tuple[PackedEncoder | None, str]:
        """A packed encoder for `st`, or None; and why not, or "" when it was built.

        Switches the encoder's attention to `ATTENTION`, which is SDPA outside packed passes, so
        `st.encode` gives what it gave before; the check runs under `torch.inference_mode`.
        """
        reason = _unsupported_reason(st)
        if reason:
            return None, reason
        encoder = st[0].auto_model
        try:
            encoder.set_attn_implementation(ATTENTION)
        except (ValueError, TypeError, NotImplementedError) as exc:
            return None, f"its encoder refuses another attention implementation ({exc})"
        if encoder.config._attn_implementation != ATTENTION:
            return None, "its encoder does not take another attention implementation"
        pooling = "cls" if _pooling_mode(st[1]) == "cls" else "mean"
        packed = cls(st, pooling, normalize=len(st) == 3)
        try:
            with torch.inference_mode():
                got = packed.encode(list(_CHECK_TEXTS))
                want = st.encode(
                    list(_CHECK_TEXTS),
                    batch_size=len(_CHECK_TEXTS),
                    convert_to_numpy=True,
                    show_progress_bar=False,
                )
        except Exception as exc:  # an encoder that will not run this way keeps `encode`
            reason = f"a packed pass failed ({type(exc).__name__}: {exc})"
        else:
            worst = float(np.max(np.abs(got - np.asarray(want, dtype=np.float32))))
            atol = _CHECK_ATOL.get(encoder.dtype, 1e-4)
            ok = worst <= atol
            reason = (
                "" if ok else f"packed vectors differ from padded ones by {worst:.2g} (> {atol:g})"
            )
        if reason:
            encoder.set_attn_implementation("sdpa")
            return None, reason
        return packed, ""

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """float32 (len(texts), dimensions), as the pipeline's `encode` would give them."""
        if not texts:
            return np.zeros((0, self._encoder.config.hidden_size), dtype=np.float32)
        # The pipeline's own tokenization (lower-casing, truncation, special tokens), padded;
        # the padding is then dropped.
        features = self._st.preprocess(list(texts))
        mask = features["attention_mask"].to(torch.bool)
        lengths = mask.sum(dim=1)
        # The packed position of every (text, j): real tokens in reading order.
        packed_at = (mask.flatten().cumsum(0) - 1).view(mask.shape).clamp(min=0)
        # Position ids restart at 0 for each text, wherever its padding is.
        positions = (mask.cumsum(dim=1) - 1)[mask]
        device = self._encoder.device
        inputs: dict[str, Any] = {
            "input_ids": features["input_ids"][mask].unsqueeze(0).to(device),
            "position_ids": positions.unsqueeze(0).to(device),
        }
        if "token_type_ids" in features:
            inputs["token_type_ids"] = features["token_type_ids"][mask].unsqueeze(0).to(device)
        valid = mask.to(device)
        gather = packed_at.to(device)
        scatter = mask.flatten().nonzero().flatten().to(device)
        inputs[_PACKING_KWARG] = _Packing(gather, scatter, valid[:, None, None, :])
        hidden = self._encoder(**inputs).last_hidden_state[0]  # (tokens, hidden)
        lengths = lengths.to(device)
        if self._pooling == "cls":
            starts = torch.cumsum(lengths, 0) - lengths
            pooled = hidden[starts].float()
        else:
            # Summed in float32 and in a fixed order per text (its padded row, padding zeroed):
            # half-precision sums lose digits, and scattered adds (index_add_ on a GPU) are
            # atomics whose order, and so whose result, changes from run to run.
            rows = hidden.float()[gather] * valid.unsqueeze(2)
            pooled = rows.sum(dim=1) / lengths.clamp(min=1).unsqueeze(1)
        if self._normalize:
            pooled = F.normalize(pooled, p=2, dim=1)
        return np.asarray(pooled.cpu().numpy(), dtype=np.float32)


def _pooling_mode(module: Any) -> str | None:
    """A Pooling module's one mode ("mean", "cls", ...), or None for several or none."""
    mode = getattr(module, "pooling_mode", None)
    if isinstance(mode, str):
        return mode
    if isinstance(mode, list | tuple) and len(mode) == 1 and isinstance(mode[0], str):
        return mode[0]
    return None


def _unsupported_reason(st: Any) -> str:
    """Why `st` cannot run packed passes, or "" when it may (the load-time check decides)."""
    from sentence_transformers.base.modules.normalize import Normalize
    from sentence_transformers.base.modules.transformer import Transformer
    from sentence_transformers.sentence_transformer.modules.pooling import Pooling

    modules = list(st)
    kinds = [type(m) for m in modules]
    if kinds not in ([Transformer, Pooling], [Transformer, Pooling, Normalize]):
        return "its modules are " + ", ".join(k.__name__ for k in kinds)
    if _pooling_mode(modules[1]) not in ("mean", "cls"):
        return f"its pooling is {getattr(modules[1], 'pooling_mode', None)!r}"
    encoder = getattr(modules[0], "auto_model", None)
    config = getattr(encoder, "config", None)
    if config is None or not hasattr(encoder, "set_attn_implementation"):
        return "its encoder is not a transformers model"
    if getattr(config, "is_decoder", False) or getattr(config, "is_encoder_decoder", False):
        return "its encoder is a decoder"
    if config._attn_implementation not in ("sdpa", ATTENTION):
        return f"its attention implementation is {config._attn_implementation!r}"
    if not hasattr(st, "preprocess"):
        return "this sentence-transformers has no preprocess"
    return ""

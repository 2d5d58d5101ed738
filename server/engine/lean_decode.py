"""A decode pass for Llama-family models in a few tensor operations per layer.

Why: the model's own forward goes through transformers' modules, its mask and cache machinery
and one linear call per projection: thousands of operator calls a pass, each costing dispatch time
whatever its size, and small linear calls that each read their weight on their own. This pass does
the same arithmetic with the same weights in fewer operations: q/k/v in one linear call and gate/up
in another (their weights laid end to end once, the model's own projections left as views of them,
so no memory is added), the rotary embedding applied to queries and keys together, the keys and
values written straight into the slots, and attention as `kv_slots` computes it in decode passes.

Same results: every operation is the one transformers runs, in the same order and on operands in
the same layout (RMSNorm in float32, `x * cos + rotate_half(x) * sin`, the decode attention of
`kv_slots`), so a row's bits are the model's own decode pass's, except where a BLAS gives a row
of a fused projection other last bits than the projection alone. `SlotBatch` checks the two
against each other on a prompt when it opens and keeps the model's forward where they differ more
than rounding.

Supported: decoder-only models with Llama's layer structure (Llama, Mistral without a sliding
window, Qwen2), all their weights on one device. Projections that are not plain `torch.nn.Linear`
layers (int8 weights) are called one by one instead of fused. Anything else keeps the model's own
forward; `build` says why.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from server.engine.attention import decode_attention
from server.models.int8_linear import VIEW_ALIGN, Int8Linear, Verdicts, concatenated

log = logging.getLogger(__name__)

__all__ = ["SUPPORTED", "LeanDecoder"]

# transformers classes whose decoder layers are Llama's: pre-norm RMSNorm, q/k/v/o projections
# (biases allowed), rotary embeddings by rotate_half, a SiLU-gated MLP.
SUPPORTED = frozenset({"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"})


@dataclass(frozen=True, slots=True)
class _Norm:
    """An RMSNorm's weight and epsilon."""

    weight: torch.Tensor
    eps: float

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # transformers' LlamaRMSNorm, operation for operation.
        dtype = x.dtype
        h = x.to(torch.float32)
        variance = h.pow(2).mean(-1, keepdim=True)
        h = h * torch.rsqrt(variance + self.eps)
        return self.weight * h.to(dtype)


@dataclass(frozen=True, slots=True)
class _Layer:
    """One decoder layer's parts, in the order a pass uses them."""

    attention_norm: _Norm
    qkv: torch.nn.Module
    o: torch.nn.Module
    mlp_norm: _Norm
    gate_up: torch.nn.Module
    down: torch.nn.Module
    act: Callable[[torch.Tensor], torch.Tensor]


def _norm(module: Any) -> _Norm | None:
    weight = getattr(module, "weight", None)
    eps = getattr(module, "variance_epsilon", None)
    if not isinstance(weight, torch.Tensor) or not isinstance(eps, float):
        return None
    return _Norm(weight, eps)


def _adjacent(weights: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """The one tensor `weights` are consecutive row blocks of (fused by an earlier build)."""
    first = weights[0]
    storage = first.untyped_storage().data_ptr()
    offset = first.storage_offset()
    for w in weights:
        if w.untyped_storage().data_ptr() != storage or w.storage_offset() != offset:
            return None
        if not w.is_contiguous():
            return None
        offset += w.numel()
    rows = sum(w.shape[0] for w in weights)
    return first.as_strided((rows, first.shape[1]), (first.shape[1], 1))


class _Side(torch.nn.Module):
    """Projections that cannot be fused (not plain linear layers), called one after another."""

    def __init__(self, parts: Sequence[torch.nn.Module]) -> None:
        super().__init__()
        self.parts = torch.nn.ModuleList(parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([part(x) for part in self.parts], dim=-1)


def _fused_or_side(modules: Sequence[Any], verdicts: Verdicts) -> torch.nn.Module | str:
    """`_fuse(modules)`, or int8 layers concatenated (their shapes' row-invariance verdicts kept
    in `verdicts`); projections of other types side by side."""
    if all(type(m) is torch.nn.Linear for m in modules):
        return _fuse(modules)
    if all(type(m) is Int8Linear for m in modules):
        joined = concatenated(modules, verdicts)
        if joined is not None:
            return joined
    if all(isinstance(m, torch.nn.Module) and callable(m) for m in modules):
        return _Side(modules)
    return "projections are not modules"


def _fuse(modules: Sequence[torch.nn.Linear]) -> torch.nn.Linear | str:
    """One linear layer computing `modules`' outputs side by side, or why there is none.

    The fused weight is the modules' weights laid end to end; each module's weight becomes a view
    of its block, so the memory is the same and the module computes as before.
    """
    weights = [m.weight for m in modules]
    first = weights[0]
    if any(
        w.dtype != first.dtype or w.device != first.device or w.shape[1] != first.shape[1]
        for w in weights
    ):
        return "projections differ in dtype, device or input size"
    if first.device.type == "meta":
        return "weights are not loaded (meta device)"
    biases = [m.bias for m in modules]
    if any(b is None for b in biases) != all(b is None for b in biases):
        return "some projections have a bias and some do not"
    row_bytes = first.shape[1] * first.element_size()
    offsets = [0]
    for w in weights[:-1]:
        offsets.append(offsets[-1] + w.shape[0] * row_bytes)
    if any(o % VIEW_ALIGN for o in offsets):
        return f"a projection's rows would not start {VIEW_ALIGN}-byte aligned in a fused weight"
    fused = _adjacent(weights)
    if fused is None:
        fused = torch.cat([w.detach() for w in weights])
        at = 0
        for m in modules:
            rows = m.weight.shape[0]
            m.weight = torch.nn.Parameter(fused[at : at + rows], requires_grad=False)
            at += rows
    layer = torch.nn.Linear(first.shape[1], fused.shape[0], bias=biases[0] is not None)
    layer.weight = torch.nn.Parameter(fused, requires_grad=False)
    if biases[0] is not None:
        layer.bias = torch.nn.Parameter(
            torch.cat([b.detach() for b in biases if b is not None]), requires_grad=False
        )
    return layer


class LeanDecoder(torch.nn.Module):
    """Decode passes of a Llama-family model over `kv_slots`' key/value memory.

    Its fused projections are `torch.nn.Linear` submodules, so the measured linear plans
    (server/engine/invariant_linear.py) can be chosen for and installed on them like the model's.
    """

    def __init__(self, causal_lm: Any, layers: list[_Layer], fused: list[torch.nn.Module]) -> None:
        super().__init__()
        base = causal_lm.get_decoder()
        self.fused = torch.nn.ModuleList(fused)
        self._layers = layers
        self._embed = base.embed_tokens
        self._rotary = base.rotary_emb
        self._final_norm: _Norm = _norm(base.norm)  # type: ignore[assignment]  # checked in build
        self._output = causal_lm.get_output_embeddings()
        config = causal_lm.config
        self._heads = int(config.num_attention_heads)
        self._kv_heads = int(getattr(config, "num_key_value_heads", None) or self._heads)
        self._head_dim = int(
            getattr(config, "head_dim", None) or int(config.hidden_size) // self._heads
        )
        self._scaling = float(base.layers[0].self_attn.scaling)

    @classmethod
    def build(cls, causal_lm: Any) -> LeanDecoder | str:
        """The decoder for `causal_lm`, or why it keeps the model's own forward."""
        name = type(causal_lm).__name__
        if name not in SUPPORTED:
            return f"{name} is not one of {', '.join(sorted(SUPPORTED))}"
        if (
            getattr(causal_lm, "hf_device_map", None)
            and len(set(causal_lm.hf_device_map.values())) > 1
        ):
            return "the model is split over several devices"
        base = causal_lm.get_decoder()
        for part in ("embed_tokens", "rotary_emb", "norm", "layers"):
            if not hasattr(base, part):
                return f"the decoder has no {part}"
        if _norm(base.norm) is None or causal_lm.get_output_embeddings() is None:
            return "the final norm or the output layer is not Llama's"
        layers: list[_Layer] = []
        fused: list[torch.nn.Module] = []
        verdicts: Verdicts = {}
        for decoder_layer in base.layers:
            attn, mlp = decoder_layer.self_attn, decoder_layer.mlp
            extra = [n for n in ("q_norm", "k_norm", "sinks") if hasattr(attn, n)]
            if extra:
                return f"attention has {', '.join(extra)}, which Llama's has not"
            attention_norm = _norm(decoder_layer.input_layernorm)
            mlp_norm = _norm(decoder_layer.post_attention_layernorm)
            if attention_norm is None or mlp_norm is None:
                return "a layer norm is not an RMSNorm"
            qkv = _fused_or_side([attn.q_proj, attn.k_proj, attn.v_proj], verdicts)
            if isinstance(qkv, str):
                return qkv
            gate_up = _fused_or_side([mlp.gate_proj, mlp.up_proj], verdicts)
            if isinstance(gate_up, str):
                return gate_up
            fused += [qkv, gate_up]
            parts = (attn.o_proj, mlp_norm, gate_up, mlp.down_proj, mlp.act_fn)
            layers.append(_Layer(attention_norm, qkv, *parts))
        return cls(causal_lm, layers, fused)

    def decode(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor,
        memory: Sequence[tuple[torch.Tensor, torch.Tensor]],
        rows_index: torch.Tensor,
    ) -> torch.Tensor:
        """Logits (rows, vocab) of one new token per row.

        ids, positions and rows_index: (rows, 1); mask: (rows, 1, 1, kv_len), additive; memory:
        each layer's (keys, values), (slots, kv_heads, length, head_dim), written at
        [rows_index, :, positions] and read over their first kv_len positions.
        """
        rows = ids.shape[0]
        kv_len = mask.shape[-1]
        heads, kv_heads, dim = self._heads, self._kv_heads, self._head_dim
        q_width, k_width = heads * dim, kv_heads * dim
        h = self._embed(ids.view(rows))
        cos, sin = self._rotary(h, positions)  # (rows, 1, dim): one position per row
        half = dim // 2
        # rotate_half(x) * sin == roll(x, half) * sin with the first half of sin negated (a sign
        # flip is exact), so queries and keys turn in three operations.
        sin_signed = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
        for layer, (keys, values) in zip(self._layers, memory, strict=True):
            residual = h
            qkv = layer.qkv(layer.attention_norm(h))
            qk = qkv[:, : q_width + k_width].view(rows, heads + kv_heads, dim)
            turned = qk * cos + torch.roll(qk, half, -1) * sin_signed
            k = turned[:, heads:]
            v = qkv[:, q_width + k_width :].view(rows, kv_heads, dim)
            keys[rows_index, :, positions] = k.unsqueeze(1)
            values[rows_index, :, positions] = v.unsqueeze(1)
            out = decode_attention(
                turned[:, :heads].unsqueeze(2),
                keys[:rows, :, :kv_len],
                values[:rows, :, :kv_len],
                mask,
                self._scaling,
            )
            h = residual + layer.o(out.reshape(rows, q_width))
            residual = h
            gate_up = layer.gate_up(layer.mlp_norm(h))
            width = gate_up.shape[-1] // 2
            h = residual + layer.down(layer.act(gate_up[:, :width]) * gate_up[:, width:])
        logits: torch.Tensor = self._output(self._final_norm(h))
        return logits.float()

"""int8 weight-only linear layers on the CPU (the `quantize = "int8"` model option).

Each linear layer's weight is stored as int8 with one scale per output row (symmetric, the row's
largest magnitude maps to 127), a quarter of float32's bytes, and multiplied by torch's own
`_weight_int8pack_mm` kernel. That kernel's float32 path is a slow reference loop on the CPUs
tried, so activations go through it in bfloat16 and come back in the model's dtype.

Batch invariance: the kernel computes each row of the input on its own (its result does not
depend on the other rows or their number); `quantize_linears` checks that on the model's own
layer shapes and, where it does not hold, the layer computes one row per call, which always does.
The server's measured plans (server/engine/invariant_linear.py) apply to `torch.nn.Linear`
layers only, so they leave these layers alone.

Accuracy: `logit_error` compares a model's logits with the float32 model's on a fixed prompt;
the loader logs the figure and refuses a quantized model beyond its tolerance.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

log = logging.getLogger(__name__)

__all__ = [
    "VIEW_ALIGN",
    "Int8Linear",
    "Verdicts",
    "concatenated",
    "logit_error",
    "quantize_linears",
]

_ACTIVATION = torch.bfloat16
# Rows the invariance check compares: one alone against the same row among many.
_PROBE_ROWS = (1, 3, 8, 61)


class Int8Linear(torch.nn.Module):
    """y = x @ (int8 weight * scale).T + bias, the weight quantized per output row."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.register_buffer(
            "qweight", torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8)
        )
        self.register_buffer("scales", scale.to(_ACTIVATION))
        bias = linear.bias
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.out_dtype = linear.weight.dtype
        # Set by `quantize_linears` where the kernel is not row-invariant for this shape.
        self.row_by_row = False

    def _mm(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = torch.ops.aten._weight_int8pack_mm(x, self.qweight, self.scales)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(_ACTIVATION).contiguous()
        if self.row_by_row and flat.shape[0] > 1:
            out = torch.cat([self._mm(flat[i : i + 1]) for i in range(flat.shape[0])])
        else:
            out = self._mm(flat)
        out = out.to(self.out_dtype)
        bias = self.bias
        if isinstance(bias, torch.Tensor):
            out = out + bias
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


# Byte alignment a layer's weight keeps where it becomes a view into a joined weight (here and in
# server/engine/lean_decode.py): a kernel may take another code path for a less aligned operand.
VIEW_ALIGN = 64
# Row invariance per weight shape (out, in): the kernel's verdict holds for every layer of a shape.
Verdicts = dict[tuple[int, int], bool]


def concatenated(
    parts: Sequence[Int8Linear], verdicts: Verdicts | None = None
) -> Int8Linear | None:
    """One int8 layer computing `parts`' outputs side by side (their weights end to end), or None
    where they differ in input size, dtype or bias, or a part's rows would start unaligned.

    Each part's weight, scales and bias become views of the new layer's, so no memory is added.
    Exact: the scales are per output row, so each part's rows keep their values. `verdicts`
    carries the row-invariance verdicts of shapes already checked (see `quantize_linears`).
    """
    first = parts[0]
    if any(
        p.in_features != first.in_features
        or p.out_dtype != first.out_dtype
        or (p.bias is None) != (first.bias is None)
        for p in parts
    ):
        return None
    if any(p.out_features * p.in_features % VIEW_ALIGN for p in parts[:-1]):
        return None
    layer = Int8Linear.__new__(Int8Linear)
    torch.nn.Module.__init__(layer)
    layer.in_features = first.in_features
    layer.out_features = sum(p.out_features for p in parts)
    layer.out_dtype = first.out_dtype
    qweight = torch.cat([_tensor(p.qweight) for p in parts])
    scales = torch.cat([_tensor(p.scales) for p in parts])
    biases = [p.bias for p in parts if isinstance(p.bias, torch.Tensor)]
    bias = torch.cat(biases) if biases else None
    layer.register_buffer("qweight", qweight)
    layer.register_buffer("scales", scales)
    layer.register_buffer("bias", bias)
    at = 0
    for p in parts:
        rows = p.out_features
        p.qweight = qweight[at : at + rows]
        p.scales = scales[at : at + rows]
        if bias is not None:
            p.bias = bias[at : at + rows]
        at += rows
    layer.row_by_row = not _row_invariant(layer, {} if verdicts is None else verdicts)
    return layer


def _tensor(value: object) -> torch.Tensor:
    assert isinstance(value, torch.Tensor)
    return value


def _row_invariant(layer: Int8Linear, verdicts: Verdicts) -> bool:
    """Whether a row of `layer`'s shape gets the same bits alone and among other rows (any count
    probed), checked once per shape in `verdicts`."""
    shape = (layer.out_features, layer.in_features)
    if shape not in verdicts:
        verdicts[shape] = _probe_rows(layer)
        if not verdicts[shape]:
            log.info("int8 layers of shape %s compute a row per call (invariance)", shape)
    return verdicts[shape]


def _probe_rows(layer: Int8Linear) -> bool:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(max(_PROBE_ROWS), layer.in_features, generator=generator).to(_ACTIVATION)
    alone = [layer._mm(x[i : i + 1].contiguous()) for i in range(max(_PROBE_ROWS))]
    for rows in _PROBE_ROWS[1:]:
        together = layer._mm(x[:rows].contiguous())
        if any(not torch.equal(together[i], alone[i][0]) for i in range(rows)):
            return False
    return True


def quantize_linears(model: torch.nn.Module, skip: Sequence[str] = ()) -> int:
    """Replace every `torch.nn.Linear` of a CPU model (but those named in `skip`) in place.

    Returns how many layers were replaced. Layers sharing a weight shape share the invariance
    verdict, checked once per shape.
    """
    verdicts: Verdicts = {}
    replaced = 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, torch.nn.Linear) or name in skip:
            continue
        if module.weight.device.type != "cpu":
            where = module.weight.device
            raise ValueError(f"int8 weights run on the CPU only; {name} is on {where}")
        layer = Int8Linear(module)
        layer.row_by_row = not _row_invariant(layer, verdicts)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer)
        replaced += 1
    return replaced


@torch.inference_mode()
def prompt_logits(model: torch.nn.Module, ids: Sequence[int]) -> torch.Tensor:
    """Every position's logits of `ids` in one plain forward pass (float32)."""
    out = model(input_ids=torch.tensor([list(ids)]), use_cache=False)
    logits: torch.Tensor = out.logits[0].float()
    return logits


def logit_error(reference: torch.Tensor, logits: torch.Tensor) -> tuple[float, float]:
    """(largest absolute difference over the reference's logit range, share of top-1 agreement)."""
    spread = (reference.amax(dim=-1) - reference.amin(dim=-1)).clamp(min=1e-6)
    error = ((logits - reference).abs().amax(dim=-1) / spread).max().item()
    agree = (logits.argmax(dim=-1) == reference.argmax(dim=-1)).float().mean().item()
    return float(error), float(agree)

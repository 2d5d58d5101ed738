"""Key/value slots: sequences of different lengths decoded together by a transformers causal LM.

Layout. Each attention layer keeps one key and one value tensor of shape (rows, kv_heads, length,
head_dim). A sequence owns one row, its *slot*, for its whole life, and the keys and values of its
token at position p live at [slot, :, p]. A decode pass feeds one token for each row 0..P-1 and
attends over the first `kv_len` positions of those rows; a prefill pass feeds a chunk of one
sequence's prompt in its own row, or (a shared prefill pass) a chunk of each of several
sequences in one row of the pass, each token written to its own slot. The caller's 4-D additive
attention mask says, per row, which positions hold that row's tokens (transformers models use a
caller's 4-D mask as it is), and the position ids say where each new token is, so rows of
different lengths need no shifting. On a GPU (server/engine/device_profile.py) a prompt chunk
takes no mask: its attention is a causal kernel over exactly its slot's positions so far.

Why not `DynamicCache` with left padding: it cannot take a new sequence into a running batch or
drop one without rebuilding every layer's tensors, and shifting a sequence changes the attention's
summation order, hence its greedy output. Why not transformers' own continuous batching
(transformers.generation.continuous_batching, with its paged cache): it packs every step's tokens,
prefill chunks and decode tokens alike, into one ragged row whose shape depends on the load, and
it samples with one shared random generator and only per-request temperature/top-k/top-p;
per-request seeds, repetition penalties, stop strings and load-independent greedy output would all
have to be rebuilt around it. What is reused here: transformers' `Cache` interface (the models
call `cache.update` per layer), its 4-D mask passthrough, its attention-function registry, and
SDPA attention for prefill passes.

Batch invariance: a request's greedy output must not depend on what else runs, so every
computation a row goes through gives bit-identical results whatever the other rows are:
- Linear layers: a BLAS takes other code paths for other row counts, with other last bits, so
  small passes go through every linear layer in calls whose sizes all give a row the same bits,
  with the operand order that is fastest there (server/engine/invariant_linear.py, measured per
  weight shape on the model's own weights when the batch is opened).
- Attention: PyTorch's fused CPU attention gives a row different last bits depending on the batch
  size and on the thread that computes it, so decode passes use `_attention` (plain matrix
  products and a softmax, per row and head); keys are padded with masked positions up to a
  multiple of KV_BLOCK, so other rows' lengths only add exact zeros to a row's sums.
- Prefill: chunks' boundaries depend only on their prompt (server/engine/scheduler.py). A chunk
  shares a pass only when it is at least `shared_prefill_min_tokens` long and the pass holds at
  most `shared_prefill_max_tokens`: the range of pass sizes over which the linear layers give a
  row the same bits whatever the size (probed when the batch is opened). Its attention is one
  SDPA call over its own slot, with the shapes and mask (or, on a GPU, the causal kernel) it has
  alone. So a chunk is computed the same way alone or shared, whatever else runs.
A seeded sampled request is reproducible in a batch for the same reason.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from server.engine.attention import decode_attention
from server.engine.batching import SequenceBatch
from server.engine.compiled_decode import KERNELS as COMPILED_KERNELS
from server.engine.compiled_decode import CompiledDecode, why_not_compiled
from server.engine.device_profile import DeviceProfile, available_bytes, profile_for
from server.engine.invariant_linear import (
    LinearPlan,
    ShapeKey,
    choose_plans,
    install,
    shared_pass_window,
)
from server.engine.lean_decode import LeanDecoder
from server.errors import ResourceExhaustedError

log = logging.getLogger(__name__)

__all__ = ["KV_BLOCK", "KVMemoryError", "KVSlotCache", "SlotBatch", "unsupported_reason"]

# Keys are attended over in multiples of this many positions (see "Batch invariance" above).
KV_BLOCK = 64
# Memory grows by whole multiples of this many positions, so that it is rarely reallocated.
_GROW = 256
# Where free device memory is checked (a GPU): the share of it the key/value cache may take when
# it grows; the rest is left to the activations of the passes.
_KV_SHARE = 0.9
_GIB = 1 << 30
# The prompt the lean decode pass is checked on (token ids every vocabulary has), and how far its
# logits may be from the model's forward's, as a share of their range: (half, full precision).
_CHECK_PROMPT = tuple(range(1, 33))
_LEAN_TOLERANCE = {False: 2e-2, True: 1e-4}


class KVMemoryError(ResourceExhaustedError):
    """The key/value cache cannot grow: its device has too little free memory left."""


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


@dataclass(slots=True)
class _Plan:
    """Where the next forward pass reads and writes: rows [first, first + rows), or `slots`."""

    first: int
    rows: int
    # (rows, q): the position of each new token; writes go to [first + r, :, positions[r, i]].
    # A shared prefill pass: (1, tokens), and token i goes to [slots[i], :, positions[0, i]].
    positions: torch.Tensor
    # How many positions of each row the attention reads (a multiple of KV_BLOCK).
    kv_len: int
    # A shared prefill pass: each token's slot (its attention reads its own slot's keys).
    slots: tuple[int, ...] | None = None
    # The index tensors on each device that holds layers (several GPUs: several devices).
    _on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def indices(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Row numbers and positions on `device`, shaped alike, for advanced indexing."""
        found = self._on.get(device)
        if found is None:
            if self.slots is not None:
                rows = torch.tensor(self.slots, device=device).unsqueeze(0)
            else:
                rows = torch.arange(self.first, self.first + self.rows, device=device)
                rows = rows.unsqueeze(1)
            found = self._on[device] = (rows, self.positions.to(device))
        return found


@dataclass(frozen=True, slots=True)
class _Segment:
    """One prompt chunk in a shared prefill pass: the pass's tokens [start, end), in `slot`."""

    start: int
    end: int
    slot: int
    kv_len: int
    # (1, 1, end - start, kv_len): the additive mask the chunk has when it runs alone; None: no
    # mask, a causal kernel over the slot's first kv_len positions (see `_causal_attention`).
    mask: torch.Tensor | None


# The attention implementation SlotBatch gives the model: SDPA, except in decode passes.
ATTENTION = "kv_slots_sdpa"


def _causal_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    dropout: float = 0.0,
    scaling: float | None = None,
) -> torch.Tensor:
    """A prompt chunk's attention with no materialized mask, in the layout attention returns.

    The chunk's queries are the last of the keys' positions (`key` holds exactly the positions up
    to the chunk's end), so the causal pattern is aligned to the lower right; when the chunk is the
    whole prompt so far, it is the plain causal one, which flash attention takes. Key/value head
    groups are passed as they are (`enable_gqa`), not repeated for every query head.
    """
    q_len, kv_len = query.shape[2], key.shape[2]
    gqa = query.shape[1] != key.shape[1]
    if q_len == kv_len:
        out = F.scaled_dot_product_attention(
            query, key, value, dropout_p=dropout, is_causal=True, scale=scaling, enable_gqa=gqa
        )
    else:
        bias = causal_lower_right(q_len, kv_len)
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=bias, dropout_p=dropout, scale=scaling, enable_gqa=gqa
        )
    return out.transpose(1, 2).contiguous()


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
    """Attention with results that do not depend on the batch, for decode passes.

    PyTorch's fused CPU attention gives a row slightly different results depending on the batch
    size and on which thread computes it, so decode passes (`kv_slots_decode=True`, passed through
    the model's keyword arguments) use plain matrix products and a softmax instead; every other
    call goes to transformers' SDPA attention unchanged.
    """
    segments: Sequence[_Segment] | None = kwargs.pop("kv_slots_segments", None)
    if segments is not None:
        # A shared prefill pass: each chunk attends over its own slot exactly as it would alone
        # (same query, key and mask shapes and values, so the same bits); `key` and `value` are
        # every slot's memory.
        parts = []
        for s in segments:
            q = query[:, :, s.start : s.end]
            k = key[s.slot : s.slot + 1, :, : s.kv_len]
            v = value[s.slot : s.slot + 1, :, : s.kv_len]
            if s.mask is None:
                parts.append(_causal_attention(q, k, v, dropout, scaling))
            else:
                mask = s.mask.to(query.device)
                parts.append(
                    sdpa_attention_forward(
                        module, q, k, v, mask, dropout=dropout, scaling=scaling, **kwargs
                    )[0]
                )
        return torch.cat(parts, dim=1), None
    if kwargs.pop("kv_slots_causal", False):
        # A chunk alone without a mask: `key` and `value` end where the chunk ends.
        return _causal_attention(query, key, value, dropout, scaling), None
    if not kwargs.pop("kv_slots_decode", False):
        return sdpa_attention_forward(  # type: ignore[no-any-return]
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    assert attention_mask is not None
    out = decode_attention(query, key, value, attention_mask, scaling)
    # (batch, heads, q, dim) -> (batch, q, heads, dim), the layout attention functions return.
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION, _attention)
AttentionMaskInterface.register(ATTENTION, sdpa_mask)


class _SlotLayer(CacheLayerMixin):  # type: ignore[misc]  # transformers is untyped here
    """One attention layer's keys and values for every slot."""

    is_sliding = False

    def __init__(self, owner: KVSlotCache) -> None:
        super().__init__()
        self._owner = owner

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        rows, length = self._owner.capacity
        heads = key_states.shape[1]
        self.device = key_states.device
        # Zeros, not empty memory: a masked position gets weight exactly 0, and 0 * NaN would not
        # be 0. Positions that held an earlier sequence keep finite values, which is as good.
        self.keys = key_states.new_zeros((rows, heads, length, key_states.shape[-1]))
        self.values = value_states.new_zeros((rows, heads, length, value_states.shape[-1]))
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        plan = self._owner.plan
        rows, positions = plan.indices(self.keys.device)
        # Indexed by (rows, 1) and (rows, q) around a slice, the target is (rows, q, heads, dim).
        self.keys[rows, :, positions] = key_states.transpose(1, 2)
        self.values[rows, :, positions] = value_states.transpose(1, 2)
        if plan.slots is not None:
            return self.keys, self.values  # `_attention` reads each chunk's slot
        # Views, not copies: the rows of a pass are always one contiguous range.
        end = plan.first + plan.rows
        return (
            self.keys[plan.first : end, :, : plan.kv_len],
            self.values[plan.first : end, :, : plan.kv_len],
        )

    def resize(self, rows: int, length: int) -> None:
        """Reallocate to (rows, length), keeping what fits."""
        if not self.is_initialized:
            return
        keep_rows, keep_len = min(rows, self.keys.shape[0]), min(length, self.keys.shape[2])
        for name in ("keys", "values"):
            old: torch.Tensor = getattr(self, name)
            new = old.new_zeros((rows, old.shape[1], length, old.shape[3]))
            new[:keep_rows, :, :keep_len] = old[:keep_rows, :, :keep_len]
            setattr(self, name, new)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self._owner.plan.kv_len, 0

    def get_seq_length(self) -> int:
        return self._owner.plan.kv_len

    def get_max_length(self) -> int:
        return self._owner.capacity[1]


class KVSlotCache(Cache):  # type: ignore[misc]  # transformers is untyped here
    """A transformers `Cache` whose rows are independent sequences at their own positions.

    Set `plan` before each forward pass. Memory is allocated on the first pass (on each layer's
    device), grown by `reserve` and given back by `shrink` and `clear`.

    With `checked` (a GPU), `reserve` first checks that each device has the memory: the cache may
    take `_KV_SHARE` of what is available there, and grows at least twofold when that fits.
    `position_bytes` is one position of one row in one layer (keys and values), `layer_devices`
    where each layer's memory lives, and `free_memory` tells what a device has available.
    """

    def __init__(
        self,
        num_layers: int,
        *,
        checked: bool = False,
        position_bytes: int = 0,
        layer_devices: Sequence[torch.device] = (),
        free_memory: Callable[[torch.device], int | None] | None = None,
    ) -> None:
        super().__init__(layers=[_SlotLayer(self) for _ in range(num_layers)])
        self.capacity = (0, 0)
        self.plan = _Plan(0, 0, torch.zeros(0, 0, dtype=torch.long), 0)
        self._checked = checked
        self._position_bytes = position_bytes
        self._layers_on: dict[torch.device, int] = {}
        for device in layer_devices:
            self._layers_on[device] = self._layers_on.get(device, 0) + 1
        self._free_memory = free_memory

    def _layers(self) -> Iterator[_SlotLayer]:
        for layer in self.layers:
            assert isinstance(layer, _SlotLayer)
            yield layer

    def slot_layers(self) -> list[_SlotLayer]:
        """Every attention layer's memory, in order."""
        return list(self._layers())

    def reserve(self, rows: int, length: int) -> None:
        """Make room for `rows` rows of `length` positions (grows, never shrinks).

        Raises KVMemoryError, holding what it held, when a checked device lacks the memory.
        """
        have_rows, have_len = self.capacity
        if rows <= have_rows and length <= have_len:
            return
        rows, length = max(rows, have_rows), max(_round_up(length, _GROW), have_len)
        if self._checked and self._layers_on:
            doubled = 2 * have_len
            if doubled > length and self._shortfall(rows, doubled) is None:
                length = doubled
            short = self._shortfall(rows, length)
            if short is not None:
                raise KVMemoryError(
                    f"the key/value cache cannot grow to {rows} sequences of {length} positions: "
                    f"{short}; fewer concurrent sequences (max_concurrent) or shorter contexts "
                    "(context_length) need less"
                )
        self._resize(rows, length)

    def _shortfall(self, rows: int, length: int) -> str | None:
        """What a device lacks to hold (rows, length) in every layer; None when all have it."""
        have_rows, have_len = self.capacity
        for device, layers in self._layers_on.items():
            available = (self._free_memory or available_bytes)(device)
            if available is None:
                continue
            new = layers * self._position_bytes * rows * length
            held = layers * self._position_bytes * have_rows * have_len
            # Each layer is copied into its new memory before its old memory goes: the last
            # layer's old copy is still held when all the new memory is.
            extra = new - held + held // layers
            if extra > _KV_SHARE * available:
                return (
                    f"{device} has {available / _GIB:.2f} GiB available and it would take "
                    f"{extra / _GIB:.2f} GiB more"
                )
        return None

    def shrink(self, rows: int, length: int) -> None:
        """Give memory back when less than half of it is still needed."""
        have_rows, have_len = self.capacity
        length = _round_up(max(length, 1), _GROW)
        if rows * length * 2 <= have_rows * have_len:
            self._resize(rows, length)

    def clear(self) -> None:
        """Drop all memory (no sequence is left)."""
        for layer in self._layers():
            layer.keys = layer.values = None  # type: ignore[assignment]
            layer.is_initialized = False
        self.capacity = (0, 0)

    def _resize(self, rows: int, length: int) -> None:
        for layer in self._layers():
            layer.resize(rows, length)
        self.capacity = (rows, length)

    @property
    def layers_on(self) -> dict[torch.device, int]:
        """How many layers keep their keys and values on each device."""
        return dict(self._layers_on)

    @property
    def nbytes(self) -> int:
        """Bytes held by keys and values (safe to read from any thread)."""
        total = 0
        for layer in self._layers():
            keys, values = layer.keys, layer.values
            if keys is not None and values is not None:
                total += keys.nbytes + values.nbytes
        return total


def unsupported_reason(causal_lm: Any) -> str | None:
    """Why `causal_lm` cannot be decoded in slots, or None when it can."""
    config = getattr(causal_lm, "config", None)
    if config is None or not callable(causal_lm):
        return f"{type(causal_lm).__name__} is not a transformers model"
    if getattr(config, "is_encoder_decoder", False):
        return "encoder-decoder models are not supported"
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    implementation = getattr(config, "_attn_implementation", None)
    if implementation not in ("sdpa", "eager", ATTENTION):
        # Flash and paged kernels take no 4-D mask.
        return f"attention implementation {implementation!r} takes no 4-D attention mask"
    layer_types = getattr(text, "layer_types", None)
    if layer_types is not None:
        other = sorted({t for t in layer_types if t != "full_attention"})
        if other:
            # A 4-D mask would be used as is for sliding-window layers too, and linear-attention
            # layers keep state that slots do not hold.
            return f"layer types {other} are not supported"
    elif getattr(text, "sliding_window", None) is not None:
        return "sliding-window attention is not supported"
    return None


class SlotBatch(SequenceBatch):
    """Sequences in the slots of a `KVSlotCache`, advanced by batched forward passes."""

    def __init__(
        self,
        causal_lm: Any,
        device: torch.device,
        max_sequences: int,
        max_pass_tokens: int = 0,
        profile: DeviceProfile | None = None,
        lean_decode: bool = True,
        compile_decode: bool = False,
    ) -> None:
        super().__init__(max_sequences)
        self._lm = causal_lm
        self._device = device
        self._profile = profile_for(device) if profile is None else profile
        config = causal_lm.config
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        self._dtype: torch.dtype = causal_lm.dtype
        if config._attn_implementation == "sdpa":
            # Eager attention is batch-invariant as it is; SDPA is swapped for `_attention`, which
            # is SDPA except in decode passes. The model's other users see no difference.
            causal_lm.set_attn_implementation(ATTENTION)
            if config._attn_implementation != ATTENTION:
                log.warning(
                    "%s keeps SDPA attention in decode passes; greedy output may differ in rare "
                    "near-ties between a lone and a batched run",
                    type(causal_lm).__name__,
                )
        # Only `_attention` knows how to run a chunk without its mask.
        self._masked_prefill = (
            self._profile.masked_prefill or config._attn_implementation != ATTENTION
        )
        layers = int(text.num_hidden_layers)
        self._cache = KVSlotCache(
            layers,
            checked=self._profile.kv_memory_checked,
            position_bytes=_position_bytes(text, self._dtype),
            layer_devices=_layer_devices(causal_lm, layers, device),
        )
        # Where transformers picks the kept positions out of the last hidden states: the last
        # device of a model split over several.
        self._hidden_device = _hidden_states_device(causal_lm, device)
        # Decode passes in few operations (server/engine/lean_decode.py): only where decode
        # attention is `_attention`'s, which the lean pass computes the same way.
        self._lean: LeanDecoder | None = None
        if lean_decode and config._attn_implementation == ATTENTION:
            built = LeanDecoder.build(causal_lm)
            if isinstance(built, str):
                log.info("decode passes: the model's own forward (%s)", built)
            else:
                self._lean = built
        why_not = (
            "only the lean pass compiles"
            if self._lean is None
            else why_not_compiled(self._lean, device)
        )
        compiling = compile_decode and why_not is None
        self._linear_plans = choose_plans(
            causal_lm,
            max_sequences,
            max_pass_tokens,
            extra=self._lean,
            kernels=COMPILED_KERNELS if compiling else None,
        )
        install(causal_lm, self._linear_plans)
        if self._lean is not None:
            install(self._lean, self._linear_plans)
        # Chunks share a pass only where both their linear layers (probed) and their attention
        # (`_attention`, one call per chunk) give the bits they have alone.
        self._shared: tuple[int, int] | None = None
        if config._attn_implementation == ATTENTION:
            self._shared = shared_pass_window(causal_lm, self._linear_plans, max_pass_tokens)
        # Tokens held by each row.
        self._lengths = [0] * max_sequences
        self._rows = 0
        # The lean pass compiled per row bucket (server/engine/compiled_decode.py).
        self._compiled: CompiledDecode | None = None
        if self._lean is not None:
            self._check_lean()
        if compile_decode:
            if self._lean is not None and why_not is None:
                self._compile()
            else:
                log.info("decode passes: not compiled (%s)", why_not or "the lean pass is off")

    def _check_lean(self) -> None:
        """Keep the lean decode pass only where it gives the model's own decode logits.

        Both passes decode the same token after the same prompt, in slot 0 (then freed); they
        may differ by rounding where a fused projection's BLAS call sums in another order.
        """
        lean, self._lean = self._lean, None
        assert lean is not None
        try:
            self.prefill(0, _CHECK_PROMPT)
            own = self._decode_again({0: _CHECK_PROMPT[-1]})[0]
            self._lean = lean
            fast = self.decode({0: _CHECK_PROMPT[-1]})[0]
        finally:
            self.release(0)
        error, tolerance = _range_error(own, fast), self._tolerance
        if not error <= tolerance:
            self._lean = None
            log.warning(
                "decode passes: the model's own forward (the lean pass's logits differ from it by "
                "%.2g of their range, more than %.0g)",
                error,
                tolerance,
            )
            return
        log.info(
            "decode passes: lean, %d of %d projection groups fused (logits within %.2g of the "
            "model's forward's range)",
            sum(isinstance(m, torch.nn.Linear) for m in lean.fused),
            len(lean.fused),
            error,
        )

    def _compile(self) -> None:
        """Compile the lean pass for every row bucket, and keep it only where a row's logits are
        the same bits in every bucket and within rounding of the eager pass's.

        Every slot holds a prompt of its own; row 0 decodes the same token in each bucket, with
        the other rows decoding theirs. Compilation happens here, before any request comes.
        """
        lean = self._lean
        assert lean is not None
        width = len(_CHECK_PROMPT)
        prompts = {s: tuple(range(1 + s, 1 + s + width)) for s in range(self.max_sequences)}
        started = time.perf_counter()
        try:
            for slot, ids in prompts.items():
                self.prefill(slot, ids)
            eager = self._decode_again({0: prompts[0][-1]})[0]
            compiled = CompiledDecode(lean, self.max_sequences)
            self._compiled = compiled
            by_bucket = {
                size: self._decode_again({s: prompts[s][-1] for s in range(size)})[0]
                for size in compiled.buckets
            }
            compiled.freeze()
        except Exception as exc:  # any failure to compile leaves the eager pass, which works
            self._compiled = None
            log.warning("decode passes: lean, not compiled (%s)", _first_line(exc))
            return
        finally:
            for slot in prompts:
                self.release(slot)
        seconds = time.perf_counter() - started
        alone = by_bucket[1]
        differ = [size for size, logits in by_bucket.items() if not torch.equal(logits, alone)]
        error, tolerance = _range_error(eager, alone), self._tolerance
        if differ:
            self._compiled = None
            log.warning(
                "decode passes: lean, not compiled (a row's logits change in passes of %s rows)",
                ", ".join(map(str, differ)),
            )
        elif not error <= tolerance:
            self._compiled = None
            log.warning(
                "decode passes: lean, not compiled (the compiled pass's logits differ from the "
                "eager pass's by %.2g of their range, more than %.0g)",
                error,
                tolerance,
            )
        else:
            log.info(
                "decode passes: compiled for %s rows in %.1f s (logits within %.2g of the eager "
                "pass's range)",
                ", ".join(map(str, compiled.buckets)),
                seconds,
                error,
            )

    def _decode_again(self, tokens: Mapping[int, int]) -> Mapping[int, torch.Tensor]:
        """A decode pass that leaves the sequences as they were (it is repeated after this)."""
        out = self.decode(tokens)
        for slot in tokens:
            self._lengths[slot] -= 1
        return out

    @property
    def _tolerance(self) -> float:
        """How far (`_range_error`) a faster decode pass's logits may be from the reference's."""
        return _LEAN_TOLERANCE[self._dtype in (torch.float32, torch.float64)]

    @property
    def compiled(self) -> bool:
        """Whether decode passes run the compiled lean pass (server/engine/compiled_decode.py)."""
        return self._compiled is not None

    @property
    def lean(self) -> bool:
        """Whether decode passes run the lean pass (server/engine/lean_decode.py)."""
        return self._lean is not None

    @property
    def decode_rows(self) -> int:
        return self._rows

    @property
    def shared_prefill_min_tokens(self) -> int | None:
        return None if self._shared is None else self._shared[0]

    @property
    def shared_prefill_max_tokens(self) -> int | None:
        return None if self._shared is None else self._shared[1]

    @property
    def linear_plans(self) -> dict[ShapeKey, LinearPlan]:
        """How the linear layers run small passes (bench.decode_profile prints them)."""
        return self._linear_plans

    @property
    def cache(self) -> KVSlotCache:
        """The key/value memory."""
        return self._cache

    @property
    def profile(self) -> DeviceProfile:
        """The device-dependent choices this batch runs with."""
        return self._profile

    @property
    def hidden_states_device(self) -> torch.device:
        """Where the kept logits' positions go (the device of the model's last hidden states)."""
        return self._hidden_device

    @property
    def cache_bytes(self) -> int:
        return self._cache.nbytes

    def _mask(self, visible: torch.Tensor) -> torch.Tensor:
        """The additive mask SDPA and eager attention both take: 0 where visible, else -max."""
        mask = torch.zeros(visible.shape, dtype=self._dtype, device=self._device)
        return mask.masked_fill_(~visible, torch.finfo(self._dtype).min)

    def _run(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        keep: int | torch.Tensor = 1,
        **attention: Any,
    ) -> torch.Tensor:
        out = self._lm(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            cache=self._cache,
            use_cache=True,
            # Only a sequence's last position's logits are ever sampled: the last one (1), or
            # the last of each chunk of a shared pass (their indices).
            logits_to_keep=keep,
            **attention,
        )
        self.forward_passes += 1
        logits: torch.Tensor = out.logits[:, -1] if isinstance(keep, int) else out.logits[0]
        # Spread over several GPUs, the logits come out on the last one.
        return logits.to(self._device, torch.float32)

    def _chunk(
        self, slot: int, token_ids: Sequence[int]
    ) -> tuple[torch.Tensor, int, torch.Tensor | None]:
        """(positions (q,), kv_len, mask (1, 1, q, kv_len)) of a chunk appended to `slot`.

        Without masked prefill the mask is None and kv_len the chunk's end: a causal kernel
        reads exactly the positions up to it.
        """
        start = self._lengths[slot]
        end = start + len(token_ids)
        positions = torch.arange(start, end, device=self._device)
        if not self._masked_prefill:
            return positions, end, None
        kv_len = _round_up(end, KV_BLOCK)
        keys = torch.arange(kv_len, device=self._device)
        # Causal within the chunk, and everything before it: query i sees keys 0..start+i.
        visible = keys.unsqueeze(0) <= positions.unsqueeze(1)
        return positions, kv_len, self._mask(visible)[None, None]

    @torch.inference_mode()
    def prefill(self, slot: int, token_ids: Sequence[int]) -> torch.Tensor:
        positions, kv_len, mask = self._chunk(slot, token_ids)
        self._cache.reserve(slot + 1, kv_len)
        self._cache.plan = _Plan(slot, 1, positions[None], kv_len)
        ids = torch.tensor([list(token_ids)], dtype=torch.long, device=self._device)
        if mask is None:
            # The mask argument only passes through to `_attention`, which uses none here.
            logits = self._run(
                ids, self._placeholder(len(token_ids)), positions[None], kv_slots_causal=True
            )
        else:
            logits = self._run(ids, mask, positions[None], kv_slots_decode=False)
        self._lengths[slot] += len(token_ids)
        return logits[0]

    @torch.inference_mode()
    def prefill_shared(self, chunks: Sequence[tuple[int, Sequence[int]]]) -> list[torch.Tensor]:
        if len(chunks) < 2 or self._shared is None:
            return super().prefill_shared(chunks)  # each alone
        shared_min, shared_max = self._shared
        if len({slot for slot, _ in chunks}) != len(chunks):
            raise ValueError("a shared prefill pass takes one chunk per slot")
        if (
            len(chunks) > self.max_sequences
            or min(len(ids) for _, ids in chunks) < shared_min
            or sum(len(ids) for _, ids in chunks) > shared_max
        ):
            raise ValueError(
                f"a shared prefill pass takes at most {self.max_sequences} chunks of at least "
                f"{shared_min} tokens each, {shared_max} tokens in all"
            )
        segments: list[_Segment] = []
        slots: list[int] = []
        all_positions: list[torch.Tensor] = []
        start = 0
        for slot, chunk in chunks:
            positions, kv_len, mask = self._chunk(slot, chunk)
            segments.append(_Segment(start, start + len(chunk), slot, kv_len, mask))
            slots += [slot] * len(chunk)
            all_positions.append(positions)
            start += len(chunk)
        self._cache.reserve(max(slots) + 1, max(s.kv_len for s in segments))
        positions = torch.cat(all_positions)[None]
        self._cache.plan = _Plan(0, 0, positions, 0, slots=tuple(slots))
        fed = torch.tensor([[t for _, chunk in chunks for t in chunk]], device=self._device)
        last = torch.tensor([s.end - 1 for s in segments], device=self._hidden_device)
        # The mask argument is only passed through to `_attention`, which uses each segment's.
        logits = self._run(
            fed, self._placeholder(start), positions, last, kv_slots_segments=segments
        )
        for slot, chunk in chunks:
            self._lengths[slot] += len(chunk)
        return list(logits)

    def _placeholder(self, tokens: int) -> torch.Tensor:
        """A 4-D mask argument that transformers passes through as it is (never read)."""
        return torch.zeros((1, 1, tokens, 1), dtype=self._dtype, device=self._device)

    @torch.inference_mode()
    def decode(self, tokens: Mapping[int, int]) -> Mapping[int, torch.Tensor]:
        if not tokens:
            return {}
        rows = max(tokens) + 1
        if self._compiled is not None:
            rows = self._compiled.bucket(rows)
        # Rows without a token (free, or still in prefill) are padding: they write one scratch
        # position at their sequence's end, which that sequence overwrites before it reads it,
        # and they attend to that position only.
        lengths = self._lengths[:rows]
        kv_len = _round_up(max(lengths) + 1, KV_BLOCK)
        self._cache.reserve(rows, kv_len)
        # Each row's (token, position, real) in one transfer to the device.
        host = torch.tensor(
            [(tokens.get(r, 0), lengths[r], r in tokens) for r in range(rows)], dtype=torch.long
        )
        table = host.to(self._device)
        ids, positions = table[:, 0:1].contiguous(), table[:, 1:2].contiguous()
        real = table[:, 2:3].bool()
        keys = torch.arange(kv_len, device=self._device).unsqueeze(0)
        visible = (keys <= positions) & (real | (keys == positions))
        self._cache.plan = _Plan(0, rows, positions, kv_len)
        mask = self._mask(visible)[:, None, None, :]
        if self._lean is not None and all(m.is_initialized for m in self._cache.slot_layers()):
            rows_index = torch.arange(rows, device=self._device).unsqueeze(1)
            if self._compiled is not None:
                logits = self._decode_compiled(self._compiled, ids, positions, mask, rows_index)
            else:
                memory = [(layer.keys, layer.values) for layer in self._cache.slot_layers()]
                logits = self._lean.decode(ids, positions, mask, memory, rows_index)
            self.forward_passes += 1
        else:
            logits = self._run(ids, mask, positions, kv_slots_decode=True)
        self._rows = rows
        for slot in tokens:
            self._lengths[slot] += 1
        return {slot: logits[slot] for slot in tokens}

    def _decode_compiled(
        self,
        compiled: CompiledDecode,
        ids: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor,
        rows_index: torch.Tensor,
    ) -> torch.Tensor:
        rows = ids.shape[0]
        # The pass's rows only: a graph's shapes hold its bucket's rows, whatever the capacity.
        memory = [(layer.keys[:rows], layer.values[:rows]) for layer in self._cache.slot_layers()]
        try:
            return compiled(ids, positions, mask, memory, rows_index)
        except Exception as exc:  # the eager pass rewrites the same positions, so it can retry
            if not compiled.frozen:
                raise  # still compiling: `_compile` reports it
            self._compiled = None
            log.warning(
                "decode passes: the compiled pass failed (%s); they run eagerly from now on",
                _first_line(exc),
            )
            return compiled.eager(ids, positions, mask, memory, rows_index)

    @property
    def copies_prefixes(self) -> bool:
        return True

    @torch.inference_mode()
    def copy_out(self, slot: int, start: int, end: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if not 0 <= start < end <= self._lengths[slot]:
            raise ValueError(f"slot {slot} holds {self._lengths[slot]} positions, not {end}")
        return [
            (layer.keys[slot, :, start:end].clone(), layer.values[slot, :, start:end].clone())
            for layer in self._cache.slot_layers()
        ]

    @torch.inference_mode()
    def copy_in(self, slot: int, parts: Sequence[list[tuple[torch.Tensor, torch.Tensor]]]) -> int:
        if self._lengths[slot]:
            raise ValueError(f"slot {slot} is not empty")
        length = sum(part[0][0].shape[1] for part in parts)
        self._cache.reserve(slot + 1, _round_up(length, KV_BLOCK))
        at = 0
        for part in parts:
            size = part[0][0].shape[1]
            for layer, (keys, values) in zip(self._cache.slot_layers(), part, strict=True):
                if not layer.is_initialized:
                    layer.lazy_initialization(keys[None], values[None])
                layer.keys[slot, :, at : at + size] = keys
                layer.values[slot, :, at : at + size] = values
            at += size
        self._lengths[slot] = length
        return length

    def release(self, slot: int) -> None:
        self._lengths[slot] = 0
        used = [i for i, n in enumerate(self._lengths) if n]
        if not used:
            self._cache.clear()
            return
        self._cache.shrink(max(used) + 1, _round_up(max(self._lengths), KV_BLOCK))


def _position_bytes(text_config: Any, dtype: torch.dtype) -> int:
    """Bytes of keys and values one position takes in one layer of one row."""
    heads = int(text_config.num_attention_heads)
    kv_heads = int(getattr(text_config, "num_key_value_heads", None) or heads)
    head_dim = getattr(text_config, "head_dim", None) or int(text_config.hidden_size) // heads
    return 2 * kv_heads * int(head_dim) * torch.empty((), dtype=dtype).element_size()


def _module_device(module: torch.nn.Module) -> torch.device | None:
    """Where `module` computes by itself: accelerate's execution device, else its weights'."""
    hook = getattr(module, "_hf_hook", None)
    execution = getattr(hook, "execution_device", None)
    if execution is not None:
        return (
            torch.device("cuda", execution)
            if isinstance(execution, int)
            else torch.device(execution)
        )
    for parameter in module.parameters():
        if parameter.device.type != "meta":
            return parameter.device
    return None


def _mapped(causal_lm: Any, name: str, default: torch.device) -> torch.device | None:
    """The device accelerate's `hf_device_map` gives module `name` (or the part holding it)."""
    device_map = getattr(causal_lm, "hf_device_map", None)
    if not isinstance(device_map, Mapping):
        return None
    for prefix in sorted(device_map, key=len, reverse=True):
        if not prefix or name == prefix or name.startswith(prefix + "."):
            where = device_map[prefix]
            if isinstance(where, int):
                return torch.device("cuda", where)
            # Offloaded weights ("disk", "cpu" beside GPUs) run on the main device.
            return default if where in ("disk", "cpu") else torch.device(where)
    return None


def _located(causal_lm: Any, module: torch.nn.Module, default: torch.device) -> torch.device:
    """Where `module` of `causal_lm` computes: its dispatch hook's device, else the device map's,
    else its weights'."""
    hook = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
    if hook is None:
        name = next((n for n, m in causal_lm.named_modules() if m is module), None)
        mapped = None if name is None else _mapped(causal_lm, name, default)
        if mapped is not None:
            return mapped
    return _module_device(module) or default


def _decoder_layers(causal_lm: Any) -> list[torch.nn.Module]:
    base = causal_lm.get_decoder() if hasattr(causal_lm, "get_decoder") else None
    layers = getattr(base, "layers", None)
    return list(layers) if isinstance(layers, torch.nn.ModuleList) else []


def _layer_devices(causal_lm: Any, count: int, default: torch.device) -> list[torch.device]:
    """The device of each attention layer's keys and values (the layer's own)."""
    layers = _decoder_layers(causal_lm)
    if len(layers) != count:
        return [default] * count
    return [_located(causal_lm, layer, default) for layer in layers]


def _hidden_states_device(causal_lm: Any, default: torch.device) -> torch.device:
    """Where the base model's last hidden states are: where its final norm computes.

    transformers applies a tensor `logits_to_keep` to those hidden states before the output
    layer, so the index must be there: on a model split over several GPUs, the last one.
    """
    base = causal_lm.get_decoder() if hasattr(causal_lm, "get_decoder") else None
    norm = getattr(base, "norm", None)
    if isinstance(norm, torch.nn.Module):
        return _located(causal_lm, norm, default)
    output = (
        causal_lm.get_output_embeddings() if hasattr(causal_lm, "get_output_embeddings") else None
    )
    if isinstance(output, torch.nn.Module):
        return _located(causal_lm, output, default)
    return default


def _range_error(reference: torch.Tensor, other: torch.Tensor) -> float:
    """The largest difference between `other` and `reference`, as a share of reference's range."""
    spread = float(reference.max() - reference.min()) or 1.0
    return float((reference - other).abs().max()) / spread


def _first_line(exc: BaseException) -> str:
    """An exception in one line (compiler errors run to pages)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__

"""The model side of continuous batching: sequences in slots, extended by prefill and decode steps.

The scheduler (server/engine/scheduler.py) decides what runs when; a `SequenceBatch` runs it. Two
implementations:

- `SlotBatch` (server/engine/kv_slots.py), for every model whose `ChatModel.causal_lm` is a
  transformers causal LM: one forward pass decodes every running sequence.
- `ForwardLoopBatch` (here), for any other `ChatModel`: each sequence keeps the cache `forward`
  returns and a decode step calls `forward` once per sequence. Correct but unbatched; it keeps
  models that expose no `causal_lm` working under the same scheduler.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from server.models.base import ChatModel, KVCache

__all__ = ["ForwardLoopBatch", "SequenceBatch"]


class SequenceBatch(ABC):
    """Key/value memory for up to `max_sequences` sequences, each in a slot 0..max_sequences-1.

    All methods are called from the scheduler thread only. Slot numbers are chosen by the caller
    (the lowest free one, so that the occupied slots stay dense); a slot's sequence grows by
    `prefill` and `decode` and is forgotten by `release`.
    """

    def __init__(self, max_sequences: int) -> None:
        self.max_sequences = max_sequences
        # Forward passes run so far: how the tests and metrics see that the batch is shared.
        self.forward_passes = 0

    @abstractmethod
    def prefill(self, slot: int, token_ids: Sequence[int]) -> torch.Tensor:
        """Append `token_ids` to the sequence in `slot` (empty: a new one) in one forward pass.

        Returns the float32 logits of the token after the last one (1-D, vocabulary-sized).
        """

    @property
    def shared_prefill_min_tokens(self) -> int | None:
        """The fewest tokens a prompt chunk needs to share a prefill pass (None: never shared).

        A chunk this long gets the same results in a shared pass as alone, so sharing cannot
        change any reply.
        """
        return None

    @property
    def shared_prefill_max_tokens(self) -> int | None:
        """The most tokens a shared prefill pass may hold (None: no shared passes)."""
        return None

    def prefill_shared(self, chunks: Sequence[tuple[int, Sequence[int]]]) -> list[torch.Tensor]:
        """`prefill` of one chunk for each of several slots ([(slot, token_ids)]), in order.

        Where chunks can share a pass (all at least `shared_prefill_min_tokens` long, at most
        `shared_prefill_max_tokens` together), one pass feeds them all; here, as a fallback, each
        runs alone. Returns each chunk's logits.
        """
        return [self.prefill(slot, ids) for slot, ids in chunks]

    @abstractmethod
    def decode(self, tokens: Mapping[int, int]) -> Mapping[int, torch.Tensor]:
        """Append one token to each listed slot ({slot: token}); return each slot's next logits."""

    @abstractmethod
    def release(self, slot: int) -> None:
        """Forget the sequence in `slot` and give back the memory it no longer needs."""

    @property
    def decode_rows(self) -> int:
        """Rows the last `decode` computed, padding included (the batch size of that pass)."""
        return 0

    @property
    def copies_prefixes(self) -> bool:
        """Whether `copy_out` and `copy_in` work (a prefix cache can serve this batch)."""
        return False

    def copy_out(self, slot: int, start: int, end: int) -> Any:
        """A copy of the keys and values of positions [start, end) of the sequence in `slot`."""
        raise NotImplementedError

    def copy_in(self, slot: int, parts: Sequence[Any]) -> int:
        """Start the empty `slot` with `copy_out` results laid end to end; returns its length."""
        raise NotImplementedError

    @property
    def cache_bytes(self) -> int | None:
        """Bytes of key/value memory held now (None: not known)."""
        return None


class ForwardLoopBatch(SequenceBatch):
    """Any ChatModel, through `forward`: one pass per sequence per step, no shared batch."""

    def __init__(self, model: ChatModel, max_sequences: int) -> None:
        super().__init__(max_sequences)
        self._model = model
        self._caches: dict[int, KVCache | None] = {}
        self._rows = 0

    def prefill(self, slot: int, token_ids: Sequence[int]) -> torch.Tensor:
        logits, self._caches[slot] = self._model.forward(token_ids, self._caches.get(slot))
        self.forward_passes += 1
        return logits

    def decode(self, tokens: Mapping[int, int]) -> Mapping[int, torch.Tensor]:
        out: dict[int, torch.Tensor] = {}
        for slot, token in tokens.items():
            out[slot], self._caches[slot] = self._model.forward([token], self._caches[slot])
            self.forward_passes += 1
        self._rows = len(tokens)  # one-row passes, one per sequence
        return out

    def release(self, slot: int) -> None:
        self._caches.pop(slot, None)

    @property
    def decode_rows(self) -> int:
        return self._rows

"""A prefix cache: the keys and values of prompt chunks already computed, reused by later prompts.

The scheduler feeds every prompt in chunks whose boundaries are fixed multiples of the chunk size
from the prompt's start, and a chunk's keys and values are the same bits whether it ran alone or
in a shared pass (server/engine/scheduler.py, "Batch invariance" in server/engine/kv_slots.py).
So the keys and values of chunk j depend only on the prompt's tokens up to the chunk's end: a
later prompt that starts with the same chunks gets bit-identical keys and values by copying them,
and its greedy output is the same as without the cache.

Blocks. A block is one chunk of a prompt: [j * chunk, min((j + 1) * chunk, len(prompt))). Its key
chains its parent's key with its own tokens (a hash chain), so a key names the whole prefix up to
the block's end. A short last block (a prompt's tail) matches only a prompt with the same tail at
the same place, i.e. the same prompt; a whole block matches every prompt that starts with the
same chunks. Each block also keeps the logits after its last token, so a prompt found whole
needs no prefill pass at all. Keys and values computed by decode passes are never cached: a
decode pass computes a token in other shapes than a prompt chunk does, with other last bits.

Memory. Blocks are evicted least recently used first within `budget_bytes`, leaves before their
parents (a block whose parent is gone can never be found again). All methods run on the
scheduler thread, except `stats`, which any thread may read.
"""

from __future__ import annotations

import hashlib
import threading
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Block", "PrefixCache", "PrefixCacheStats"]


@dataclass(slots=True)
class Block:
    """One cached chunk: its tokens, keys and values (batch-defined layout) and next logits."""

    key: bytes
    parent: bytes | None
    tokens: tuple[int, ...]
    kv: Any
    logits: torch.Tensor
    nbytes: int
    children: int = 0


@dataclass(frozen=True, slots=True)
class PrefixCacheStats:
    """What the prefix cache holds and has saved since it started."""

    # Prompts that found at least one block, and the prompt tokens those blocks saved.
    hits: int
    tokens_saved: int
    # Prompts looked up that found nothing.
    misses: int
    blocks: int
    bytes: int
    budget_bytes: int


def block_keys(prompt: Sequence[int], chunk: int) -> list[tuple[bytes, int, int]]:
    """[(key, start, end)] of each block of `prompt`: chunks of `chunk` tokens from its start."""
    keys: list[tuple[bytes, int, int]] = []
    parent = b""
    for start in range(0, len(prompt), chunk):
        end = min(len(prompt), start + chunk)
        digest = hashlib.blake2b(parent, digest_size=16)
        digest.update(array("q", prompt[start:end]).tobytes())
        parent = digest.digest()
        keys.append((parent, start, end))
    return keys


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.nbytes
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0


class PrefixCache:
    """Blocks of prompt keys and values by content, LRU within `budget_bytes`."""

    def __init__(self, budget_bytes: int, chunk: int) -> None:
        if chunk <= 0:
            raise ValueError("chunk must be positive")
        self.budget_bytes = budget_bytes
        self.chunk = chunk
        self._blocks: OrderedDict[bytes, Block] = OrderedDict()
        self._bytes = 0
        self._hits = self._misses = self._saved = 0
        self._lock = threading.Lock()  # guards the counters `stats` reads from other threads

    def lookup(self, prompt: Sequence[int]) -> list[Block]:
        """The longest run of cached blocks the prompt starts with (counted as a hit or miss)."""
        found: list[Block] = []
        for key, start, end in block_keys(prompt, self.chunk):
            block = self._blocks.get(key)
            # The tokens are compared too: a matching hash alone is not proof.
            if block is None or block.tokens != tuple(prompt[start:end]):
                break
            found.append(block)
        # Parents are touched last, so they stay more recent than their children.
        for block in reversed(found):
            self._blocks.move_to_end(block.key)
        with self._lock:
            if found:
                self._hits += 1
                self._saved += sum(len(b.tokens) for b in found)
            else:
                self._misses += 1
        return found

    def wants(self, key: bytes, parent: bytes | None) -> bool:
        """Whether a block with `key` under `parent` would be stored (absent, parent present)."""
        if self.budget_bytes <= 0 or key in self._blocks:
            return False
        return parent is None or parent in self._blocks

    def touch(self, key: bytes) -> None:
        """Mark the block `key` (if held) as just used."""
        if key in self._blocks:
            self._blocks.move_to_end(key)

    def insert(
        self,
        key: bytes,
        parent: bytes | None,
        tokens: Sequence[int],
        kv: Any,
        logits: torch.Tensor,
    ) -> bool:
        """Store one block (see `wants`); False when it is not stored."""
        if not self.wants(key, parent):
            self.touch(key)
            return False
        size = _nbytes(kv) + logits.nbytes
        if size > self.budget_bytes:
            return False
        while self._bytes + size > self.budget_bytes:
            if not self._evict_one(keep=parent):
                return False
        block = Block(key, parent, tuple(tokens), kv, logits, size)
        self._blocks[key] = block
        if parent is not None:
            self._blocks[parent].children += 1
        with self._lock:
            self._bytes += size
        return True

    def _evict_one(self, keep: bytes | None) -> bool:
        """Drop the least recently used block that has no children (never `keep`)."""
        for key, block in self._blocks.items():
            if block.children == 0 and key != keep:
                del self._blocks[key]
                if block.parent is not None and block.parent in self._blocks:
                    self._blocks[block.parent].children -= 1
                with self._lock:
                    self._bytes -= block.nbytes
                return True
        return False

    def clear(self) -> None:
        """Drop every block."""
        self._blocks.clear()
        with self._lock:
            self._bytes = 0

    @property
    def stats(self) -> PrefixCacheStats:
        with self._lock:
            return PrefixCacheStats(
                hits=self._hits,
                tokens_saved=self._saved,
                misses=self._misses,
                blocks=len(self._blocks),
                bytes=self._bytes,
                budget_bytes=self.budget_bytes,
            )

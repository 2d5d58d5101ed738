"""Embedding models that sentence-transformers loads (a folder with modules.json, or a Hub id)."""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from server.config import ModelSpec
from server.domain import Tokenization
from server.models.base import EmbeddingModel
from server.models.sources import resolve_device, resolve_dtype, resolve_source

log = logging.getLogger(__name__)


class SentenceTransformerModel(EmbeddingModel):
    """A sentence-transformers model; vectors come back as the model makes them (raw)."""

    def __init__(self, spec: ModelSpec, cache_dir: Any = None) -> None:
        from sentence_transformers import SentenceTransformer

        self._spec = spec
        self._device = resolve_device(spec)
        dtype = resolve_dtype(spec, self._device)
        self._st = SentenceTransformer(resolve_source(spec), device=str(self._device))
        if dtype != torch.float32:
            self._st = self._st.to(dtype)
        self._st.eval()
        own_max = int(self._st.max_seq_length or 512)
        self._max_input = min(spec.max_input_tokens or own_max, own_max)
        self._st.max_seq_length = self._max_input
        self._context = spec.context_length or own_max
        dims = self._st.get_embedding_dimension()
        if not dims:
            raise ValueError(f"model {spec.id!r} does not report its embedding dimension")
        self._dims = int(dims)
        # Fast tokenizers are not safe to call from two threads at once ("Already borrowed"), so
        # Tokenize and token counting use their own copy and never wait for a forward pass.
        self._encode_lock = threading.Lock()
        self._tokenizer = copy.deepcopy(self._st.tokenizer)
        self._tokenizer_lock = threading.Lock()
        log.info(
            "loaded embedding model %s from %s on %s (%s, %d dimensions, max %d tokens)",
            spec.id,
            spec.source,
            self._device,
            dtype,
            self._dims,
            self._max_input,
        )

    @property
    def max_input_tokens(self) -> int:
        return self._max_input

    @property
    def context_length(self) -> int:
        return self._context

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dimensions(self) -> int:
        return self._dims

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        with self._encode_lock, torch.inference_mode():
            vectors = self._st.encode(
                list(texts),
                batch_size=max(1, len(texts)),
                convert_to_numpy=True,
                normalize_embeddings=False,
                show_progress_bar=False,
            )
        return np.asarray(vectors, dtype=np.float32)

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        with self._tokenizer_lock:
            encoded = self._tokenizer(
                list(texts), truncation=True, max_length=self._max_input, add_special_tokens=True
            )
        return [len(ids) for ids in encoded["input_ids"]]

    def tokenize(self, text: str, max_tokens: int) -> Tokenization:
        with self._tokenizer_lock:
            ids = self._tokenizer(text, add_special_tokens=True)["input_ids"]
            pieces = self._tokenizer.tokenize(text)
        return Tokenization(
            token_ids=tuple(int(i) for i in ids[:max_tokens]),
            tokens=tuple(str(p) for p in pieces),
            truncated=len(ids) > max_tokens,
        )

    def warmup(self) -> None:
        self.encode(["warm up"])

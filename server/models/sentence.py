"""Embedding models that sentence-transformers runs.

A sentence-transformers checkpoint (modules.json: text2vec-base-chinese-paraphrase, MiniLM, ...)
loads as it describes itself. A plain transformers encoder without those files (BERT, e.g.
text2vec-large-chinese) is assembled here as text2vec's own SentenceModel runs it: the encoder,
then the mean of the token vectors over the attention mask, inputs cut at 256 tokens, vectors not
normalized. (sentence-transformers would guess the same pooling but not the 256-token limit.)
"""

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
from server.models.packed_encoder import PackedEncoder
from server.models.sources import resolve_device, resolve_dtype, resolve_source

log = logging.getLogger(__name__)

# text2vec's SentenceModel cuts inputs at 256 tokens; plain encoder folders get the same default.
PLAIN_ENCODER_MAX_TOKENS = 256
# Tokens kept beyond max_input_tokens when a long text is cut before `encode` (see `clip`): the
# tokenizer then sees the same text around the last token the model reads as in the whole text,
# so it splits it the same way.
CLIP_MARGIN_TOKENS = 16


def _has_modules_json(source: str) -> bool:
    """Whether `source` (a folder or a Hub id) is a sentence-transformers checkpoint."""
    from sentence_transformers.util import load_file_path

    try:
        return load_file_path(source, "modules.json") is not None
    except Exception:  # offline, no such repo, ...: let sentence-transformers report it
        log.debug("could not look for modules.json in %s", source, exc_info=True)
        return True


def _plain_encoder(source: str, spec: ModelSpec, device: torch.device) -> Any:
    """A SentenceTransformer of a plain encoder: the encoder, then mask-aware mean pooling."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

    encoder = Transformer(source)
    # Never past the position embeddings, whatever max_input_tokens asks for.
    positions = int(getattr(encoder.auto_model.config, "max_position_embeddings", 0) or 0)
    wanted = spec.max_input_tokens or PLAIN_ENCODER_MAX_TOKENS
    encoder.max_seq_length = min(wanted, positions) if positions else wanted
    pooling = Pooling(encoder.get_embedding_dimension(), pooling_mode="mean")
    return SentenceTransformer(modules=[encoder, pooling], device=str(device))


class SentenceTransformerModel(EmbeddingModel):
    """A sentence-transformers model; vectors come back as the model makes them (raw)."""

    def __init__(self, spec: ModelSpec, cache_dir: Any = None) -> None:
        from sentence_transformers import SentenceTransformer

        self._spec = spec
        self._device = resolve_device(spec)
        dtype = resolve_dtype(spec, self._device)
        source = resolve_source(spec)
        if _has_modules_json(source):
            self._st = SentenceTransformer(source, device=str(self._device))
        else:
            self._st = _plain_encoder(source, spec, self._device)
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
        # Batches without padding where the pipeline allows (server/models/packed_encoder.py).
        self._packed, not_packed = (
            PackedEncoder.build(self._st) if spec.unpadded else (None, "unpadded = false")
        )
        log.info(
            "loaded embedding model %s from %s on %s (%s, %d dimensions, max %d tokens; %s)",
            spec.id,
            spec.source,
            self._device,
            dtype,
            self._dims,
            self._max_input,
            "batches unpadded" if self._packed is not None else f"batches padded: {not_packed}",
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

    @property
    def pads_batches(self) -> bool:
        return self._packed is None

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        with self._encode_lock, torch.inference_mode():
            if self._packed is not None:
                return self._packed.encode(texts)
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

    def clip(self, texts: Sequence[str]) -> tuple[list[int], list[str]]:
        with self._tokenizer_lock:
            encoded = self._tokenizer(
                list(texts),
                add_special_tokens=True,
                return_offsets_mapping=True,
                return_attention_mask=False,
                return_token_type_ids=False,
                # Long texts are expected here: no warning that the model cannot take them.
                verbose=False,
            )
        counts: list[int] = []
        clipped: list[str] = []
        cut = self._max_input + CLIP_MARGIN_TOKENS
        for text, ids, offsets in zip(
            texts, encoded["input_ids"], encoded["offset_mapping"], strict=True
        ):
            counts.append(min(len(ids), self._max_input))
            # Only a token followed by others: the last ones may be special (no offsets).
            clipped.append(text[: offsets[cut][1]] if len(ids) > cut + 1 else text)
        return counts, clipped

    def tokenize(self, text: str, max_tokens: int) -> Tokenization:
        with self._tokenizer_lock:
            ids = self._tokenizer(text, add_special_tokens=True)["input_ids"]
            pieces = self._tokenizer.tokenize(text)
        return Tokenization(
            token_ids=tuple(int(i) for i in ids[:max_tokens]),
            tokens=tuple(str(p) for p in pieces[:max_tokens]),
            truncated=len(ids) > max_tokens,
        )

    def warmup(self) -> None:
        self.encode(["warm up"])

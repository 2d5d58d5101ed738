"""Builds the model object a spec describes."""

from __future__ import annotations

from pathlib import Path

from server.config import ModelSpec
from server.domain import ModelKind
from server.models.base import Model


def load_model(spec: ModelSpec, cache_dir: Path) -> Model:
    """Load the weights of `spec` (blocking; seconds to minutes)."""
    if spec.kind is ModelKind.CHAT:
        from server.models.chatglm3.weights import is_chatglm3

        if is_chatglm3(spec):
            # ChatGLM3's remote code does not run on current transformers: load it natively.
            from server.models.chatglm3.model import ChatGLM3Model

            return ChatGLM3Model(spec, cache_dir)
        from server.models.causal_lm import TransformersChatModel

        return TransformersChatModel(spec, cache_dir)
    from server.models.sentence import SentenceTransformerModel

    return SentenceTransformerModel(spec, cache_dir)

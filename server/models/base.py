"""The interfaces the engines program against; one implementation per model family.

Model methods are blocking and may take seconds: the engines call them from worker threads, never
from the event loop. Implementations are safe to call from several threads at once for inference.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import torch

from server.domain import ChatMessage, FunctionCall, ModelKind, Tokenization, ToolSpec

# A model's key/value cache for one sequence; opaque to the engine.
KVCache = Any


class TokenDecoder(Protocol):
    """The part of a tokenizer that turns ids back into text."""

    def decode(self, token_ids: list[int], skip_special_tokens: bool = ...) -> str:
        """Decode ids into text."""
        ...


class Model(ABC):
    """What every served model offers: identity, limits and a tokenizer."""

    kind: ModelKind

    @property
    @abstractmethod
    def max_input_tokens(self) -> int:
        """The longest input the model accepts, in tokens."""

    @property
    @abstractmethod
    def context_length(self) -> int:
        """The model's context window, in tokens."""

    @property
    @abstractmethod
    def device(self) -> torch.device:
        """Where the model's weights are."""

    @abstractmethod
    def tokenize(self, text: str, max_tokens: int) -> Tokenization:
        """Split `text` the legacy API's way: ids with special prefix tokens, pieces without."""

    @abstractmethod
    def warmup(self) -> None:
        """Run one tiny request so that the first real one pays no one-time costs."""


class ChatModel(Model):
    """A causal language model that continues a chat prompt one token at a time."""

    kind = ModelKind.CHAT

    @property
    @abstractmethod
    def decoder(self) -> TokenDecoder:
        """The tokenizer used to turn generated ids into text."""

    @property
    @abstractmethod
    def stop_token_ids(self) -> frozenset[int]:
        """Ids that end a reply (end of sequence, end of turn)."""

    @abstractmethod
    def build_prompt(
        self, messages: Sequence[ChatMessage], tools: Sequence[ToolSpec] = ()
    ) -> list[int]:
        """The token ids of the conversation, ending where the assistant's reply begins.

        `tools` are offered to the model; only called with tools when `supports_tools` is true.
        """

    @abstractmethod
    def forward(
        self, input_ids: Sequence[int], cache: KVCache | None
    ) -> tuple[torch.Tensor, KVCache]:
        """Feed new tokens after those in `cache` (None: a new sequence).

        Returns the float32 logits of the next token (1-D, vocabulary-sized) and the updated cache.
        """

    def encode_text(self, text: str) -> list[int]:
        """The ids of `text` continued as it is, without a chat template: what `tokenize` gives,
        special prefix tokens included (OpenAI's completions route)."""
        return list(self.tokenize(text, 2**31 - 1).token_ids)

    @property
    def supports_tools(self) -> bool:
        """Whether the model has a tool format: requests may offer tools and get tool calls."""
        return False

    def parse_tool_call(self, reply: str, tools: Sequence[ToolSpec]) -> FunctionCall | None:
        """The tool call a whole reply makes, or None when it is plain text."""
        return None

    @property
    def causal_lm(self) -> torch.nn.Module | None:
        """The transformers causal LM (a `...ForCausalLM` module) behind `forward`, if any.

        With it, the chat engine decodes all running sequences together, one forward pass per
        token (server/engine/kv_slots.py calls it with input ids, a 4-D attention mask, position
        ids and its own `Cache`). None (the default): each sequence steps alone through `forward`.
        """
        return None


class EmbeddingModel(Model):
    """A model that turns texts into fixed-size vectors."""

    kind = ModelKind.EMBEDDING

    @property
    @abstractmethod
    def dimensions(self) -> int:
        """The length of every vector."""

    @abstractmethod
    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embed `texts` in one or more forward passes; returns float32 (len(texts), dimensions)."""

    @property
    def pads_batches(self) -> bool:
        """Whether `encode` computes every text of a call as long as the call's longest.

        True (the default) makes a round of short and long texts worth cutting into passes of
        similar lengths; a model that batches without padding says False, and its rounds are
        cut into as few passes as the limits allow.
        """
        return True

    @abstractmethod
    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """The tokens each text takes after truncation to max_input_tokens."""

    def clip(self, texts: Sequence[str]) -> tuple[list[int], list[str]]:
        """count_tokens(texts), and the texts cut to little more than what `encode` reads.

        `encode` truncates a text to max_input_tokens, but tokenizes all of it first; given the
        cut texts it tokenizes only what it keeps, with the same result. This runs on a worker
        thread while `encode` runs on the chat scheduler's (server/engine/embed.py), where a
        long text tokenized whole would hold every chat sequence up. The default keeps the
        texts whole.
        """
        return self.count_tokens(texts), list(texts)

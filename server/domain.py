"""Domain types shared by the service, engine and model layers.

They carry no gRPC or torch types, so each layer converts at its own edge: the service layer from
and to protobuf, the model layer from and to tensors.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


class Role(enum.StrEnum):
    """The author of a chat turn."""

    SYSTEM = "system"
    USER = "user"
    ASSISTANT = "assistant"
    OBSERVATION = "observation"


class ModelKind(enum.StrEnum):
    """What a model does; the values are the `object` strings of the legacy /models route."""

    CHAT = "chat.completion"
    EMBEDDING = "embedding"


class FinishReason(enum.StrEnum):
    """Why a generation ended."""

    STOP = "stop"
    LENGTH = "length"
    FUNCTION_CALL = "function_call"


@dataclass(frozen=True, slots=True)
class FunctionCall:
    """A call of a tool: its name and its arguments as the text of a JSON object."""

    name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """A tool offered to the model: name, description and JSON Schema parameters."""

    name: str
    description: str = ""
    parameters: Mapping[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """The tool in OpenAI's function form, as models' tool prompts print it."""
        return {
            "name": self.name,
            "description": self.description,
            "parameters": dict(self.parameters),
        }


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """One turn of a conversation."""

    role: Role
    content: str
    # The tool call an assistant turn made instead of answering in text.
    function_call: FunctionCall | None = None


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick each next token. Defaults are the legacy API's (temperature 0.7, top_p 1.0)."""

    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    # None: as many tokens as the model's limits allow.
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()

    @property
    def greedy(self) -> bool:
        """Whether decoding is deterministic argmax (temperature 0)."""
        return self.temperature == 0.0


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """A validated request for one assistant reply."""

    model: str
    messages: tuple[ChatMessage, ...]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    tools: tuple[ToolSpec, ...] = ()
    # A text continued as it is, without the chat template (OpenAI's completions); messages are
    # then empty.
    prompt: str | None = None
    # A max_tokens beyond the model's limits caps the reply there instead of being refused (the
    # legacy routes, as the legacy API did).
    cap_max_tokens: bool = False


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts of one call."""

    prompt_tokens: int
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        """Prompt and completion tokens together."""
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, slots=True)
class GenerationEvent:
    """A piece of generated text; the last event of a generation has finish_reason and usage."""

    text: str
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    # Set on the last event when the reply is a tool call (finish_reason FUNCTION_CALL).
    function_call: FunctionCall | None = None


@dataclass(frozen=True, slots=True)
class Tokenization:
    """A text as token ids (special prefix tokens included) and as the tokenizer's pieces."""

    token_ids: tuple[int, ...]
    tokens: tuple[str, ...]
    truncated: bool


@dataclass(frozen=True, slots=True)
class ModelLimits:
    """Per-model limits that are enforced and published in ListModels."""

    # The longest input: the templated chat prompt, or one embedding prompt (longer ones truncate).
    max_input_tokens: int
    # The model's context window (prompt and generated tokens together).
    context_length: int
    # Chat only: the most tokens generated for one request.
    max_new_tokens: int = 0
    # Embedding only: the most prompts one Embed call may carry.
    max_batch_prompts: int = 0
    # The most characters of text one request may carry (checked before tokenizing).
    max_input_chars: int = 0


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What ListModels says about one model."""

    id: str
    kind: ModelKind
    owned_by: str
    created: int
    limits: ModelLimits
    ready: bool
    default: bool
    dimensions: int = 0
    # Other names the model answers to (the models config's `aliases`).
    aliases: tuple[str, ...] = ()

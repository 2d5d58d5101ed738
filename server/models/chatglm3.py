"""ChatGLM3 (e.g. ChatGLM3-6B-32k) served by transformers' native GlmForCausalLM.

ChatGLM3's own remote code fails on every current transformers release, so nothing of it is used:
the weights are mapped onto GlmForCausalLM (server/models/chatglm3_weights.py), the SentencePiece
tokenizer and the prompt format are implemented here (chatglm3_tokenizer.py, chatglm3_prompt.py),
and tool calls are parsed without eval (chatglm3_tools.py).

Devices: one GPU (float16 unless configured), the CPU (float32 or bfloat16; slow but it works), or,
with device = "auto" on a machine with several GPUs, the layers split over all of them by
accelerate's device_map="auto" (transformers places each layer and moves activations between GPUs;
input ids go to the GPU holding the embeddings).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from server.config import ModelSpec
from server.domain import ChatMessage, FunctionCall, Role, Tokenization, ToolSpec
from server.models.base import ChatModel, KVCache, TokenDecoder
from server.models.chatglm3_prompt import PromptMessage, build_prompt_ids
from server.models.chatglm3_tokenizer import ChatGLM3Tokenizer
from server.models.chatglm3_tools import format_tool_call, try_parse_tool_call
from server.models.chatglm3_weights import converted_chatglm3, local_checkpoint
from server.models.sources import ModelLoadError, resolve_device, resolve_dtype

log = logging.getLogger(__name__)

__all__ = ["ChatGLM3Model", "to_prompt_message"]


def to_prompt_message(message: ChatMessage) -> PromptMessage:
    """A domain message as ChatGLM3 sees it.

    An assistant turn whose text is a tool call ("NAME\\n```python ...```", as this server returns
    it) goes back with the name as metadata, the form ChatGLM3 was trained on.
    """
    if message.role is Role.ASSISTANT and message.function_call is not None:
        call = message.function_call
        metadata, content = format_tool_call(call.name, json.loads(call.arguments))
        return PromptMessage("assistant", content, metadata=metadata)
    if message.role is Role.ASSISTANT and try_parse_tool_call(message.content) is not None:
        name, _, block = message.content.strip().partition("\n")
        return PromptMessage("assistant", block.strip(), metadata=name.strip())
    return PromptMessage(message.role.value, message.content)


def _placement(spec: ModelSpec) -> tuple[torch.device, torch.dtype, str | None]:
    """The main device, the dtype, and accelerate's device_map when the model spans GPUs."""
    device = resolve_device(spec)
    dtype = resolve_dtype(spec, device)
    if device.type == "cpu" and dtype == torch.float16:
        # Half-precision matmuls on CPU are slow and lose accuracy; bfloat16 is the CPU half type.
        raise ModelLoadError(
            f"model {spec.id!r}: float16 is not supported on CPU; use float32 or bfloat16"
        )
    multi_gpu = spec.device == "auto" and device.type == "cuda" and torch.cuda.device_count() > 1
    return device, dtype, "auto" if multi_gpu else None


class ChatGLM3Model(ChatModel):
    """ChatGLM3 with its own prompt format, stop ids and tool calls, without remote code."""

    def __init__(self, spec: ModelSpec, cache_dir: Path) -> None:
        from transformers import GlmForCausalLM

        self._spec = spec
        device, dtype, device_map = _placement(spec)
        folder = local_checkpoint(spec)
        try:
            self._tokenizer = ChatGLM3Tokenizer.from_file(folder / "tokenizer.model")
        except (OSError, RuntimeError) as exc:
            # GLM-4's original checkpoints also say model_type "chatglm" but ship a tiktoken file.
            raise ModelLoadError(
                f"model {spec.id!r}: {folder / 'tokenizer.model'} is not a SentencePiece model "
                f"({exc}); only ChatGLM3 checkpoints load this way"
            ) from exc
        converted = converted_chatglm3(spec, folder, cache_dir)
        if device_map is not None:
            model = GlmForCausalLM.from_pretrained(converted, dtype=dtype, device_map=device_map)
            device = model.get_input_embeddings().weight.device
        else:
            model = GlmForCausalLM.from_pretrained(converted, dtype=dtype).to(device)
        self._model = model.eval()
        self._device = device
        vocab = int(model.config.vocab_size)
        if self._tokenizer.vocab_size > vocab:
            raise ModelLoadError(
                f"model {spec.id!r}: the tokenizer has {self._tokenizer.vocab_size} ids but the "
                f"model only {vocab}"
            )
        own_context = int(model.config.max_position_embeddings)
        self._context_length = spec.context_length or own_context
        self._max_input_tokens = min(
            spec.max_input_tokens or self._context_length, self._context_length
        )
        log.info(
            "loaded ChatGLM3 model %s from %s on %s (%s, context %d, rope_theta %g%s)",
            spec.id,
            spec.source,
            getattr(model, "hf_device_map", None) or device,
            dtype,
            self._context_length,
            model.config.rope_parameters["rope_theta"],
            ", split over GPUs" if device_map else "",
        )

    @property
    def causal_lm(self) -> torch.nn.Module:
        """The native GlmForCausalLM: the chat engine decodes ChatGLM3 sequences in batches."""
        module: torch.nn.Module = self._model
        return module

    @property
    def tokenizer(self) -> ChatGLM3Tokenizer:
        """The native ChatGLM3 tokenizer."""
        return self._tokenizer

    @property
    def max_input_tokens(self) -> int:
        return self._max_input_tokens

    @property
    def context_length(self) -> int:
        return self._context_length

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def decoder(self) -> TokenDecoder:
        return self._tokenizer

    @property
    def stop_token_ids(self) -> frozenset[int]:
        return self._tokenizer.stop_ids

    @property
    def supports_tools(self) -> bool:
        return True

    def parse_tool_call(self, reply: str, tools: Sequence[ToolSpec]) -> FunctionCall | None:
        call = try_parse_tool_call(reply, [t.name for t in tools])
        return None if call is None else FunctionCall(call.name, call.arguments_json)

    def build_prompt(
        self, messages: Sequence[ChatMessage], tools: Sequence[ToolSpec] = ()
    ) -> list[int]:
        if tools:
            return self.build_prompt_with_tools(messages, [t.as_dict() for t in tools])
        return self.build_prompt_with_tools(messages, None)

    def build_prompt_with_tools(
        self,
        messages: Sequence[ChatMessage | PromptMessage],
        tools: Sequence[Mapping[str, Any]] | None,
    ) -> list[int]:
        """The prompt with `tools` (ChatGLM3's or OpenAI's form) offered in the system message."""
        turns = [m if isinstance(m, PromptMessage) else to_prompt_message(m) for m in messages]
        return build_prompt_ids(self._tokenizer, turns, tools)

    def tokenize(self, text: str, max_tokens: int) -> Tokenization:
        # The seed's semantics: ids as tokenizer(text) gives them ([gMASK] sop first), pieces as
        # tokenizer.tokenize(text) gives them (no prefix), so the two lists differ in length.
        ids = self._tokenizer.prefix_ids + self._tokenizer.encode(text)
        return Tokenization(
            token_ids=tuple(ids[:max_tokens]),
            tokens=tuple(self._tokenizer.pieces(text)[:max_tokens]),
            truncated=len(ids) > max_tokens,
        )

    def encode_text(self, text: str) -> list[int]:
        return self._tokenizer.prefix_ids + self._tokenizer.encode(text)

    @torch.inference_mode()
    def forward(
        self, input_ids: Sequence[int], cache: KVCache | None
    ) -> tuple[torch.Tensor, KVCache]:
        ids = torch.tensor([list(input_ids)], dtype=torch.long, device=self._device)
        # logits_to_keep=1: only the next token's logits; all positions would cost time and memory.
        out = self._model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
        # Split over GPUs, the logits come out on the last one; the sampler works on the first.
        return out.logits[0, -1].float().to(self._device), out.cache

    def warmup(self) -> None:
        logits, cache = self.forward(self.build_prompt([ChatMessage(Role.USER, "Hello")]), None)
        self.forward([int(torch.argmax(logits))], cache)

"""ChatGLM3 (e.g. ChatGLM3-6B-32k) served by transformers' native GlmForCausalLM.

ChatGLM3's own remote code fails on every current transformers release, so nothing of it is used:
the weights are mapped onto GlmForCausalLM (server/models/chatglm3/weights.py), the SentencePiece
tokenizer and the prompt format are implemented here (tokenizer.py, prompt.py),
and tool calls are parsed without eval (tools.py).

Devices: one GPU (float16 unless configured), the CPU (float32 or bfloat16; slow but it works), or,
with device = "auto" on a machine with several GPUs, the GPU with the most free memory when the
model fits it, else the layers split over all of them by accelerate's device_map="auto"
(transformers places each layer and moves activations between GPUs; input ids go to the GPU
holding the embeddings). A split model is a pipeline whose GPUs work one after another on each
pass, so a model that fits one GPU serves more as one replica per GPU (a server per GPU) than
split over all of them.
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
from server.models.chatglm3.prompt import PromptMessage, build_prompt_ids
from server.models.chatglm3.tokenizer import ChatGLM3Tokenizer
from server.models.chatglm3.tools import format_tool_call, try_parse_tool_call
from server.models.chatglm3.weights import (
    converted_chatglm3,
    expected_shapes,
    glm_config_from_chatglm,
    local_checkpoint,
    read_chatglm_config,
)
from server.models.sources import ModelLoadError, resolve_device, resolve_dtype

log = logging.getLogger(__name__)

__all__ = ["ChatGLM3Model", "one_gpu_for", "to_prompt_message"]

# A model goes whole onto one GPU when its weights take at most this share of that GPU's free
# memory; the rest is for the key/value cache and the activations.
_ONE_GPU_SHARE = 0.8
_GIB = 1 << 30


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


def _placement(spec: ModelSpec) -> tuple[torch.device, torch.dtype]:
    """The main device and the dtype."""
    device = resolve_device(spec)
    dtype = resolve_dtype(spec, device)
    if device.type == "cpu" and dtype == torch.float16:
        # Half-precision matmuls on CPU are slow and lose accuracy; bfloat16 is the CPU half type.
        raise ModelLoadError(
            f"model {spec.id!r}: float16 is not supported on CPU; use float32 or bfloat16"
        )
    return device, dtype


def one_gpu_for(weights_bytes: int, free_bytes: Sequence[int]) -> int | None:
    """The GPU (index into `free_bytes`) that holds a whole model, or None: split it.

    The GPU with the most free memory, where the weights take at most _ONE_GPU_SHARE of it.
    """
    if not free_bytes:
        return None
    best = max(range(len(free_bytes)), key=lambda i: free_bytes[i])
    return best if weights_bytes <= _ONE_GPU_SHARE * free_bytes[best] else None


def _weights_bytes(folder: Path, dtype: torch.dtype) -> int:
    """What the checkpoint's weights take in `dtype`, from its config."""
    shapes = expected_shapes(glm_config_from_chatglm(read_chatglm_config(folder)))
    count = sum(int(torch.Size(shape).numel()) for shape in shapes.values())
    return count * torch.empty((), dtype=dtype).element_size()


def _gpus(spec: ModelSpec, device: torch.device, weights_bytes: int) -> tuple[torch.device, bool]:
    """The device to load onto, and whether to split over every GPU (device = "auto" only)."""
    count = torch.cuda.device_count() if device.type == "cuda" else 0
    if spec.device != "auto" or count < 2:
        return device, False
    free = [int(torch.cuda.mem_get_info(i)[0]) for i in range(count)]
    gpu = one_gpu_for(weights_bytes, free)
    if gpu is None:
        return device, True
    log.info(
        "model %s fits one GPU (%.1f GiB of weights, %.1f GiB free on cuda:%d): it runs there, "
        "not split over %d GPUs; run a server per GPU (CUDA_VISIBLE_DEVICES) to use the others",
        spec.id,
        weights_bytes / _GIB,
        free[gpu] / _GIB,
        gpu,
        count,
    )
    return torch.device("cuda", gpu), False


class ChatGLM3Model(ChatModel):
    """ChatGLM3 with its own prompt format, stop ids and tool calls, without remote code."""

    def __init__(self, spec: ModelSpec, cache_dir: Path) -> None:
        from transformers import GlmForCausalLM

        self._spec = spec
        device, dtype = _placement(spec)
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
        device, split = _gpus(spec, device, _weights_bytes(folder, dtype))
        if split:
            model = GlmForCausalLM.from_pretrained(converted, dtype=dtype, device_map="auto")
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
            ", split over GPUs" if split else "",
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
        # The legacy semantics: ids as tokenizer(text) gives them ([gMASK] sop first), pieces as
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

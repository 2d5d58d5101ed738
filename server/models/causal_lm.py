"""Chat models that transformers' AutoModelForCausalLM loads, with the tokenizer's chat template."""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Sequence
from typing import Any

import torch

from server.config import ModelSpec
from server.domain import ChatMessage, Role, Tokenization, ToolSpec
from server.models.base import ChatModel, KVCache, TokenDecoder
from server.models.sources import converted_gguf, resolve_device, resolve_dtype, resolve_source

log = logging.getLogger(__name__)

# The int8 accuracy check (see _quantize_int8): its prompt, and the largest difference from the
# float32 logits allowed, as a share of their range at a position.
INT8_CHECK_PROMPT = "Explain in two sentences why the sky is blue, then name three colours."
INT8_LOGIT_TOLERANCE = 0.1

# Hugging Face chat templates call a tool's result "tool"; ChatGLM3 calls it "observation".
_TEMPLATE_ROLES = {
    Role.SYSTEM: "system",
    Role.USER: "user",
    Role.ASSISTANT: "assistant",
    Role.OBSERVATION: "tool",
}


class _LockedDecoder:
    """A tokenizer's decode behind a lock.

    Fast tokenizers are Rust objects that raise "Already borrowed" when two threads use them at
    once. The chat scheduler's thread decodes every generated token through this, so it has a
    tokenizer of its own that no request's tokenization (a prompt, a Tokenize call, which can
    take a second for a long text) ever holds.
    """

    def __init__(self, tokenizer: Any, lock: threading.Lock) -> None:
        self._tokenizer = tokenizer
        self._lock = lock

    def decode(self, token_ids: list[int], skip_special_tokens: bool = False) -> str:
        with self._lock:
            text: str = self._tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)
        return text


class TransformersChatModel(ChatModel):
    """A causal LM with a chat template: SmolLM2, Llama, Qwen, GLM-4 and the like."""

    def __init__(self, spec: ModelSpec, cache_dir: Any) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self._spec = spec
        self._device = resolve_device(spec)
        dtype = resolve_dtype(spec, self._device)
        source = resolve_source(spec)
        if spec.gguf_file is not None:
            source = str(converted_gguf(spec, source, dtype, cache_dir))
        self._tokenizer = AutoTokenizer.from_pretrained(source)
        if self._tokenizer.chat_template is None:
            raise ValueError(f"the tokenizer of {source} has no chat template")
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
        self._model = model.to(self._device).eval()
        # Requests' tokenization (prompts, Tokenize) and the scheduler's decoding each have a
        # tokenizer and a lock of their own (see _LockedDecoder).
        self._lock = threading.Lock()
        if spec.quantize == "int8":
            self._quantize_int8()
        self._decoder = _LockedDecoder(copy.deepcopy(self._tokenizer), threading.Lock())

        config_context = int(getattr(model.config, "max_position_embeddings", 0) or 0)
        self._context_length = spec.context_length or config_context or 2048
        self._max_input_tokens = min(
            spec.max_input_tokens or self._context_length, self._context_length
        )
        self._stop_ids = frozenset(self._collect_stop_ids())
        log.info(
            "loaded chat model %s from %s on %s (%s, context %d, stop ids %s)",
            spec.id,
            spec.source,
            self._device,
            dtype,
            self._context_length,
            sorted(self._stop_ids),
        )

    def _quantize_int8(self) -> None:
        """int8 linear weights, refused when the logits move too far from float32's."""
        from server.models.int8_linear import logit_error, prompt_logits, quantize_linears

        if self._device.type != "cpu" or self._model.dtype != torch.float32:
            raise ValueError(
                f"model {self._spec.id}: quantize = 'int8' needs device 'cpu' and dtype "
                f"'float32' (got {self._device}, {self._model.dtype})"
            )
        ids = self.build_prompt([ChatMessage(Role.USER, INT8_CHECK_PROMPT)])
        reference = prompt_logits(self._model, ids)
        layers = quantize_linears(self._model)
        error, agree = logit_error(reference, prompt_logits(self._model, ids))
        log.info(
            "model %s: int8 weights in %d linear layers; on a fixed %d-token prompt the logits "
            "differ from float32's by at most %.4f of their range (tolerance %.2f), and the top "
            "token agrees at %.0f%% of positions",
            self._spec.id,
            layers,
            len(ids),
            error,
            INT8_LOGIT_TOLERANCE,
            100 * agree,
        )
        if error > INT8_LOGIT_TOLERANCE:
            raise ValueError(
                f"model {self._spec.id}: int8 weights move the logits by {error:.4f} of their "
                f"range, more than the tolerance {INT8_LOGIT_TOLERANCE}: keep quantize = 'none'"
            )

    def _collect_stop_ids(self) -> set[int]:
        ids: set[int] = set()
        for value in (
            getattr(self._model.generation_config, "eos_token_id", None),
            self._tokenizer.eos_token_id,
        ):
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, (list, tuple)):
                ids.update(int(v) for v in value)
        return ids

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
        return self._decoder

    @property
    def stop_token_ids(self) -> frozenset[int]:
        return self._stop_ids

    @property
    def causal_lm(self) -> torch.nn.Module:
        module: torch.nn.Module = self._model
        return module

    def build_prompt(
        self, messages: Sequence[ChatMessage], tools: Sequence[ToolSpec] = ()
    ) -> list[int]:
        if tools:
            raise ValueError("this model has no tool format (supports_tools is false)")
        conversation = [{"role": _TEMPLATE_ROLES[m.role], "content": m.content} for m in messages]
        with self._lock:
            # sanitize_control_tokens encodes special tokens typed inside messages as plain text,
            # so user content cannot forge a role marker or an end-of-turn token.
            ids = self._tokenizer.apply_chat_template(
                conversation,
                add_generation_prompt=True,
                tokenize=True,
                return_dict=False,
                sanitize_control_tokens=True,
            )
        return [int(i) for i in ids]

    def tokenize(self, text: str, max_tokens: int) -> Tokenization:
        with self._lock:
            ids = self._tokenizer(text, add_special_tokens=True)["input_ids"]
            pieces = self._tokenizer.tokenize(text)
        return Tokenization(
            token_ids=tuple(int(i) for i in ids[:max_tokens]),
            tokens=tuple(str(p) for p in pieces[:max_tokens]),
            truncated=len(ids) > max_tokens,
        )

    def encode_text(self, text: str) -> list[int]:
        with self._lock:
            ids = self._tokenizer(text, add_special_tokens=True)["input_ids"]
        return [int(i) for i in ids]

    @torch.inference_mode()
    def forward(
        self, input_ids: Sequence[int], cache: KVCache | None
    ) -> tuple[torch.Tensor, KVCache]:
        ids = torch.tensor([list(input_ids)], dtype=torch.long, device=self._device)
        # logits_to_keep=1: only the next token's logits; all positions would cost time and memory.
        out = self._model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
        return out.logits[0, -1].float(), out.cache

    def warmup(self) -> None:
        logits, cache = self.forward(self.build_prompt([ChatMessage(Role.USER, "Hello")]), None)
        self.forward([int(torch.argmax(logits))], cache)

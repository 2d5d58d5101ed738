"""The served models: their load state, their engines, and lookup by id and kind."""

from __future__ import annotations

import enum
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from server.config import EMBED_MAX_BATCH_TOKENS, MAX_MODEL_ID_CHARS, ModelSpec
from server.domain import ModelInfo, ModelKind, ModelLimits
from server.engine.chat import ChatEngine
from server.engine.device_profile import profile_for
from server.engine.embed import EmbedBatcher, measure_pass_overhead
from server.engine.threads import run_in_fresh_thread, run_via
from server.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    UnavailableError,
    unknown_model,
)
from server.metrics import NULL_OBSERVER, EngineObserver, Metrics
from server.models.base import ChatModel, EmbeddingModel, Model

log = logging.getLogger(__name__)

T = TypeVar("T")

_KIND_NAMES = {ModelKind.CHAT: "a chat model", ModelKind.EMBEDDING: "an embedding model"}

Loader = Callable[[ModelSpec, Path], Model]


class LoadState(enum.Enum):
    """Where a model is in its life."""

    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


class ModelStartupError(RuntimeError):
    """A required model failed to load; the server must not start."""


@dataclass(slots=True)
class _Entry:
    spec: ModelSpec
    state: LoadState = LoadState.LOADING
    model: Model | None = None
    chat: ChatEngine | None = None
    embed: EmbedBatcher | None = None
    created: int = 0
    error: str = ""


class ModelRegistry:
    """Loads the configured models and hands out their engines."""

    def __init__(
        self,
        specs: tuple[ModelSpec, ...],
        cache_dir: Path,
        loader: Loader,
        *,
        warmup: bool = True,
        metrics: Metrics | None = None,
    ) -> None:
        self._entries = {s.id: _Entry(s) for s in specs}
        # Each alias names the id of its model (the config checked that every name is unique).
        self._aliases = {alias: s.id for s in specs for alias in s.aliases}
        self._metrics = metrics
        self._warmup = warmup
        self._cache_dir = cache_dir
        self._loader = loader
        self._defaults: dict[ModelKind, str] = {}
        for kind in ModelKind:
            of_kind = [s for s in specs if s.kind is kind]
            chosen = next((s for s in of_kind if s.default), of_kind[0] if of_kind else None)
            if chosen is not None:
                self._defaults[kind] = chosen.id

    async def load_all(self) -> None:
        """Load and warm every model, one after another, off the event loop.

        A required model that fails raises ModelStartupError; an optional one is logged once and
        reported not ready while the others serve.
        """
        for entry in self._entries.values():
            spec = entry.spec
            started = time.monotonic()
            try:
                model = await run_in_fresh_thread(self._loader, spec, self._cache_dir)
                if self._warmup:
                    await run_in_fresh_thread(model.warmup)
                if isinstance(model, ChatModel):
                    entry.chat = self._chat_engine(spec, model)
                    await entry.chat.start()
            except Exception as exc:
                entry.state = LoadState.FAILED
                entry.error = f"{type(exc).__name__}: {exc}"
                log.error("model %s (%s) failed to load: %s", spec.id, spec.source, entry.error)
                if spec.required:
                    raise ModelStartupError(
                        f"required model {spec.id!r} failed to load: {entry.error}"
                    ) from exc
                continue
            entry.model = model
            if isinstance(model, EmbeddingModel):
                # Only worth knowing where padding costs: it decides when cutting a round of
                # short and long texts in two pays (server/engine/embed.py).
                overhead = None
                if model.pads_batches:
                    overhead = await self._run_model_call(
                        functools.partial(measure_pass_overhead, model)
                    )
                    log.info(
                        "model %s: one embedding pass costs what %s padded tokens do",
                        spec.id,
                        "an unknown number of" if overhead is None else f"{overhead:.0f}",
                    )
                entry.embed = EmbedBatcher(
                    model,
                    max_batch_size=spec.batch_size,
                    max_batch_tokens=spec.max_batch_tokens or EMBED_MAX_BATCH_TOKENS,
                    max_wait_s=spec.batch_wait_ms / 1000.0,
                    max_waiting_prompts=max(spec.max_batch_prompts, spec.batch_size) * 16,
                    pass_overhead_tokens=overhead,
                    run_model=self._run_model_call,
                    observer=self.observer(spec.id),
                )
                await entry.embed.start()
            entry.created = int(time.time())
            entry.state = LoadState.READY
            log.info("model %s ready in %.1f s", spec.id, time.monotonic() - started)

    async def _run_model_call(self, call: Callable[[], T]) -> T:
        """Run model work other than chat on the first chat scheduler's thread, between its steps.

        One thread then runs every model's work, with one OpenMP team: work on a thread of its
        own beside a chat scheduler would make two teams on too few CPUs, which throttles both
        (server/engine/threads.py; an embedding pass of 32 sentences took 15-20% longer so).
        With no chat model (or once it stops) the call runs on a fresh thread.
        """
        chat = next((e.chat for e in self._entries.values() if e.chat is not None), None)
        if chat is None:
            return await run_in_fresh_thread(call)
        return await run_via(chat.call_between_steps, call)

    def _chat_engine(self, spec: ModelSpec, model: ChatModel) -> ChatEngine:
        return ChatEngine(
            model,
            max_concurrent=spec.max_concurrent,
            max_waiting=spec.max_waiting,
            max_new_tokens=spec.max_new_tokens,
            # Unset, the step size is the device's (server/engine/device_profile.py).
            max_batch_tokens=spec.max_batch_tokens or profile_for(model.device).chat_step_tokens,
            max_wait_s=spec.batch_wait_ms / 1000.0,
            observer=self.observer(spec.id),
            prefix_cache_bytes=spec.prefix_cache_mb << 20,
            lean_decode=spec.lean_decode,
            compile_decode=spec.compile_decode,
        )

    def observer(self, model_id: str) -> EngineObserver:
        """The hooks the engine of `model_id` reports its forward passes through (metrics)."""
        return NULL_OBSERVER if self._metrics is None else self._metrics.observer(model_id)

    async def close(self) -> None:
        """Stop the engines (after the server stopped taking calls)."""
        for entry in self._entries.values():
            if entry.embed is not None:
                await entry.embed.stop()
            if entry.chat is not None:
                entry.chat.shutdown()

    def ready(self, kind: ModelKind | None = None) -> bool:
        """Whether every model (of `kind`) that is expected to serve is ready."""
        entries = [e for e in self._entries.values() if kind is None or e.spec.kind is kind]
        if not entries:
            return False
        return all(
            e.state is LoadState.READY or (e.state is LoadState.FAILED and not e.spec.required)
            for e in entries
        ) and any(e.state is LoadState.READY for e in entries)

    def _entry(self, model_id: str, kind: ModelKind | None) -> _Entry:
        if len(model_id) > MAX_MODEL_ID_CHARS:
            raise InvalidArgumentError(
                f"model is {len(model_id)} characters long; model ids are at most "
                f"{MAX_MODEL_ID_CHARS}",
                param="model",
            )
        if not model_id:
            default_kind = kind or ModelKind.CHAT
            fallback = self._defaults.get(default_kind) or next(iter(self._defaults.values()), "")
            model_id = fallback
            if not model_id:
                raise FailedPreconditionError(f"no model is configured for {default_kind.value}")
        entry = self._entries.get(self._aliases.get(model_id, model_id))
        if entry is None:
            raise unknown_model(model_id, [*self._entries, *self._aliases])
        if kind is not None and entry.spec.kind is not kind:
            raise FailedPreconditionError(
                f"model {model_id!r} is {_KIND_NAMES[entry.spec.kind]}, not "
                f"{_KIND_NAMES[kind]}; choose one of: {', '.join(self.ids(kind)) or 'none'}"
            )
        if entry.state is LoadState.LOADING:
            raise UnavailableError(f"model {model_id!r} is still loading; retry shortly")
        if entry.state is LoadState.FAILED:
            raise UnavailableError(f"model {model_id!r} failed to load: {entry.error}")
        return entry

    def ids(self, kind: ModelKind) -> list[str]:
        """The ids of the models of one kind."""
        return [i for i, e in self._entries.items() if e.spec.kind is kind]

    def chat(self, model_id: str) -> tuple[str, ChatEngine]:
        """The id and engine of a ready chat model ('' selects the default)."""
        entry = self._entry(model_id, ModelKind.CHAT)
        assert entry.chat is not None
        return entry.spec.id, entry.chat

    def embedder(self, model_id: str) -> tuple[str, EmbedBatcher, EmbeddingModel]:
        """The id, batcher and model of a ready embedding model ('' selects the default)."""
        entry = self._entry(model_id, ModelKind.EMBEDDING)
        assert entry.embed is not None
        assert isinstance(entry.model, EmbeddingModel)
        return entry.spec.id, entry.embed, entry.model

    def any_model(self, model_id: str) -> tuple[str, Model]:
        """The id and model of any ready model ('' selects the default chat model)."""
        entry = self._entry(model_id, None)
        assert entry.model is not None
        return entry.spec.id, entry.model

    def limits(self, spec: ModelSpec) -> ModelLimits:
        """The limits of a model: configured ones, completed from the model once it is loaded."""
        model = self._entries[spec.id].model
        is_chat = spec.kind is ModelKind.CHAT
        return ModelLimits(
            max_input_tokens=model.max_input_tokens if model else (spec.max_input_tokens or 0),
            context_length=model.context_length if model else (spec.context_length or 0),
            max_new_tokens=spec.max_new_tokens if is_chat else 0,
            max_batch_prompts=0 if is_chat else spec.max_batch_prompts,
            max_input_chars=spec.max_input_chars,
        )

    def infos(self) -> list[ModelInfo]:
        """What ListModels reports: chat models first, then embedding models."""
        entries = sorted(self._entries.values(), key=lambda e: e.spec.kind is not ModelKind.CHAT)
        return [
            ModelInfo(
                id=e.spec.id,
                kind=e.spec.kind,
                owned_by=e.spec.owned_by,
                created=e.created,
                limits=self.limits(e.spec),
                ready=e.state is LoadState.READY,
                default=self._defaults.get(e.spec.kind) == e.spec.id,
                dimensions=e.model.dimensions if isinstance(e.model, EmbeddingModel) else 0,
                aliases=e.spec.aliases,
            )
            for e in entries
        ]

    def spec(self, model_id: str) -> ModelSpec:
        """The config entry of a model id (it must exist)."""
        return self._entries[model_id].spec

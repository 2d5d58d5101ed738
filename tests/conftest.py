"""Shared fixtures: a real in-process glm-api server on a free port, with the default models,
and the real models loaded once per session for the test servers of their own (`serving`)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2_grpc

from glm.v1 import glm_service_pb2 as pb
from glm.v1 import glm_service_pb2_grpc as pb_grpc
from server.app import GlmApp
from server.config import ModelSpec, load_model_specs
from server.engine.chat import ChatEngine
from server.engine.registry import Loader
from server.models.base import Model
from server.models.loader import load_model
from server.settings import DEFAULT_CONFIG, Settings


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip `gpu` tests, saying why, where torch sees no CUDA device (`-ra` prints the reason)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(
        reason=f"needs a CUDA device (torch {torch.__version__} sees none); run on a GPU: "
        "pytest -m gpu"
    )
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def default_specs(**overrides: object) -> tuple[ModelSpec, ...]:
    """The default config's models, with `overrides` applied to every spec that has those keys."""
    return tuple(dataclasses.replace(s, **overrides) for s in load_model_specs(DEFAULT_CONFIG))  # type: ignore[arg-type]


async def engine_idle(engine: ChatEngine, within_s: float) -> None:
    """Return once no sequence runs on `engine` (its public stats); fail after `within_s` s."""
    deadline = time.monotonic() + within_s
    while engine.stats.running:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the chat engine is still busy: {engine.stats}")
        await asyncio.sleep(0.01)


async def chat_error(stub: pb_grpc.GlmServiceStub, request: pb.ChatRequest) -> grpc.aio.AioRpcError:
    """The error a Chat call ends with (the test fails if it ends without one)."""
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in stub.Chat(request):
            pass
    return err.value


def make_settings(**overrides: object) -> Settings:
    """Settings for an in-process server on a free port, shutting down fast."""
    values: dict[str, object] = {"grpc_address": "127.0.0.1:0", "shutdown_grace_s": 2.0}
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


# The spec fields only the registry and the engines read: specs that differ in these alone
# describe the same loaded model.
_ENGINE_FIELDS = frozenset(
    {
        "aliases",
        "owned_by",
        "default",
        "required",
        "max_new_tokens",
        "max_batch_prompts",
        "max_input_chars",
        "max_concurrent",
        "max_waiting",
        "batch_size",
        "batch_wait_ms",
        "max_batch_tokens",
        "prefix_cache_mb",
        "lean_decode",
        "compile_decode",
    }
)
_ENGINE_DEFAULTS = {
    f.name: f.default for f in dataclasses.fields(ModelSpec) if f.name in _ENGINE_FIELDS
}


class SharedModels:
    """Models loaded once per session and lent to one holder (a test server) at a time.

    A model given back by a server that stopped serves the next one as a fresh load would: a
    chat engine installs its own linear-layer plans and attention on the model it is handed
    (server/engine/kv_slots.py), and no engine keeps state on an embedding model. Lending to
    one holder at a time keeps two live engines from sharing one model's layers.
    """

    def __init__(self) -> None:
        self._idle: dict[tuple[ModelSpec, Path], list[Model]] = {}
        self._lock = threading.Lock()  # the registry calls its loader on worker threads

    @contextlib.contextmanager
    def lending(self) -> Iterator[Loader]:
        """A loader whose models come back to the pool when the block ends."""
        lent: list[tuple[tuple[ModelSpec, Path], Model]] = []

        def loader(spec: ModelSpec, cache_dir: Path) -> Model:
            key = (dataclasses.replace(spec, **_ENGINE_DEFAULTS), Path(cache_dir))  # type: ignore[arg-type]
            with self._lock:
                idle = self._idle.get(key)
                model = idle.pop() if idle else None
            if model is None:
                model = load_model(spec, cache_dir)
            with self._lock:
                lent.append((key, model))
            return model

        try:
            yield loader
        finally:
            with self._lock:
                for key, model in lent:
                    self._idle.setdefault(key, []).append(model)


SHARED_MODELS = SharedModels()


@contextlib.asynccontextmanager
async def serving(
    settings: Settings,
    specs: tuple[ModelSpec, ...] | None = None,
    *,
    load: bool = True,
    grace: float = 1.0,
) -> AsyncIterator[GlmApp]:
    """A started in-process server, its models loaded unless `load` is false, with its models
    from SHARED_MODELS; stopped when the block ends, running calls given `grace` seconds."""
    with SHARED_MODELS.lending() as loader:
        app = GlmApp(settings, specs, loader=loader)
        await app.start()
        try:
            if load:
                await app.load_models()
            yield app
        finally:
            await app.stop(grace=grace)


@pytest.fixture(scope="session")
async def glm_app() -> AsyncIterator[GlmApp]:
    """One server with the default models, shared by the whole session (loading costs seconds)."""
    async with serving(make_settings()) as app:
        yield app


@pytest.fixture(scope="module")
def served_app(glm_app: GlmApp) -> GlmApp:
    """The server `channel` and the stubs call: the shared one, unless a module defines a
    `served_app` of its own."""
    return glm_app


@pytest.fixture(scope="module")
async def channel(served_app: GlmApp) -> AsyncIterator[grpc.aio.Channel]:
    """An asyncio channel to the module's server."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{served_app.port}") as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel: grpc.aio.Channel) -> pb_grpc.GlmServiceStub:
    """A GlmService stub on the module's server."""
    return pb_grpc.GlmServiceStub(channel)


@pytest.fixture(scope="module")
def health_stub(channel: grpc.aio.Channel) -> health_pb2_grpc.HealthStub:
    """A grpc.health.v1 stub on the module's server."""
    return health_pb2_grpc.HealthStub(channel)

"""Shared fixtures: a real in-process glm-api server on a free port, with the default models."""

from __future__ import annotations

import dataclasses
import socket
from collections.abc import AsyncIterator

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2_grpc

from glm.v1 import glm_service_pb2_grpc as pb_grpc
from server.app import GlmApp
from server.config import ModelSpec, load_model_specs
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


def make_settings(**overrides: object) -> Settings:
    """Settings for an in-process server on a free port, shutting down fast."""
    values: dict[str, object] = {"grpc_address": "127.0.0.1:0", "shutdown_grace_s": 2.0}
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
async def glm_app() -> AsyncIterator[GlmApp]:
    """One server with the default models, shared by the whole session (loading costs seconds)."""
    app = GlmApp(make_settings())
    await app.start()
    await app.load_models()
    yield app
    await app.stop(grace=1.0)


@pytest.fixture(scope="session")
async def channel(glm_app: GlmApp) -> AsyncIterator[grpc.aio.Channel]:
    """An asyncio channel to the shared server."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{glm_app.port}") as ch:
        yield ch


@pytest.fixture(scope="session")
def stub(channel: grpc.aio.Channel) -> pb_grpc.GlmServiceStub:
    """A GlmService stub on the shared server."""
    return pb_grpc.GlmServiceStub(channel)


@pytest.fixture(scope="session")
def health_stub(channel: grpc.aio.Channel) -> health_pb2_grpc.HealthStub:
    """A grpc.health.v1 stub on the shared server."""
    return health_pb2_grpc.HealthStub(channel)

"""Readiness, health, backpressure, cancellation and shutdown of an in-process server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from glm.v1 import glm_service_pb2 as pb
from glm.v1 import glm_service_pb2_grpc as pb_grpc
from server.app import GlmApp
from server.config import ModelSpec
from server.domain import ModelKind
from server.engine.registry import ModelRegistry, ModelStartupError
from server.models.loader import load_model
from tests.conftest import default_specs, engine_idle, make_settings, serving

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
STORY = pb.ChatRequest(
    messages=[pb.ChatMessage(role="user", content="Tell me a very long story about a dragon.")],
    temperature=0.0,
    max_tokens=1000,
)
SHORT = pb.ChatRequest(
    messages=[pb.ChatMessage(role="user", content="Say hi.")], temperature=0.0, max_tokens=4
)


async def health_of(channel: grpc.aio.Channel, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    response = await stub.Check(health_pb2.HealthCheckRequest(service=service))
    return int(response.status)


@pytest.fixture(scope="module")
async def small_app() -> AsyncIterator[GlmApp]:
    """A server with one chat slot and one waiting place, not yet loaded when a test starts."""
    specs = default_specs(max_concurrent=1, max_waiting=1)
    async with serving(make_settings(), specs, load=False, grace=0.5) as app:
        yield app


async def test_lifecycle_from_loading_to_draining(small_app: GlmApp) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{small_app.port}") as channel:
        stub = pb_grpc.GlmServiceStub(channel)
        # Before the models are loaded: NOT_SERVING, and calls are told to come back.
        assert await health_of(channel) == NOT_SERVING
        assert await health_of(channel, "glm.v1.GlmService") == NOT_SERVING
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Tokenize(pb.TokenizeRequest(prompt="x"))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "still loading" in (err.value.details() or "")
        models = await stub.ListModels(pb.ListModelsRequest())
        assert [m.ready for m in models.data] == [False, False]

        await small_app.load_models()
        assert await health_of(channel) == SERVING
        assert await health_of(channel, "glm.v1.GlmService") == SERVING
        assert all(m.ready for m in (await stub.ListModels(pb.ListModelsRequest())).data)

        await check_backpressure_and_cancellation(small_app, stub)

        # Draining: a watcher sees NOT_SERVING as soon as shutdown starts.
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
        assert (await watch.read()).status == SERVING
        stopping = asyncio.create_task(small_app.stop(grace=0.5))
        assert (await watch.read()).status == NOT_SERVING
        await stopping


async def check_backpressure_and_cancellation(app: GlmApp, stub: pb_grpc.GlmServiceStub) -> None:
    _, engine = app.registry.chat("")
    running = stub.Chat(STORY)
    await running.read()
    assert engine.stats.running == 1

    # One request may wait for the slot; the next is refused at once.
    waiting = stub.Chat(SHORT)
    waiting_task = asyncio.create_task(_drain(waiting))
    while engine.stats.waiting == 0:  # noqa: ASYNC110 - the engine exposes no event for this
        await asyncio.sleep(0.01)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _drain(stub.Chat(SHORT))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_waiting" in (err.value.details() or "")

    # Cancelling the running stream frees its slot: the waiting request then runs to the end.
    running.cancel()
    chunks = await asyncio.wait_for(waiting_task, timeout=60)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    await engine_idle(engine, 30)
    assert engine.stats.running == 0
    assert engine.stats.waiting == 0

    # A request whose deadline passes while it waits never starts.
    running = stub.Chat(STORY)
    await running.read()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _drain(stub.Chat(SHORT, timeout=0.3))
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await asyncio.sleep(0.1)
    assert engine.stats.waiting == 0
    assert engine.stats.running == 1
    running.cancel()
    await engine_idle(engine, 30)


async def _drain(call: grpc.aio.UnaryStreamCall) -> list[pb.ChatResponse]:  # type: ignore[type-arg]
    return [c async for c in call]


async def test_cancelled_stream_frees_its_sequence(
    stub: pb_grpc.GlmServiceStub, glm_app: GlmApp
) -> None:
    _, engine = glm_app.registry.chat("")
    call = stub.Chat(STORY)
    await call.read()
    await call.read()
    assert engine.stats.running >= 1
    call.cancel()
    # 1000 tokens would take over a minute; a cancelled one ends at its next decode step.
    await engine_idle(engine, 20)
    assert engine.stats.running == 0


async def test_deadline_exceeded_frees_its_sequence(
    stub: pb_grpc.GlmServiceStub, glm_app: GlmApp
) -> None:
    _, engine = glm_app.registry.chat("")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _drain(stub.Chat(STORY, timeout=1.0))
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await engine_idle(engine, 20)


def missing_spec(required: bool) -> ModelSpec:
    return ModelSpec(
        id="missing-chat", kind=ModelKind.CHAT, path=Path("/nonexistent/model"), required=required
    )


async def test_optional_model_that_fails_is_reported_not_ready(tmp_path: Path) -> None:
    registry = ModelRegistry((missing_spec(required=False),), tmp_path, load_model)
    await registry.load_all()
    assert not registry.ready()
    [info] = registry.infos()
    assert info.id == "missing-chat"
    assert not info.ready
    from server.errors import UnavailableError

    with pytest.raises(UnavailableError, match=r"failed to load: .*/nonexistent/model"):
        registry.chat("missing-chat")


async def test_required_model_that_fails_stops_the_start(tmp_path: Path) -> None:
    registry = ModelRegistry((missing_spec(required=True),), tmp_path, load_model)
    with pytest.raises(ModelStartupError, match="required model 'missing-chat' failed to load"):
        await registry.load_all()

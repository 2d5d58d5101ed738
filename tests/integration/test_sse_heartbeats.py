"""A streamed JSON chat that waits in the queue sends SSE comments until its first token.

A real server with the real chat model and one generation slot, so that a second request queues
behind a long first one; the heartbeat interval is tiny, and everything is counted, not timed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.api.httpbody_pb2 import HttpBody

from glm.v1 import glm_service_pb2 as pb
from glm.v1 import glm_service_pb2_grpc as pb_grpc
from glm.v1 import http_gateway_pb2_grpc as gw_grpc
from server.app import GlmApp
from server.domain import ModelKind
from server.engine.chat import ChatEngine
from server.service.http_gateway import STATUS_HEADER
from server.service.json_api.common import EVENT_STREAM, LEGACY_SSE, OPENAI_SSE, SseFraming
from tests.conftest import default_specs, engine_idle, make_settings, serving

LONG = pb.ChatRequest(
    messages=[pb.ChatMessage(role="user", content="Tell me a very long story about a dragon.")],
    temperature=0,
    max_tokens=1000,
)
SHORT = {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 3}


@pytest.fixture(scope="module")
async def one_slot_app() -> AsyncIterator[GlmApp]:
    """The chat model alone, one sequence at a time, a waiting line, heartbeats every 20 ms."""
    specs = tuple(
        dataclasses.replace(s, max_concurrent=1, max_waiting=4)
        for s in default_specs()
        if s.kind is ModelKind.CHAT
    )
    async with serving(make_settings(sse_heartbeat_s=0.02), specs) as app:
        yield app


@pytest.fixture
async def channel(one_slot_app: GlmApp) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{one_slot_app.port}") as ch:
        yield ch


def engine(app: GlmApp) -> ChatEngine:
    return app.registry.chat("")[1]


async def occupy_the_slot(channel: grpc.aio.Channel) -> Any:
    """A long generation that holds the only slot (its first chunk has arrived)."""
    call = pb_grpc.GlmServiceStub(channel).Chat(LONG)
    await anext(call.__aiter__())
    return call


@pytest.mark.parametrize("method", ["LegacyChat", "OpenAiChatCompletions"])
async def test_a_queued_stream_sends_heartbeats_then_its_events(
    channel: grpc.aio.Channel, one_slot_app: GlmApp, method: str
) -> None:
    first = await occupy_the_slot(channel)
    body = dict(SHORT, stream=True)
    sse: SseFraming = LEGACY_SSE if method == "LegacyChat" else OPENAI_SSE
    call = getattr(gw_grpc.HttpGatewayServiceStub(channel), method)(
        HttpBody(content_type="application/json", data=json.dumps(body).encode())
    )
    replies = call.__aiter__()
    try:
        heartbeats = [await anext(replies) for _ in range(3)]
        # Queued: the status line is out (200) and only comments have been sent so far.
        assert dict(await call.initial_metadata()).get(STATUS_HEADER) == "200"
        assert [h.data for h in heartbeats] == [sse.heartbeat] * 3
        assert all(h.content_type == EVENT_STREAM for h in heartbeats)
        assert engine(one_slot_app).stats.waiting == 1
    finally:
        first.cancel()  # the slot frees, the queued request starts
    rest = [r.data async for r in replies]
    events = [d for d in rest if d != sse.heartbeat]
    assert events[-1] == sse.done
    assert all(d.startswith(b"data: {") for d in events[:-1])
    # No heartbeat once the first token is out.
    assert sse.heartbeat not in rest[rest.index(events[0]) :]


async def test_a_request_refused_while_queued_keeps_its_status(
    channel: grpc.aio.Channel, one_slot_app: GlmApp
) -> None:
    # Checks run before a request waits: an invalid one is refused with its status, no 200.
    first = await occupy_the_slot(channel)
    try:
        gateway = gw_grpc.HttpGatewayServiceStub(channel)
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5000, "stream": True}
        call = gateway.OpenAiChatCompletions(HttpBody(data=json.dumps(body).encode()))
        replies = [r async for r in call]
        assert dict(await call.initial_metadata()).get(STATUS_HEADER) == "400"
        assert "max_new_tokens" in json.loads(replies[0].data)["error"]["message"]
    finally:
        first.cancel()


async def test_a_client_leaving_while_queued_gives_its_place_back(
    channel: grpc.aio.Channel, one_slot_app: GlmApp
) -> None:
    first = await occupy_the_slot(channel)
    try:
        call = gw_grpc.HttpGatewayServiceStub(channel).LegacyChat(
            HttpBody(data=json.dumps(dict(SHORT, stream=True)).encode())
        )
        replies = call.__aiter__()
        assert (await anext(replies)).data == LEGACY_SSE.heartbeat
        assert engine(one_slot_app).stats.waiting == 1
        call.cancel()
        for _ in range(6000):  # a minute at most; the server sees the cancellation at once
            if not engine(one_slot_app).stats.waiting:
                break
            await asyncio.sleep(0.01)
        assert engine(one_slot_app).stats.waiting == 0
    finally:
        first.cancel()
    async with asyncio.timeout(60):
        await engine_idle(engine(one_slot_app), 60)

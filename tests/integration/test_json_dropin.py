"""A real server's JSON routes where the legacy and OpenAI behaviours part: max_tokens above the
model's limit (capped on the legacy /chat, refused on /v1) and model aliases (every route and
ListModels)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.api.httpbody_pb2 import HttpBody

from glm.v1 import glm_service_pb2 as pb
from glm.v1 import glm_service_pb2_grpc as pb_grpc
from glm.v1 import http_gateway_pb2 as gw_pb
from glm.v1 import http_gateway_pb2_grpc as gw_grpc
from server.app import GlmApp
from server.domain import ModelKind
from server.service.http_gateway import STATUS_HEADER
from server.service.json_api.common import LEGACY_SSE
from tests.conftest import default_specs, make_settings, serving

CHAT_MODEL = "smollm2-135m-instruct"
ALIAS = "chatglm3-6b-32k"
MAX_NEW_TOKENS = 5
QUESTION = [{"role": "user", "content": "Tell me a story."}]


@pytest.fixture(scope="module")
async def app() -> AsyncIterator[GlmApp]:
    """The chat model alone, answering to the legacy id too, with a tiny max_new_tokens."""
    specs = tuple(
        dataclasses.replace(s, aliases=(ALIAS,), max_new_tokens=MAX_NEW_TOKENS)
        for s in default_specs()
        if s.kind is ModelKind.CHAT
    )
    async with serving(make_settings(), specs) as server:
        yield server


@pytest.fixture
async def channel(app: GlmApp) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as ch:
        yield ch


async def call_route(
    channel: grpc.aio.Channel, method: str, body: dict[str, Any]
) -> tuple[str, bytes]:
    """A streaming JSON route's HTTP status and body, as Envoy would get them."""
    call = getattr(gw_grpc.HttpGatewayServiceStub(channel), method)(
        HttpBody(content_type="application/json", data=json.dumps(body).encode())
    )
    data = b"".join([r.data async for r in call])
    return dict(await call.initial_metadata()).get(STATUS_HEADER, "200"), data


async def test_the_legacy_chat_caps_max_tokens_above_the_limit(channel: grpc.aio.Channel) -> None:
    body = {"messages": QUESTION, "max_tokens": 4096, "temperature": 0}
    status, data = await call_route(channel, "LegacyChat", body)
    assert status == "200", data
    reply = json.loads(data)
    assert reply["choices"][0]["finish_reason"] == "length"
    assert reply["usage"]["completion_tokens"] == MAX_NEW_TOKENS
    # Streamed: the text is all on the chunks before the finish chunk, whose delta is empty.
    status, data = await call_route(channel, "LegacyChat", dict(body, stream=True))
    assert status == "200"
    events = [json.loads(e.removeprefix(b"data: ")) for e in data.split(LEGACY_SSE.end)[:-2]]
    assert events[-1]["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "length"}
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events)
    assert text == reply["choices"][0]["message"]["content"]


async def test_openai_refuses_max_tokens_above_the_limit(channel: grpc.aio.Channel) -> None:
    body = {"messages": QUESTION, "max_tokens": 4096}
    status, data = await call_route(channel, "OpenAiChatCompletions", body)
    assert status == "400"
    error = json.loads(data)["error"]
    assert f"at most {MAX_NEW_TOKENS}" in error["message"]


async def test_an_alias_names_the_model_everywhere(channel: grpc.aio.Channel) -> None:
    listed = await pb_grpc.GlmServiceStub(channel).ListModels(pb.ListModelsRequest())
    assert [list(m.aliases) for m in listed.data] == [[ALIAS]]
    status, data = await call_route(
        channel, "LegacyChat", {"model": ALIAS, "messages": QUESTION, "max_tokens": 1}
    )
    assert status == "200", data
    assert json.loads(data)["model"] == CHAT_MODEL  # replies name the model by its id
    gateway = gw_grpc.HttpGatewayServiceStub(channel)
    legacy_models = json.loads((await gateway.LegacyListModels(HttpBody())).data)
    assert legacy_models["data"][0]["aliases"] == [ALIAS]
    openai_models = json.loads((await gateway.OpenAiListModels(HttpBody())).data)
    assert [m["id"] for m in openai_models["data"]] == [CHAT_MODEL, ALIAS]
    retrieved = await gateway.OpenAiRetrieveModel(gw_pb.OpenAiRetrieveModelRequest(model=ALIAS))
    assert json.loads(retrieved.data)["id"] == ALIAS
    call = gateway.OpenAiRetrieveModel(gw_pb.OpenAiRetrieveModelRequest(model="gpt-9"))
    missing = json.loads((await call).data)
    assert dict(await call.initial_metadata())[STATUS_HEADER] == "404"
    assert ALIAS in missing["error"]["message"]  # the names to use

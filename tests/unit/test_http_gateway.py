"""HttpGatewayService's framing, isolated from the models by a scripted GlmService stand-in.

The stand-in yields or raises exactly what a test needs (an error after the first chunk cannot be
provoked on demand with a real model); everything else is real: a grpc.aio server on a free port
and the gateway calling it through HttpBody messages.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

import grpc
import pytest
from google.api.httpbody_pb2 import HttpBody

from glm.v1 import glm_service_pb2 as pb
from glm.v1 import glm_service_pb2_grpc as pb_grpc
from glm.v1 import http_gateway_pb2_grpc as gw_grpc
from server.errors import InvalidArgumentError, ResourceExhaustedError
from server.service.http_gateway import STATUS_HEADER, HttpGatewayService
from server.service.json_api.common import EVENT_STREAM, LEGACY_SSE
from server.transport.grpc_server import Health, build_server


def chunk(text: str, finish: str = "") -> pb.ChatResponse:
    response = pb.ChatResponse(id="chatcmpl-1", object="chat.completion.chunk", model="m")
    response.choices.add(index=0, delta=pb.ChatDelta(content=text), finish_reason=finish)
    if finish:
        response.usage.CopyFrom(pb.Usage(prompt_tokens=3, completion_tokens=2, total_tokens=5))
    return response


class ScriptedService:
    """Plays the part of GlmService.chat according to the last user message."""

    def __init__(self) -> None:
        self.release = asyncio.Event()

    async def chat(
        self,
        request: pb.ChatRequest,
        on_accepted: Callable[[], None] | None = None,
        *,
        prompt: str | None = None,
        cap_max_tokens: bool = False,
    ) -> AsyncGenerator[pb.ChatResponse, None]:
        script = request.messages[-1].content
        if script == "busy":
            raise ResourceExhaustedError("full")
        if script == "queued-then-fail":
            # Accepted, then waits (for the test to let it go), then fails before any token.
            assert on_accepted is not None
            on_accepted()
            await self.release.wait()
            raise InvalidArgumentError("failed while queued")
        yield chunk("Hello")
        if script == "fail-mid-stream":
            raise InvalidArgumentError("went wrong after the first chunk")
        if script == "bug-mid-stream":
            raise ZeroDivisionError("a bug")
        if script == "tool":
            last = chunk("", finish="function_call")
            last.choices[0].delta.function_call.CopyFrom(
                pb.FunctionCall(name="get_weather", arguments='{"city": "Paris"}')
            )
            yield last
            return
        yield chunk(" world", finish="stop")


@pytest.fixture
def service() -> ScriptedService:
    return ScriptedService()


@pytest.fixture(params=[0.0, 0.01], ids=["no-heartbeats", "heartbeats"])
def heartbeat_s(request: pytest.FixtureRequest) -> float:
    """Every test runs with and without heartbeats: they change nothing but a queued wait."""
    return float(request.param)


@pytest.fixture
async def stub(
    service: ScriptedService, heartbeat_s: float
) -> AsyncIterator[gw_grpc.HttpGatewayServiceStub]:
    gateway = HttpGatewayService(service, heartbeat_s=heartbeat_s)  # type: ignore[arg-type]
    # GlmService itself is not under test: the generated base class answers UNIMPLEMENTED.
    server = build_server(
        pb_grpc.GlmServiceServicer(), Health(), max_message_bytes=1 << 20, gateway=gateway
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield gw_grpc.HttpGatewayServiceStub(channel)
    await server.stop(0)


def body(content: str, **extra: object) -> HttpBody:
    payload = {"messages": [{"role": "user", "content": content}], **extra}
    return HttpBody(content_type="application/json", data=json.dumps(payload).encode())


async def read_all(call: Any) -> tuple[str | None, list[HttpBody]]:
    replies = [r async for r in call]
    metadata = await call.initial_metadata()
    return dict(metadata).get(STATUS_HEADER), replies


async def test_stream_is_framed_as_events_ending_in_done(
    stub: gw_grpc.HttpGatewayServiceStub,
) -> None:
    status, replies = await read_all(stub.LegacyChat(body("ok", stream=True)))
    assert status == "200"
    assert replies[0].content_type == EVENT_STREAM == "text/event-stream; charset=utf-8"
    # The legacy framing: each event ends with a CRLF blank line.
    events = b"".join(r.data for r in replies).split(b"\r\n\r\n")
    assert events[-2:] == [b"data: [DONE]", b""]
    first = json.loads(events[0].removeprefix(b"data: "))
    assert first["choices"][0]["delta"]["content"] == "Hello"
    assert first["choices"][0]["finish_reason"] is None


async def test_refusal_before_the_first_byte_gets_its_status(
    stub: gw_grpc.HttpGatewayServiceStub,
) -> None:
    status, replies = await read_all(stub.LegacyChat(body("busy", stream=True)))
    assert status == "429"
    assert len(replies) == 1
    assert replies[0].content_type == "application/json"
    assert json.loads(replies[0].data)["error"]["code"] == "resource_exhausted"


@pytest.mark.parametrize(
    ("script", "code"),
    [("fail-mid-stream", "invalid_argument"), ("bug-mid-stream", "internal")],
)
async def test_errors_mid_stream_arrive_in_band(
    stub: gw_grpc.HttpGatewayServiceStub, script: str, code: str
) -> None:
    status, replies = await read_all(stub.OpenAiChatCompletions(body(script, stream=True)))
    assert status == "200"  # already sent with the first event
    events = [e for e in b"".join(r.data for r in replies).split(b"\n\n") if e]
    first = json.loads(events[0].removeprefix(b"data: "))
    assert first["choices"][0]["delta"]["content"] == "Hello"
    error = json.loads(events[-1].removeprefix(b"data: "))["error"]
    assert error["code"] == code
    assert b"[DONE]" not in b"".join(events)  # a failed stream does not claim completion


async def test_tool_calls_in_openai_and_legacy_shapes(stub: gw_grpc.HttpGatewayServiceStub) -> None:
    _, replies = await read_all(stub.OpenAiChatCompletions(body("tool", stream=True)))
    events = [e for e in b"".join(r.data for r in replies).split(b"\n\n") if e]
    # The last chunk before [DONE] has the finish_reason and an empty delta; the call comes before.
    last = json.loads(events[-2].removeprefix(b"data: "))["choices"][0]
    assert last["finish_reason"] == "tool_calls"
    assert last["delta"] == {}
    choice = json.loads(events[-3].removeprefix(b"data: "))["choices"][0]
    assert choice["finish_reason"] is None
    [call] = choice["delta"]["tool_calls"]
    assert call["index"] == 0
    assert call["type"] == "function"
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert call["id"].startswith("call_")

    _, replies = await read_all(stub.LegacyChat(body("tool", stream=True)))
    events = [e for e in b"".join(r.data for r in replies).split(b"\r\n\r\n") if e]
    legacy_last = json.loads(events[-2].removeprefix(b"data: "))["choices"][0]
    assert legacy_last == {"index": 0, "delta": {}, "finish_reason": "function_call"}
    legacy_call = json.loads(events[-3].removeprefix(b"data: "))["choices"][0]
    assert legacy_call["delta"]["function_call"]["name"] == "get_weather"


async def test_a_queued_stream_that_fails_reports_it(
    stub: gw_grpc.HttpGatewayServiceStub, service: ScriptedService, heartbeat_s: float
) -> None:
    call = stub.LegacyChat(body("queued-then-fail", stream=True))
    replies = call.__aiter__()
    if heartbeat_s:
        # Waiting: the 200 and comments are out, so the error can only arrive in-band.
        for _ in range(2):
            assert (await anext(replies)).data == LEGACY_SSE.heartbeat
        assert dict(await call.initial_metadata()).get(STATUS_HEADER) == "200"
    service.release.set()
    rest = [r.data async for r in replies]
    events = [e for e in rest if e != LEGACY_SSE.heartbeat]
    assert len(events) == 1
    if heartbeat_s:
        events[0] = events[0].removeprefix(b"data: ").removesuffix(LEGACY_SSE.end)
    else:  # nothing was sent before: the error has its own status
        # The legacy routes answer a refused request as FastAPI's validation did: 422.
        assert dict(await call.initial_metadata()).get(STATUS_HEADER) == "422"
        assert json.loads(events[0])["detail"][0]["msg"] == "failed while queued"
    error = json.loads(events[0])["error"]
    assert error == {
        "message": "failed while queued",
        "type": "invalid_request_error",
        "param": None,
        "code": "invalid_argument",
    }

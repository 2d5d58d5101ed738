"""The error interceptor: domain errors become their statuses, bugs become INTERNAL and are logged.

A deliberately broken servicer isolates the interceptor from the models.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from glm.v1 import glm_service_pb2 as pb
from glm.v1 import glm_service_pb2_grpc as pb_grpc
from server.errors import (
    MESSAGE_MAX_CHARS,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    UnavailableError,
)
from server.transport.grpc_server import Health, build_server

DOMAIN_ERRORS = {
    "invalid": (InvalidArgumentError("bad"), grpc.StatusCode.INVALID_ARGUMENT),
    "missing": (NotFoundError("no such"), grpc.StatusCode.NOT_FOUND),
    "wrong-kind": (FailedPreconditionError("wrong"), grpc.StatusCode.FAILED_PRECONDITION),
    "busy": (ResourceExhaustedError("full"), grpc.StatusCode.RESOURCE_EXHAUSTED),
    "loading": (UnavailableError("later"), grpc.StatusCode.UNAVAILABLE),
}


class BrokenService(pb_grpc.GlmServiceServicer):
    """Raises the error its request names: a domain error by key, or a bug."""

    async def Tokenize(self, request: pb.TokenizeRequest, context: Any) -> pb.TokenizeResponse:
        if request.prompt in DOMAIN_ERRORS:
            raise DOMAIN_ERRORS[request.prompt][0]
        if request.prompt == "bug":
            raise KeyError("a bug")
        if request.prompt == "long":
            raise InvalidArgumentError("quoting everything: " + "v" * 200_000)
        return pb.TokenizeResponse(tokens=[request.prompt])

    async def Chat(self, request: pb.ChatRequest, context: Any) -> AsyncIterator[pb.ChatResponse]:
        yield pb.ChatResponse(id="first")
        if request.model == "bug":
            raise ZeroDivisionError("mid-stream bug")
        raise InvalidArgumentError("mid-stream bad input")


@pytest.fixture
async def channel() -> AsyncIterator[grpc.aio.Channel]:
    server = build_server(BrokenService(), Health(), max_message_bytes=1 << 20)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield channel
    await server.stop(0)


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> pb_grpc.GlmServiceStub:
    return pb_grpc.GlmServiceStub(channel)


@pytest.mark.parametrize("key", sorted(DOMAIN_ERRORS))
async def test_domain_errors_map_to_their_status(stub: pb_grpc.GlmServiceStub, key: str) -> None:
    error, code = DOMAIN_ERRORS[key]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Tokenize(pb.TokenizeRequest(prompt=key))
    assert err.value.code() == code
    assert err.value.details() == str(error)


async def test_bugs_become_internal_and_are_logged(
    stub: pb_grpc.GlmServiceStub, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        caplog.at_level(logging.ERROR, logger="server.requests"),
        pytest.raises(grpc.aio.AioRpcError) as err,
    ):
        await stub.Tokenize(pb.TokenizeRequest(prompt="bug"))
    assert err.value.code() == grpc.StatusCode.INTERNAL
    details = err.value.details() or ""
    assert "a bug" not in details  # internals stay in the log
    incident = details.split()[2].rstrip(";")
    logged = [r for r in caplog.records if incident in r.getMessage()]
    assert logged
    assert logged[0].exc_info is not None


async def test_errors_in_the_middle_of_a_stream(stub: pb_grpc.GlmServiceStub) -> None:
    for model, code in (("", grpc.StatusCode.INVALID_ARGUMENT), ("bug", grpc.StatusCode.INTERNAL)):
        call = stub.Chat(pb.ChatRequest(model=model))
        first = await call.read()
        assert first.id == "first"
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call.read()
        assert err.value.code() == code


async def test_the_server_keeps_serving_after_errors(stub: pb_grpc.GlmServiceStub) -> None:
    for key in [*DOMAIN_ERRORS, "bug"]:
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.Tokenize(pb.TokenizeRequest(prompt=key))
    ok = await stub.Tokenize(pb.TokenizeRequest(prompt="fine"))
    assert list(ok.tokens) == ["fine"]


async def test_messages_are_cut_short_whatever_they_quote(stub: pb_grpc.GlmServiceStub) -> None:
    # A whole 200 KB value in grpc-message made proxies drop the connection every call shares.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Tokenize(pb.TokenizeRequest(prompt="long"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = err.value.details() or ""
    assert details.startswith("quoting everything: vvv")
    assert len(details) <= MESSAGE_MAX_CHARS + 50


def raw(data: bytes) -> bytes:
    return data


@pytest.mark.parametrize(
    "data",
    [b"\xff\xff\xff", b"\x0a\x02\xff\xfe", b"\x08"],
    ids=["corrupt", "bad-utf8", "truncated"],
)
async def test_undecodable_request_bytes_are_invalid_argument(
    stub: pb_grpc.GlmServiceStub, channel: grpc.aio.Channel, data: bytes
) -> None:
    # gRPC itself answers UNKNOWN, naming protobuf's DecodeError class.
    tokenize = channel.unary_unary(
        "/glm.v1.GlmService/Tokenize", request_serializer=raw, response_deserializer=raw
    )
    chat = channel.unary_stream(
        "/glm.v1.GlmService/Chat", request_serializer=raw, response_deserializer=raw
    )
    with pytest.raises(grpc.aio.AioRpcError) as unary:
        await tokenize(data)
    with pytest.raises(grpc.aio.AioRpcError) as streaming:
        async for _ in chat(data):
            pass
    for err, rpc in ((unary, "Tokenize"), (streaming, "Chat")):
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        details = err.value.details() or ""
        assert details.startswith(f"the request is not a valid message for glm.v1.GlmService/{rpc}")
        assert "<class" not in details
    # And the next call is served.
    ok = await stub.Tokenize(pb.TokenizeRequest(prompt="fine"))
    assert list(ok.tokens) == ["fine"]

"""Every bad request gets its status and a message that says what to fix; others keep working."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from glm.v1 import glm_service_pb2 as pb
from glm.v1 import glm_service_pb2_grpc as pb_grpc
from tests.conftest import chat_error

Code = grpc.StatusCode


def msg(role: str, content: str = "hi") -> pb.ChatMessage:
    return pb.ChatMessage(role=role, content=content)


CHAT_CASES = [
    (pb.ChatRequest(), Code.INVALID_ARGUMENT, "messages must hold at least one"),
    (pb.ChatRequest(messages=[msg("robot")]), Code.INVALID_ARGUMENT, "messages[0].role is 'robot'"),
    (
        pb.ChatRequest(messages=[msg("user"), msg("assistant")]),
        Code.INVALID_ARGUMENT,
        "last message must come from 'user' or 'observation'",
    ),
    (pb.ChatRequest(messages=[msg("user")], temperature=2.5), Code.INVALID_ARGUMENT, "temperature"),
    (pb.ChatRequest(messages=[msg("user")], temperature=-1), Code.INVALID_ARGUMENT, "temperature"),
    (pb.ChatRequest(messages=[msg("user")], top_p=0.0), Code.INVALID_ARGUMENT, "top_p"),
    (pb.ChatRequest(messages=[msg("user")], top_p=1.5), Code.INVALID_ARGUMENT, "top_p"),
    (pb.ChatRequest(messages=[msg("user")], top_k=-3), Code.INVALID_ARGUMENT, "top_k"),
    (
        pb.ChatRequest(messages=[msg("user")], repetition_penalty=0),
        Code.INVALID_ARGUMENT,
        "repetition_penalty",
    ),
    (pb.ChatRequest(messages=[msg("user")], max_tokens=0), Code.INVALID_ARGUMENT, "max_tokens"),
    (
        pb.ChatRequest(messages=[msg("user")], max_tokens=5000),
        Code.INVALID_ARGUMENT,
        "at most 1024 tokens per request (max_new_tokens)",
    ),
    (
        pb.ChatRequest(messages=[msg("user", "word " * 5000)]),
        Code.INVALID_ARGUMENT,
        "at most 4096 input tokens (max_input_tokens)",
    ),
    (pb.ChatRequest(messages=[msg("user")], stop=[""]), Code.INVALID_ARGUMENT, "stop[0]"),
    (
        pb.ChatRequest(messages=[msg("user")], stop_token_ids=[-1]),
        Code.INVALID_ARGUMENT,
        "stop_token_ids[0]",
    ),
    (
        pb.ChatRequest(
            messages=[msg("user")],
            tools=[pb.Tool(type="function", function=pb.FunctionDefinition(name="get_weather"))],
        ),
        Code.FAILED_PRECONDITION,
        "has no tool format",
    ),
    (
        pb.ChatRequest(
            messages=[msg("user")],
            tools=[pb.Tool(type="function", function=pb.FunctionDefinition(name="bad name!"))],
        ),
        Code.INVALID_ARGUMENT,
        "tools[0].function.name",
    ),
    (
        pb.ChatRequest(
            messages=[
                pb.ChatMessage(
                    role="user",
                    content="hi",
                    function_call=pb.FunctionCall(name="get_weather", arguments="{}"),
                )
            ]
        ),
        Code.INVALID_ARGUMENT,
        "only assistant messages carry a function_call",
    ),
    (
        pb.ChatRequest(model="gpt-5", messages=[msg("user")]),
        Code.NOT_FOUND,
        "unknown model 'gpt-5'; available models: all-minilm-l6-v2, smollm2-135m-instruct",
    ),
    (
        pb.ChatRequest(model="all-minilm-l6-v2", messages=[msg("user")]),
        Code.FAILED_PRECONDITION,
        "is an embedding model, not a chat model; choose one of: smollm2-135m-instruct",
    ),
]


@pytest.mark.parametrize(("request_", "code", "text"), CHAT_CASES)
async def test_chat_errors(
    stub: pb_grpc.GlmServiceStub, request_: pb.ChatRequest, code: grpc.StatusCode, text: str
) -> None:
    error = await chat_error(stub, request_)
    assert error.code() == code
    assert text in (error.details() or "")


EMBED_CASES = [
    (pb.EmbedRequest(), Code.INVALID_ARGUMENT, "prompt must hold at least one text"),
    (pb.EmbedRequest(prompt=["ok", "  "]), Code.INVALID_ARGUMENT, "prompt[1] is empty"),
    (
        pb.EmbedRequest(prompt=["x"] * 257),
        Code.INVALID_ARGUMENT,
        "at most 256 per call (max_batch_prompts)",
    ),
    (pb.EmbedRequest(model="nope", prompt=["x"]), Code.NOT_FOUND, "unknown model 'nope'"),
    (
        pb.EmbedRequest(model="smollm2-135m-instruct", prompt=["x"]),
        Code.FAILED_PRECONDITION,
        "is a chat model, not an embedding model",
    ),
]


@pytest.mark.parametrize(("request_", "code", "text"), EMBED_CASES)
async def test_embed_errors(
    stub: pb_grpc.GlmServiceStub, request_: pb.EmbedRequest, code: grpc.StatusCode, text: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Embed(request_)
    assert err.value.code() == code
    assert text in (err.value.details() or "")


async def test_tokenize_errors(stub: pb_grpc.GlmServiceStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Tokenize(pb.TokenizeRequest(prompt="x", max_tokens=0))
    assert err.value.code() == Code.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Tokenize(pb.TokenizeRequest(prompt="x", model="nope"))
    assert err.value.code() == Code.NOT_FOUND


async def test_message_larger_than_the_limit_is_refused(stub: pb_grpc.GlmServiceStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Tokenize(pb.TokenizeRequest(prompt="x" * (17 * 1024 * 1024)))
    assert err.value.code() == Code.RESOURCE_EXHAUSTED


async def test_bad_requests_do_not_disturb_a_running_stream(stub: pb_grpc.GlmServiceStub) -> None:
    good = pb.ChatRequest(
        messages=[msg("user", "Name three fruits.")], temperature=0, max_tokens=12
    )
    alone = [c async for c in stub.Chat(good)]
    stream = stub.Chat(good)
    bad = [pb.ChatRequest(), pb.ChatRequest(model="nope", messages=[msg("user")])]
    errors = await asyncio.gather(*(chat_error(stub, b) for b in bad * 4))
    together = [c async for c in stream]
    assert {e.code() for e in errors} == {Code.INVALID_ARGUMENT, Code.NOT_FOUND}
    text = "".join(c.choices[0].delta.content for c in together)
    assert text == "".join(c.choices[0].delta.content for c in alone)

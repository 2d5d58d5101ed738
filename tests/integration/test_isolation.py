"""No request can harm another: bounded identifiers and texts, short error messages, and one
request's tokenization never holding up the others' decode steps (a real server, real models)."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from google.api.httpbody_pb2 import HttpBody

from glm.v1 import glm_service_pb2 as pb
from glm.v1 import glm_service_pb2_grpc as pb_grpc
from glm.v1 import http_gateway_pb2_grpc as gw_grpc
from server.app import GlmApp
from server.config import DEFAULT_MAX_INPUT_CHARS, MAX_MODEL_ID_CHARS
from server.engine.threads import run_in_fresh_thread
from server.errors import MESSAGE_MAX_CHARS
from server.models.causal_lm import TransformersChatModel
from server.service.convert import MAX_ROLE_CHARS
from server.service.http_gateway import STATUS_HEADER
from tests.conftest import chat_error

Code = grpc.StatusCode
CHAT_MODEL = "smollm2-135m-instruct"
EMBED_MODEL = "all-minilm-l6-v2"


def user(content: str = "hi", role: str = "user") -> pb.ChatMessage:
    return pb.ChatMessage(role=role, content=content)


async def unary_error(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    return err.value


# -- identifiers are bounded before use, and quoted short ------------------------------------


async def test_a_20_kb_model_id_is_refused_by_its_length(stub: pb_grpc.GlmServiceStub) -> None:
    # Quoted whole, the id made a grpc-message larger than the client takes: RESOURCE_EXHAUSTED.
    model = "m" * 20_000
    errors = [
        await unary_error(stub.Embed(pb.EmbedRequest(model=model, prompt=["x"]))),
        await unary_error(stub.Tokenize(pb.TokenizeRequest(model=model, prompt="x"))),
        await chat_error(stub, pb.ChatRequest(model=model, messages=[user()])),
    ]
    for error in errors:
        assert error.code() == Code.INVALID_ARGUMENT
        details = error.details() or ""
        assert f"at most {MAX_MODEL_ID_CHARS}" in details
        assert "m" * 200 not in details


async def test_an_unknown_model_id_is_quoted_cut_short(stub: pb_grpc.GlmServiceStub) -> None:
    model = "x" * MAX_MODEL_ID_CHARS  # as long as allowed, and unknown
    error = await unary_error(stub.Tokenize(pb.TokenizeRequest(model=model, prompt="x")))
    assert error.code() == Code.NOT_FOUND
    details = error.details() or ""
    assert "unknown model 'xxxx" in details
    assert f"({MAX_MODEL_ID_CHARS} characters)" in details
    assert model not in details


async def test_a_100_kb_role_is_refused_by_its_length(stub: pb_grpc.GlmServiceStub) -> None:
    error = await chat_error(stub, pb.ChatRequest(messages=[user(role="r" * 100_000)]))
    assert error.code() == Code.INVALID_ARGUMENT
    details = error.details() or ""
    assert f"messages[0].role is 100000 characters long; roles are at most {MAX_ROLE_CHARS}" in (
        details
    )
    assert len(details) < 300


async def test_unknown_roles_and_tool_types_are_quoted_cut_short(
    stub: pb_grpc.GlmServiceStub,
) -> None:
    role = "r" * MAX_ROLE_CHARS
    error = await chat_error(stub, pb.ChatRequest(messages=[user(role=role)]))
    assert error.code() == Code.INVALID_ARGUMENT
    assert f"messages[0].role is {role!r}" in (error.details() or "")
    tool = pb.Tool(type="t" * 50_000, function=pb.FunctionDefinition(name="get_weather"))
    error = await chat_error(stub, pb.ChatRequest(messages=[user()], tools=[tool]))
    assert error.code() == Code.INVALID_ARGUMENT
    assert "(50000 characters)" in (error.details() or "")
    assert len(error.details() or "") < 300


async def test_json_routes_quote_values_cut_short(channel: grpc.aio.Channel) -> None:
    gateway = gw_grpc.HttpGatewayServiceStub(channel)
    body = {"model": "gpt", "messages": [{"role": "r" * 100_000, "content": "hi"}]}
    call = gateway.OpenAiChatCompletions(HttpBody(data=json.dumps(body).encode()))
    replies = [r async for r in call]
    error = json.loads(replies[0].data)["error"]
    assert f"roles are at most {MAX_ROLE_CHARS}" in error["message"]
    # An unknown key quoted by protobuf's JSON parser: the whole message is cut.
    body = {"k" * 100_000: 1}
    replies = [r async for r in gateway.LegacyChat(HttpBody(data=json.dumps(body).encode()))]
    error = json.loads(replies[0].data)["error"]
    assert error["code"] == "invalid_argument"
    assert len(error["message"]) <= MESSAGE_MAX_CHARS + 50


# -- text sizes are bounded before tokenizing, per model -------------------------------------


async def test_texts_over_max_input_chars_are_refused(stub: pb_grpc.GlmServiceStub) -> None:
    over = "a" * (DEFAULT_MAX_INPUT_CHARS + 1)
    half = "b" * (DEFAULT_MAX_INPUT_CHARS // 2 + 1)
    errors = [
        await unary_error(stub.Tokenize(pb.TokenizeRequest(prompt=over))),
        # The limit is on a call's texts together, not on each.
        await unary_error(stub.Embed(pb.EmbedRequest(prompt=[half, half]))),
        await chat_error(stub, pb.ChatRequest(messages=[user(half), user(half)])),
    ]
    for error in errors:
        assert error.code() == Code.INVALID_ARGUMENT
        assert f"at most {DEFAULT_MAX_INPUT_CHARS} per request (max_input_chars)" in (
            error.details() or ""
        )


async def test_a_text_of_max_input_chars_is_served(stub: pb_grpc.GlmServiceStub) -> None:
    text = ("The quick brown fox jumps over the lazy dog. " * 6000)[:DEFAULT_MAX_INPUT_CHARS]
    tokens = await stub.Tokenize(pb.TokenizeRequest(prompt=text, max_tokens=10))
    assert tokens.truncated
    # Both lists are cut to max_tokens: a long text no longer makes a reply of all its pieces.
    assert len(tokens.token_ids) == len(tokens.tokens) == 10
    embedded = await stub.Embed(pb.EmbedRequest(prompt=[text]))
    assert embedded.usage.prompt_tokens == 256


# -- one request's tokenization never holds up the others' decode steps ----------------------


class _GatedTokenizer:
    """A tokenizer whose calls wait at a gate: a tokenization that takes as long as a test
    wants. Everything else is the real tokenizer's."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.entered = threading.Event()
        self.gate = threading.Event()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.entered.set()
        self.gate.wait(timeout=120)
        return self._inner(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


@pytest.fixture
def gated_tokenizer(glm_app: GlmApp, monkeypatch: pytest.MonkeyPatch) -> Iterator[_GatedTokenizer]:
    model = glm_app.registry.any_model(CHAT_MODEL)[1]
    assert isinstance(model, TransformersChatModel)
    gated = _GatedTokenizer(model._tokenizer)
    # Only what requests tokenize with is gated; the scheduler's decoding is not touched.
    monkeypatch.setattr(model, "_tokenizer", gated)
    yield gated
    gated.gate.set()


async def test_decode_steps_go_on_while_a_tokenization_runs(
    stub: pb_grpc.GlmServiceStub, glm_app: GlmApp, gated_tokenizer: _GatedTokenizer
) -> None:
    # The chat model's tokenizer once served Tokenize, prompts and the scheduler's decoding under
    # one lock: a long Tokenize held every running stream up for its whole length.
    stream = stub.Chat(
        pb.ChatRequest(
            messages=[user("Tell me a long story about a dragon.")], temperature=0, max_tokens=60
        )
    )
    chunks = stream.__aiter__()
    await anext(chunks)  # the prompt is tokenized and the stream is decoding
    tokenize = asyncio.ensure_future(stub.Tokenize(pb.TokenizeRequest(prompt="hello there")))
    assert await asyncio.to_thread(gated_tokenizer.entered.wait, 60)
    _, engine = glm_app.registry.chat(CHAT_MODEL)
    before = engine.counters.decode_passes
    received = 0
    try:
        # Counted in steps, not seconds: the stream goes on while the tokenization is stuck.
        async with asyncio.timeout(120):
            while received < 10:
                await anext(chunks)
                received += 1
        assert not tokenize.done()
        assert engine.counters.decode_passes >= before + 10
    finally:
        gated_tokenizer.gate.set()
    assert (await tokenize).token_ids
    async for _ in chunks:
        pass


async def test_long_embedding_prompts_reach_their_pass_cut_short(
    glm_app: GlmApp, stub: pb_grpc.GlmServiceStub, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Passes run on the chat scheduler's thread: a whole long text tokenized there held every
    # chat sequence up; it is cut (on a worker thread) to little more than the model reads.
    _, _, model = glm_app.registry.embedder(EMBED_MODEL)
    texts = [
        "The quick brown fox jumps over the lazy dog. " * 4000,
        "naïve café, 你好世界 " * 3000,
        "short",
    ]
    counts, clipped = model.clip(texts)
    assert counts == model.count_tokens(texts)
    assert max(len(t) for t in clipped[:2]) < 5000
    assert clipped[2] == "short"
    whole, cut = await run_in_fresh_thread(lambda: (model.encode(texts), model.encode(clipped)))
    np.testing.assert_array_equal(whole, cut)  # the model reads the same tokens

    seen: list[int] = []
    encode = model.encode

    def recording(batch: Any) -> Any:
        seen.extend(len(t) for t in batch)
        return encode(batch)

    monkeypatch.setattr(model, "encode", recording)
    response = await stub.Embed(pb.EmbedRequest(prompt=texts[:1]))
    assert response.usage.prompt_tokens == 256
    assert seen
    assert max(seen) < 5000


async def test_list_models_publishes_max_input_chars(channel: grpc.aio.Channel) -> None:
    gateway = gw_grpc.HttpGatewayServiceStub(channel)
    reply = await gateway.LegacyListModels(HttpBody())
    models = json.loads(reply.data)["data"]
    assert {m["id"]: m["max_input_chars"] for m in models} == {
        CHAT_MODEL: DEFAULT_MAX_INPUT_CHARS,
        EMBED_MODEL: DEFAULT_MAX_INPUT_CHARS,
    }


# -- bad bytes and bad JSON are the client's errors -----------------------------------------


async def test_undecodable_request_bytes_are_invalid_argument(channel: grpc.aio.Channel) -> None:
    def raw(data: bytes) -> bytes:
        return data

    embed = channel.unary_unary(
        "/glm.v1.GlmService/Embed", request_serializer=raw, response_deserializer=raw
    )
    chat = channel.unary_stream(
        "/glm.v1.GlmService/Chat", request_serializer=raw, response_deserializer=raw
    )
    errors = [
        await unary_error(embed(b"\xff\xff\xff")),
        await unary_error(embed(b"\x0a\x02\xff\xfe")),
    ]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in chat(b"\xff\xff\xff"):
            pass
    errors.append(err.value)
    for error in errors:
        assert error.code() == Code.INVALID_ARGUMENT
        details = error.details() or ""
        assert "the request is not a valid message for glm.v1.GlmService/" in details
        assert "<class" not in details


@pytest.mark.parametrize(
    ("method", "body", "text"),
    [
        ("OpenAiEmbeddings", b"[" * 100_000, "too deeply"),
        ("OpenAiChatCompletions", b'{"messages": ' + b"[" * 100_000, "too deeply"),
        ("LegacyChat", b'{"messages": ' + b"[" * 100_000, "too deeply"),
        (
            "LegacyTokenize",
            b'{"prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}",
            "too many digits",
        ),
        ("OpenAiEmbeddings", b'{"input": "x", "dimensions": ' + b"9" * 5000 + b"}", "too many"),
        ("OpenAiChatCompletions", b'{"messages": [], "max_tokens": ' + b"9" * 400 + b"}", "range"),
        ("OpenAiChatCompletions", b'{"messages": [], "temperature": ' + b"9" * 400 + b"}", "float"),
        ("OpenAiEmbeddings", b'{"input": "a\\ud800b"}', "lone UTF-16 surrogate"),
        (
            "OpenAiChatCompletions",
            b'{"messages": [{"role": "user", "content": "\\udc00"}]}',
            "lone UTF-16 surrogate",
        ),
        ("LegacyEmbedding", b'{"prompt": ["\\ud800"]}', "lone UTF-16 surrogate"),
        ("LegacyChat", b'{"messages": [{"role": "user", "content": "\\ud800"}]}', "surrogate"),
        ("LegacyTokenize", b'{"prompt": "\\ud800"}', "lone UTF-16 surrogate"),
    ],
)
async def test_hostile_json_is_a_400(
    channel: grpc.aio.Channel, method: str, body: bytes, text: str
) -> None:
    gateway = gw_grpc.HttpGatewayServiceStub(channel)
    call = getattr(gateway, method)(HttpBody(content_type="application/json", data=body))
    if method in ("LegacyChat", "OpenAiChatCompletions"):
        replies = [r async for r in call]
    else:
        replies = [await call]
    # The legacy routes answer what FastAPI could not parse with 422 and a `detail` list.
    legacy = method.startswith("Legacy")
    assert dict(await call.initial_metadata()).get(STATUS_HEADER) == ("422" if legacy else "400")
    reply = json.loads(replies[0].data)
    error = reply["error"]
    assert error["code"] == "invalid_argument"
    assert text in error["message"]
    if legacy:
        assert text in reply["detail"][0]["msg"]


async def test_a_surrogate_pair_is_text(channel: grpc.aio.Channel) -> None:
    gateway = gw_grpc.HttpGatewayServiceStub(channel)
    reply = await gateway.LegacyTokenize(HttpBody(data=b'{"prompt": "\\ud83d\\ude00"}'))
    assert json.loads(reply.data)["tokenIds"]


@pytest.mark.parametrize(
    "content_type", ["application/grpc", "application/grpc+proto", "application/x-glm-grpc"]
)
async def test_json_routes_refuse_grpc_content_types(
    channel: grpc.aio.Channel, content_type: str
) -> None:
    gateway = gw_grpc.HttpGatewayServiceStub(channel)
    call = gateway.LegacyTokenize(HttpBody(content_type=content_type, data=b'{"prompt": "hi"}'))
    reply = await call
    assert dict(await call.initial_metadata()).get(STATUS_HEADER) == "415"
    error = json.loads(reply.data)["error"]
    assert "/tokenize takes a JSON body (Content-Type: application/json)" in error["message"]
    # Any other content type is read as JSON, as the legacy API did (curl -d sends a form type).
    reply = await gateway.LegacyTokenize(
        HttpBody(content_type="application/x-www-form-urlencoded", data=b'{"prompt": "hi"}')
    )
    assert json.loads(reply.data)["tokenIds"]

"""Chat on a real server with the real SmolLM2 model: streams, modes, stops, usage, concurrency."""

from __future__ import annotations

import asyncio
import itertools

import grpc
import pytest

from glm.v1 import glm_service_pb2 as pb
from glm.v1 import glm_service_pb2_grpc as pb_grpc
from server.app import GlmApp
from server.domain import ChatMessage, Role

QUESTION = "What is the capital of France?"


def chat_request(content: str = QUESTION, **kwargs: object) -> pb.ChatRequest:
    """A one-message greedy request unless kwargs say otherwise."""
    kwargs.setdefault("temperature", 0.0)
    kwargs.setdefault("max_tokens", 16)
    return pb.ChatRequest(messages=[pb.ChatMessage(role="user", content=content)], **kwargs)  # type: ignore[arg-type]


async def collect(stub: pb_grpc.GlmServiceStub, request: pb.ChatRequest) -> list[pb.ChatResponse]:
    return [r async for r in stub.Chat(request)]


def joined(chunks: list[pb.ChatResponse]) -> str:
    return "".join(c.choices[0].delta.content for c in chunks)


async def test_stream_shape(stub: pb_grpc.GlmServiceStub) -> None:
    chunks = await collect(stub, chat_request(max_tokens=24))
    assert len(chunks) >= 2
    assert {c.id for c in chunks} == {chunks[0].id}
    assert chunks[0].id.startswith("chatcmpl-")
    assert {c.created for c in chunks} == {chunks[0].created}
    assert chunks[0].created > 0
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert {c.model for c in chunks} == {"smollm2-135m-instruct"}
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role == "" for c in chunks[1:])
    assert all(c.choices[0].finish_reason == "" for c in chunks[:-1])
    assert all(not c.HasField("usage") for c in chunks[:-1])
    last = chunks[-1]
    assert last.choices[0].finish_reason in ("stop", "length")
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens
    assert "Paris" in joined(chunks)
    assert "<|im_end|>" not in joined(chunks)


async def test_chunk_false_sends_whole_text_so_far(stub: pb_grpc.GlmServiceStub) -> None:
    deltas = await collect(stub, chat_request(chunk=True))
    wholes = await collect(stub, chat_request(chunk=False))
    texts = [c.choices[0].delta.content for c in wholes]
    # Each chunk repeats the previous text and extends it; the last is the whole reply.
    for before, after in itertools.pairwise(texts):
        assert after.startswith(before)
    assert texts[-1] == joined(deltas)
    assert len(texts) > 2
    assert texts[1] != texts[-1]


async def test_stream_false_sends_one_completion(stub: pb_grpc.GlmServiceStub) -> None:
    streamed = joined(await collect(stub, chat_request()))
    responses = await collect(stub, chat_request(stream=False))
    assert len(responses) == 1
    only = responses[0]
    assert only.object == "chat.completion"
    assert only.choices[0].message.role == "assistant"
    assert only.choices[0].message.content == streamed
    assert only.choices[0].finish_reason in ("stop", "length")
    assert only.usage.completion_tokens > 0


async def test_max_tokens_gives_length_and_usage_matches_tokenize(
    stub: pb_grpc.GlmServiceStub,
) -> None:
    chunks = await collect(stub, chat_request("Count from one to twenty in words.", max_tokens=7))
    last = chunks[-1]
    assert last.choices[0].finish_reason == "length"
    assert last.usage.completion_tokens == 7
    # The reply's text re-tokenizes to the tokens that were generated (SmolLM2 adds no prefix).
    tokens = await stub.Tokenize(pb.TokenizeRequest(prompt=joined(chunks)))
    assert len(tokens.token_ids) == last.usage.completion_tokens


async def test_prompt_tokens_count_the_templated_prompt(
    stub: pb_grpc.GlmServiceStub, glm_app: GlmApp
) -> None:
    last = (await collect(stub, chat_request(max_tokens=1)))[-1]
    _, model = glm_app.registry.any_model("smollm2-135m-instruct")
    expected = model.build_prompt([ChatMessage(Role.USER, QUESTION)])  # type: ignore[attr-defined]
    assert last.usage.prompt_tokens == len(expected)
    longer = (await collect(stub, chat_request(QUESTION + " Answer briefly.", max_tokens=1)))[-1]
    assert longer.usage.prompt_tokens > last.usage.prompt_tokens


async def test_stop_string_ends_reply_and_is_not_shown(stub: pb_grpc.GlmServiceStub) -> None:
    full = joined(await collect(stub, chat_request(max_tokens=24)))
    assert "Paris" in full
    chunks = await collect(stub, chat_request(max_tokens=24, stop=["Paris"]))
    text = joined(chunks)
    assert text == full[: full.index("Paris")]
    assert chunks[-1].choices[0].finish_reason == "stop"


async def test_stop_string_inside_a_token(stub: pb_grpc.GlmServiceStub) -> None:
    full = joined(await collect(stub, chat_request(max_tokens=24)))
    cut = full.index("Paris") + 2  # "Pa" starts a stop string in the middle of a token
    chunks = await collect(stub, chat_request(max_tokens=24, stop=["ris"]))
    assert joined(chunks) == full[:cut]
    assert chunks[-1].choices[0].finish_reason == "stop"


async def test_stop_token_ids_end_the_reply(stub: pb_grpc.GlmServiceStub) -> None:
    full = await collect(stub, chat_request(max_tokens=24))
    text = joined(full)
    ids = (await stub.Tokenize(pb.TokenizeRequest(prompt=text))).token_ids
    # Stop on the third generated token: the reply is then the first two tokens.
    chunks = await collect(stub, chat_request(max_tokens=24, stop_token_ids=[ids[2]]))
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert chunks[-1].usage.completion_tokens == 3
    short = joined(chunks)
    assert text.startswith(short)
    assert len(short) < len(text)


async def test_seed_makes_sampling_reproducible(stub: pb_grpc.GlmServiceStub) -> None:
    def sampled(seed: int) -> pb.ChatRequest:
        return chat_request(
            "Write a short poem about the sea.", temperature=1.0, seed=seed, max_tokens=20
        )

    a = joined(await collect(stub, sampled(1234)))
    b = joined(await collect(stub, sampled(1234)))
    others = {joined(await collect(stub, sampled(s))) for s in (1, 2, 3)}
    assert a == b
    assert len(others | {a}) > 1


async def test_concurrent_streams_match_sequential(stub: pb_grpc.GlmServiceStub) -> None:
    prompts = [
        QUESTION,
        "Name three colours.",
        "What is two plus two?",
        "Say hello in Spanish.",
    ]
    alone = [joined(await collect(stub, chat_request(p, max_tokens=12))) for p in prompts]
    together = await asyncio.gather(
        *(collect(stub, chat_request(p, max_tokens=12)) for p in prompts)
    )
    assert [joined(c) for c in together] == alone
    assert len(set(alone)) == len(alone)


async def test_non_ascii_text_streams_whole_characters(stub: pb_grpc.GlmServiceStub) -> None:
    chunks = await collect(
        stub, chat_request("Repeat exactly: café, naïve, 東京, 😀", max_tokens=40)
    )
    for chunk in chunks:
        assert "\ufffd" not in chunk.choices[0].delta.content


async def test_chat_and_embed_and_tokenize_run_side_by_side(stub: pb_grpc.GlmServiceStub) -> None:
    """A long generation does not hold up unary calls: they finish while it still runs."""
    stream = stub.Chat(chat_request("Tell me a long story about a dragon.", max_tokens=200))
    first = await stream.read()
    assert first.choices[0].delta.role == "assistant"
    embed = await stub.Embed(pb.EmbedRequest(prompt=["hello"]))
    tokens = await stub.Tokenize(pb.TokenizeRequest(prompt="hello"))
    next_chunk = await stream.read()
    assert next_chunk.choices[0].finish_reason == ""  # the story is still being told
    assert embed.dimensions == 384
    assert tokens.token_ids
    stream.cancel()


@pytest.mark.parametrize("role", ["observation"])
async def test_observation_may_end_the_conversation(
    stub: pb_grpc.GlmServiceStub, role: str
) -> None:
    request = pb.ChatRequest(
        messages=[
            pb.ChatMessage(role="system", content="You are a weather bot."),
            pb.ChatMessage(role="user", content="Weather in Paris?"),
            pb.ChatMessage(role="assistant", content="Let me check."),
            pb.ChatMessage(role=role, content="Sunny, 21 degrees."),
        ],
        temperature=0.0,
        max_tokens=8,
    )
    chunks = await collect(stub, request)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


async def test_deadline_while_generating_is_reported(stub: pb_grpc.GlmServiceStub) -> None:
    request = chat_request("Tell me a long story.", max_tokens=500)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        _ = [r async for r in stub.Chat(request, timeout=0.5)]
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

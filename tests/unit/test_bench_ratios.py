"""The chat and embed parts' ratios and targets, from synthetic samples with known answers.

Running the server and the in-process models is the benchmark's job (`make bench`), not the
test suite's.
"""

from __future__ import annotations

import pytest

from bench.chat import ChatResults, RawRun, StreamRun, TtftPair
from bench.defaults import (
    CHAT_ADDED_TTFT_MS_TARGET,
    CHAT_TOK_S_RATIO_TARGET,
    EMBED_RATIO_TARGET,
    EMBED_WHOLE_SET_RATIO_TARGET,
)
from bench.embed import EmbedResults


def _stream(seconds: float, text: str = "same") -> StreamRun:
    return StreamRun(0.1, seconds, 100, 40, "length", text)


def test_the_chat_ratio_is_the_median_of_back_to_back_pairs() -> None:
    results = ChatResults(prompt="p", tokens=100, prompt_tokens=40, dtype="float32")
    # Pairs (in-process tok/s, server tok/s): (10, 30), (20, 15), (30, 25): ratios 3, 0.75,
    # 0.83; the medians' ratio would be 25 / 20.
    results.raw = [RawRun(100 / 10, 100), RawRun(100 / 20, 100), RawRun(100 / 30, 100)]
    results.server = [_stream(100 / 30), _stream(100 / 15), _stream(100 / 25)]
    results.raw_text = "same"
    results.ttft = [TtftPair(0.100, 0.130), TtftPair(0.120, 0.125), TtftPair(0.090, 0.100)]
    assert results.tok_s_ratio == pytest.approx(25 / 30)
    assert results.added_ttft_ms == pytest.approx(10.0)
    assert results.outputs_match
    metrics = {m.name: m for m in results.metrics()}
    ratio = metrics["chat: server tok/s / in-process generate tok/s"]
    assert (ratio.target, ratio.verdict) == (CHAT_TOK_S_RATIO_TARGET, "FAIL")
    added = metrics["chat: time to first token added by the server"]
    assert (added.target, added.verdict) == (CHAT_ADDED_TTFT_MS_TARGET, "PASS")
    results.ttft = [TtftPair(0.100, 0.125)]
    assert {m.name: m for m in results.metrics()}[added.name].verdict == "FAIL"
    results.server[0] = _stream(5.0, "other")
    assert not results.outputs_match


def test_the_embed_ratios_compare_the_server_with_each_baseline() -> None:
    results = EmbedResults(sentences=320, concurrency=32, rounds=10)
    results.rounds32_s = [1.0, 1.0, 1.2]
    results.batch32_s = [0.8, 0.9, 0.8]
    results.server_s = [1.25, 1.0, 1.5]
    assert results.ratio == pytest.approx(0.8)  # 1/1.25, 1/1, 1.2/1.5
    assert results.whole_set_ratio == pytest.approx(0.64)  # 0.8/1.25, 0.9/1, 0.8/1.5
    assert results.packed_ratio is None  # the model pads: no unpadded baseline
    results.packed_rounds_s = [1.0, 0.9, 1.2]
    assert results.packed_ratio == pytest.approx(0.8)
    metrics = {m.name: m for m in results.metrics()}
    per_round = metrics["embed: server / in-process batch 32 per round"]
    assert (per_round.target, per_round.verdict) == (EMBED_RATIO_TARGET, "FAIL")
    whole = metrics["embed: server / in-process batch 32 whole set"]
    assert (whole.target, whole.verdict) == (EMBED_WHOLE_SET_RATIO_TARGET, "FAIL")
    assert metrics["embed: server, 32 concurrent clients"].value == pytest.approx(320 / 1.25)

"""TokenSampler: greedy and seeded sampling with the transformers logits processors."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from server.domain import SamplingParams
from server.engine.sampling import TokenSampler

VOCAB = 50


def _logits(seed: int, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randn(vocab, generator=torch.Generator().manual_seed(seed))


def _history(*ids: int) -> torch.Tensor:
    return torch.tensor(ids, dtype=torch.long)


def _draws(
    sampler: TokenSampler, logits: torch.Tensor, n: int, history: torch.Tensor | None = None
) -> list[int]:
    history = _history(0, 1, 2) if history is None else history
    return [sampler(history, logits) for _ in range(n)]


def test_greedy_is_argmax() -> None:
    sampler = TokenSampler(SamplingParams(temperature=0.0))
    assert sampler.greedy
    for seed in range(50):
        logits = _logits(seed)
        assert sampler(_history(3, 4), logits) == int(logits.argmax())


def test_greedy_takes_low_precision_logits() -> None:
    logits = torch.zeros(VOCAB, dtype=torch.bfloat16)
    logits[17] = 3.0
    assert TokenSampler(SamplingParams(temperature=0.0))(_history(1), logits) == 17


def test_repetition_penalty_changes_the_greedy_choice() -> None:
    logits = torch.zeros(VOCAB)
    logits[3] = 2.0
    logits[5] = 1.9
    # A history of several ids: id 3 has been seen, id 5 has not.
    history = _history(7, 3, 9, 11)
    assert TokenSampler(SamplingParams(temperature=0.0))(history, logits) == 3
    penalized = TokenSampler(SamplingParams(temperature=0.0, repetition_penalty=1.5))
    assert penalized(history, logits) == 5  # 2.0 / 1.5 < 1.9
    # Unseen ids are untouched: without 3 in the history it still wins.
    assert penalized(_history(7, 9, 11), logits) == 3


def test_repetition_penalty_pushes_negative_logits_further_down() -> None:
    logits = torch.full((VOCAB,), -5.0)
    logits[3] = -1.0
    logits[5] = -1.2
    sampler = TokenSampler(SamplingParams(temperature=0.0, repetition_penalty=1.5))
    # Dividing -1.0 by the penalty would raise it; it must become -1.5, below -1.2.
    assert sampler(_history(3), logits) == 5


def test_repetition_penalty_applies_when_sampling() -> None:
    logits = torch.full((VOCAB,), -30.0)
    logits[3] = 10.0
    logits[5] = 9.0
    params = SamplingParams(temperature=1.0, repetition_penalty=10.0, seed=0)
    # 10.0 / 10 = 1.0 leaves id 5 far more likely; without the penalty id 3 is (e times) likelier.
    draws = Counter(_draws(TokenSampler(params), logits, 200, _history(3)))
    assert draws[5] > 190


def test_top_k_one_equals_greedy() -> None:
    for seed in range(30):
        logits = _logits(seed)
        sampler = TokenSampler(SamplingParams(temperature=1.5, top_k=1, seed=seed))
        assert set(_draws(sampler, logits, 20)) == {int(logits.argmax())}


def test_top_k_keeps_only_the_k_best() -> None:
    logits = torch.zeros(VOCAB)
    logits[[4, 8, 15]] = torch.tensor([1.0, 0.9, 0.8])
    sampler = TokenSampler(SamplingParams(temperature=1.0, top_k=2, seed=1))
    assert set(_draws(sampler, logits, 300)) == {4, 8}


def test_small_top_p_keeps_only_the_top_token() -> None:
    logits = _logits(3)
    # Precondition: the top token is far from certain, so full sampling would pick others.
    assert float(torch.softmax(logits, -1).max()) < 0.5
    sampler = TokenSampler(SamplingParams(temperature=1.0, top_p=0.05, seed=4))
    assert set(_draws(sampler, logits, 200)) == {int(logits.argmax())}


def test_top_p_keeps_the_nucleus() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    # top_p 0.75: 0.5 + 0.3 reaches it, so ids 2 and 3 are cut.
    sampler = TokenSampler(SamplingParams(temperature=1.0, top_p=0.75, seed=5))
    assert set(_draws(sampler, probs.log(), 400)) == {0, 1}


def test_samples_follow_the_softmax_and_temperature() -> None:
    probs = torch.tensor([0.7, 0.2, 0.1])
    n = 4000
    for temperature in (1.0, 0.5, 2.0):
        sampler = TokenSampler(SamplingParams(temperature=temperature, seed=11))
        counts = Counter(_draws(sampler, probs.log(), n))
        expected = probs ** (1 / temperature)
        expected = expected / expected.sum()
        for token in range(3):
            p = float(expected[token])
            # Five standard deviations of a binomial count.
            assert abs(counts[token] - n * p) < 5 * math.sqrt(n * p * (1 - p)) + 1, temperature


def test_same_seed_same_samples() -> None:
    logits = torch.zeros(1000)  # uniform: every draw is a real coin toss
    params = SamplingParams(temperature=1.0, seed=1234)
    first = _draws(TokenSampler(params), logits, 100)
    second = _draws(TokenSampler(params), logits, 100)
    assert first == second
    assert len(set(first)) > 50


def test_different_seeds_differ() -> None:
    logits = torch.zeros(1000)
    a = _draws(TokenSampler(SamplingParams(temperature=1.0, seed=1)), logits, 100)
    b = _draws(TokenSampler(SamplingParams(temperature=1.0, seed=2)), logits, 100)
    assert sum(x != y for x, y in zip(a, b, strict=True)) > 90


def test_unseeded_samplers_differ() -> None:
    logits = torch.zeros(1000)
    a = _draws(TokenSampler(SamplingParams(temperature=1.0)), logits, 100)
    b = _draws(TokenSampler(SamplingParams(temperature=1.0)), logits, 100)
    assert a != b


def test_samplers_do_not_share_or_touch_global_rng() -> None:
    logits = torch.zeros(1000)
    params = SamplingParams(temperature=1.0, seed=99)
    alone = _draws(TokenSampler(params), logits, 50)
    # Interleaving with another sampler and with global RNG use changes nothing.
    sampler, other = TokenSampler(params), TokenSampler(SamplingParams(temperature=1.0, seed=3))
    global_state = torch.get_rng_state()
    interleaved = []
    for _ in range(50):
        other(_history(1), logits)
        interleaved.append(sampler(_history(0, 1, 2), logits))
    assert torch.equal(torch.get_rng_state(), global_state)
    torch.rand(10)
    assert interleaved == alone


@pytest.mark.parametrize("seed", [-1, 0, 2**63, 2**64 + 5, -(2**70)])
def test_any_integer_seed_is_accepted(seed: int) -> None:
    sampler = TokenSampler(SamplingParams(temperature=1.0, seed=seed))
    assert 0 <= sampler(_history(1), _logits(0)) < VOCAB


def test_caller_logits_are_not_modified() -> None:
    logits = _logits(8)
    before = logits.clone()
    params = SamplingParams(temperature=0.7, top_k=5, top_p=0.9, repetition_penalty=1.3, seed=0)
    TokenSampler(params)(_history(*range(10)), logits)
    assert torch.equal(logits, before)


def test_empty_history_is_fine() -> None:
    logits = _logits(9)
    sampler = TokenSampler(SamplingParams(temperature=0.0, repetition_penalty=1.3))
    assert sampler(torch.empty(0, dtype=torch.long), logits) == int(logits.argmax())


def test_pick_leaves_the_token_on_the_device_and_agrees_with_a_call() -> None:
    for params in (
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.8, top_k=5, top_p=0.9, seed=7),
        SamplingParams(temperature=0.0, repetition_penalty=1.5),
    ):
        picker, caller = TokenSampler(params), TokenSampler(params)
        for seed in range(20):
            logits = _logits(seed)
            picked = picker.pick(_history(3, 4), logits)
            assert isinstance(picked, torch.Tensor)
            assert picked.dim() == 0
            assert picked.device == logits.device
            assert int(picked) == caller(_history(3, 4), logits)


def test_only_a_repetition_penalty_needs_the_history() -> None:
    assert not TokenSampler(SamplingParams(temperature=0.0)).uses_history
    assert not TokenSampler(SamplingParams(temperature=0.7, top_k=3, top_p=0.5)).uses_history
    penalized = TokenSampler(SamplingParams(temperature=0.7, repetition_penalty=1.2))
    assert penalized.uses_history
    # Without a penalty no history is needed; with one, its absence is an error, not a guess.
    sampler = TokenSampler(SamplingParams(temperature=0.7, top_k=3, seed=1))
    assert 0 <= int(sampler.pick(None, _logits(0))) < VOCAB
    with pytest.raises(ValueError, match="ids so far"):
        penalized.pick(None, _logits(0))

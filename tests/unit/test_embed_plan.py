"""How the embedding batcher cuts a round of prompts into forward passes, and how it measures
what a pass costs. Pure logic on token counts and a fake model with a fake clock; the real
model's side (results equal one-by-one encode, the split of a mixed round) is tested in
tests/integration/test_embed_batching.py."""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence

import numpy as np
import pytest
import torch

from server.domain import Tokenization
from server.engine.embed import _Row, measure_pass_overhead, plan_passes
from server.models.base import EmbeddingModel


def rows_of(lengths: Sequence[int]) -> list[_Row]:
    # The planner reads only the token counts and keeps rows as objects; no request is needed.
    return [_Row(request=None, index=i, tokens=n) for i, n in enumerate(lengths)]  # type: ignore[arg-type]


def cost(passes: list[list[_Row]], overhead: float) -> float:
    return sum(overhead + len(p) * max(max(r.tokens for r in p), 1) for p in passes)


def check_limits(passes: list[list[_Row]], rows: list[_Row], max_rows: int, budget: int) -> None:
    # Every row exactly once, neighbours by length, each pass within both limits (or alone).
    flat = [r for p in passes for r in p]
    assert sorted(id(r) for r in flat) == sorted(id(r) for r in rows)
    assert [r.tokens for r in flat] == sorted(r.tokens for r in rows)
    for p in passes:
        assert p
        assert len(p) <= max_rows
        assert len(p) == 1 or len(p) * max(r.tokens for r in p) <= budget


def brute_force_cost(lengths: list[int], max_rows: int, budget: int, overhead: float) -> float:
    """The cheapest cut of the sorted lengths into runs of neighbours, trying every cut."""
    ordered = sorted(lengths)
    best = float("inf")
    for cuts in itertools.product((False, True), repeat=len(ordered) - 1):
        groups: list[list[int]] = [[ordered[0]]]
        for cut, n in zip(cuts, ordered[1:], strict=True):
            if cut:
                groups.append([n])
            else:
                groups[-1].append(n)
        if any(
            len(g) > max_rows or (len(g) > 1 and len(g) * max(g[-1], 1) > budget) for g in groups
        ):
            continue
        best = min(best, sum(overhead + len(g) * max(g[-1], 1) for g in groups))
    return best


def test_without_a_measured_overhead_passes_are_as_large_as_the_limits_allow() -> None:
    rows = rows_of([5, 30, 5, 5, 30, 5])
    passes = plan_passes(rows, max_rows=4, max_tokens=10_000)
    assert [[r.tokens for r in p] for p in passes] == [[5, 5, 5, 5], [30, 30]]
    # Equal lengths keep their arrival order.
    assert [r.index for r in passes[0]] == [0, 2, 3, 5]


def test_one_long_prompt_among_short_ones_gets_a_pass_of_its_own() -> None:
    # 31 short sentences and one of 256 tokens: padded together they cost 32 x 256 tokens.
    rows = rows_of([12] * 31 + [256])
    greedy = plan_passes(rows, max_rows=32, max_tokens=8192)
    assert len(greedy) == 1
    passes = plan_passes(rows, max_rows=32, max_tokens=8192, pass_overhead_tokens=60)
    assert [len(p) for p in passes] == [31, 1]
    assert cost(passes, 60) < cost(greedy, 60) / 5


def test_a_costly_pass_keeps_a_round_of_similar_lengths_together() -> None:
    rows = rows_of([11, 12, 14, 15, 18, 20])
    assert len(plan_passes(rows, 32, 8192, pass_overhead_tokens=60)) == 1
    # Passes that cost nothing beyond their tokens: one per distinct length, no padding at all.
    assert len(plan_passes(rows, 32, 8192, pass_overhead_tokens=0)) == 6


@pytest.mark.parametrize("overhead", [0.0, 7.0, 60.0, 1e6])
def test_the_cut_is_the_cheapest_within_the_limits(overhead: float) -> None:
    rng = random.Random(11)
    for _ in range(40):
        lengths = [rng.choice((1, 3, 8, 9, 20, 40, 90)) for _ in range(rng.randint(1, 11))]
        max_rows = rng.randint(1, 6)
        budget = rng.choice((8, 64, 200, 10_000))
        rows = rows_of(lengths)
        passes = plan_passes(rows, max_rows, budget, pass_overhead_tokens=overhead)
        check_limits(passes, rows, max_rows, budget)
        assert cost(passes, overhead) == pytest.approx(
            brute_force_cost(lengths, max_rows, budget, overhead)
        )
        greedy = plan_passes(rows, max_rows, budget)
        check_limits(greedy, rows, max_rows, budget)
        assert cost(passes, overhead) <= cost(greedy, overhead) + 1e-9


def test_a_prompt_over_the_budget_runs_alone() -> None:
    rows = rows_of([300, 4, 4])
    for overhead in (None, 0.0, 50.0):
        passes = plan_passes(rows, 8, 256, pass_overhead_tokens=overhead)
        assert [[r.tokens for r in p] for p in passes] == [[4, 4], [300]]


class ClockedModel(EmbeddingModel):
    """An embedding model whose passes cost `fixed + per_token x rows x longest` fake seconds."""

    def __init__(self, fixed: float, per_token: float, max_input: int = 512) -> None:
        self.now = 0.0
        self.fixed = fixed
        self.per_token = per_token
        self.max_input = max_input

    def clock(self) -> float:
        return self.now

    @property
    def max_input_tokens(self) -> int:
        return self.max_input

    @property
    def context_length(self) -> int:
        return self.max_input

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def dimensions(self) -> int:
        return 4

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        # [CLS] words [SEP], cut at the input limit.
        return [min(len(t.split()) + 2, self.max_input) for t in texts]

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        self.now += self.fixed + self.per_token * len(texts) * max(self.count_tokens(texts))
        return np.zeros((len(texts), 4), dtype=np.float32)

    def tokenize(self, text: str, max_tokens: int) -> Tokenization:
        raise NotImplementedError

    def warmup(self) -> None:
        pass


def test_the_measured_overhead_is_the_fixed_cost_in_tokens() -> None:
    # 8 ms a pass and 0.1 ms a padded token: one more pass costs what 80 tokens do.
    model = ClockedModel(fixed=0.008, per_token=0.0001)
    assert measure_pass_overhead(model, clock=model.clock) == pytest.approx(80.0)


def test_no_overhead_is_measured_where_passes_cost_the_same_whatever_their_size() -> None:
    model = ClockedModel(fixed=0.008, per_token=0.0)
    assert measure_pass_overhead(model, clock=model.clock) is None
    # A model that reports no tokens at all leaves nothing to divide by.
    empty = ClockedModel(fixed=0.008, per_token=0.0001, max_input=0)
    assert measure_pass_overhead(empty, clock=empty.clock) is None

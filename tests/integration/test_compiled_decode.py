"""The compiled decode pass (server/engine/compiled_decode.py): the eager lean pass's greedy
output, the same bits alone or batched, graphs compiled before serving and none while serving,
and the eager pass kept, with the reason logged, wherever compiling fails or does not agree.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import server.engine.compiled_decode as compiled_decode
from server.engine.compiled_decode import row_buckets
from server.engine.kv_slots import SlotBatch
from server.models.int8_linear import quantize_linears
from tests.integration.test_batching import token_ids
from tests.integration.test_lean_decode import LENGTHS, decoded
from tests.tiny_models import greedy_logits, tiny_llama

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def compiled() -> Iterator[SlotBatch]:
    batch = SlotBatch(tiny_llama(), CPU, max_sequences=8, compile_decode=True)
    assert batch.compiled
    yield batch
    torch._dynamo.reset()


def graphs() -> int:
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def test_row_buckets() -> None:
    assert row_buckets(1) == (1,)
    assert row_buckets(8) == (1, 2, 4, 8)
    assert row_buckets(6) == (1, 2, 4, 6)
    with pytest.raises(ValueError, match="at least 1"):
        row_buckets(0)


def test_compiled_pass_is_batch_invariant_and_gives_the_eager_passs_tokens(
    compiled: SlotBatch,
) -> None:
    before = graphs()
    by_length = decoded(compiled)
    # Six prompts in slots 2..7: passes of 8 rows, keys up to 128 positions (the check at
    # start-up ran 64), so the graphs' dynamic key length is exercised too.
    together = greedy_logits(compiled, {7 - i: token_ids(n, n) for i, n in enumerate(LENGTHS)}, 10)
    for i, n in enumerate(LENGTHS):
        for a, b in zip(by_length[n], together[7 - i], strict=True):
            assert torch.equal(a, b), f"prompt of {n} tokens differs in a batch"
    assert graphs() == before, "a graph was compiled while serving"

    eager = SlotBatch(tiny_llama(), CPU, max_sequences=8)
    assert eager.lean
    assert not eager.compiled
    reference = decoded(eager)
    for n in LENGTHS:
        for a, b in zip(by_length[n], reference[n], strict=True):
            assert int(a.argmax()) == int(b.argmax()), f"prompt of {n} tokens: another token"
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("slots", "length"), [((0,), 20), ((0, 2), 30), ((0, 5), 300)])
def test_decode_passes_run_the_compiled_graphs(
    compiled: SlotBatch, slots: tuple[int, ...], length: int
) -> None:
    """Passes of other sizes, key lengths and memory lengths than the check's (rows 1, 4, 8;
    keys up to 320 positions in 512) run a graph, not the eager fallback."""
    for slot in slots:
        compiled.prefill(slot, token_ids(length, slot))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        compiled.decode(dict.fromkeys(slots, 5))
    for slot in slots:
        compiled.release(slot)
    names = {event.key for event in prof.key_averages()}
    assert any("Compiled" in name for name in names), sorted(names)[:20]


def _fake_compile(
    behave: Callable[[Callable[..., torch.Tensor], tuple[Any, ...]], torch.Tensor],
) -> Callable[..., Callable[..., torch.Tensor]]:
    """A stand-in for torch.compile whose 'graph' calls `behave(eager_fn, args)`."""

    def fake(fn: Callable[..., torch.Tensor], **_: Any) -> Callable[..., torch.Tensor]:
        return lambda *args: behave(fn, args)

    return fake


def compiled_with(
    behave: Callable[[Callable[..., torch.Tensor], tuple[Any, ...]], torch.Tensor],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> SlotBatch:
    """A batch of 4 opened with compile_decode, its 'graphs' being `behave` (see _fake_compile)."""
    monkeypatch.setattr(compiled_decode.torch, "compile", _fake_compile(behave))
    caplog.set_level(logging.INFO, logger="server.engine.kv_slots")
    return SlotBatch(tiny_llama(), CPU, max_sequences=4, compile_decode=True)


def test_a_failed_compilation_keeps_the_eager_pass(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def fail(fn: Callable[..., torch.Tensor], args: tuple[Any, ...]) -> torch.Tensor:
        raise RuntimeError("no C++ compiler found\nmore lines")

    batch = compiled_with(fail, monkeypatch, caplog)
    assert batch.lean
    assert not batch.compiled
    assert "not compiled (RuntimeError: no C++ compiler found)" in caplog.text
    eager = SlotBatch(tiny_llama(), CPU, max_sequences=4)
    got = greedy_logits(batch, {0: token_ids(17, 3)}, 4)[0]
    want = greedy_logits(eager, {0: token_ids(17, 3)}, 4)[0]
    # Two batches measure their own linear plans, so only their tokens must be the same bits.
    for a, b in zip(got, want, strict=True):
        assert int(a.argmax()) == int(b.argmax())
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_a_graph_failing_while_serving_hands_over_to_the_eager_pass(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    broken = {"now": False}

    def flaky(fn: Callable[..., torch.Tensor], args: tuple[Any, ...]) -> torch.Tensor:
        if broken["now"]:
            raise RuntimeError("graph failed")
        return fn(*args)

    batch = compiled_with(flaky, monkeypatch, caplog)
    assert batch.compiled
    reference = greedy_logits(batch, {1: token_ids(17, 3)}, 4)[1]
    broken["now"] = True
    got = greedy_logits(batch, {1: token_ids(17, 3)}, 4)[1]
    assert not batch.compiled
    assert "the compiled pass failed (RuntimeError: graph failed)" in caplog.text
    assert all(torch.equal(a, b) for a, b in zip(got, reference, strict=True))


def test_graphs_whose_rows_change_a_rows_logits_are_not_used(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def row_dependent(fn: Callable[..., torch.Tensor], args: tuple[Any, ...]) -> torch.Tensor:
        logits = fn(*args)
        # A pass of 4 rows rounds differently, as a fused loop tiled by the row count might.
        return logits + 1e-6 if logits.shape[0] == 4 else logits

    batch = compiled_with(row_dependent, monkeypatch, caplog)
    assert batch.lean
    assert not batch.compiled
    assert "a row's logits change in passes of 4 rows" in caplog.text


def test_only_the_lean_float_pass_compiles(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="server.engine.kv_slots")
    batch = SlotBatch(tiny_llama(), CPU, max_sequences=4, lean_decode=False, compile_decode=True)
    assert not batch.compiled
    assert "not compiled (only the lean pass compiles)" in caplog.text
    int8 = tiny_llama()
    quantize_linears(int8)
    batch = SlotBatch(int8, CPU, max_sequences=4, compile_decode=True)
    assert batch.lean
    assert not batch.compiled
    assert "not compiled (int8 layers" in caplog.text

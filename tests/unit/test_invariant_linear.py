"""The decode passes' linear layers: right values, bit-identical rows whatever the pass holds."""

from __future__ import annotations

import pytest
import torch

from server.engine.invariant_linear import (
    KERNELS,
    LinearPlan,
    _best_calls,
    _classes,
    _size_bits,
    _window,
    choose_plans,
    install,
    shape_key,
    shared_pass_window,
)


def model(*shapes: tuple[int, int], bias: bool = False) -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        *(torch.nn.Linear(n_in, n_out, bias=bias) for n_in, n_out in shapes)
    ).eval()


@pytest.mark.parametrize("kernel", sorted(KERNELS))
@pytest.mark.parametrize("group", [1, 2, 4])
def test_plans_compute_the_linear_layer(kernel: str, group: int) -> None:
    layer = torch.nn.Linear(48, 80)
    plan = LinearPlan.uniform(kernel, group, max_rows=8)
    x = torch.randn(8, 48)
    with torch.inference_mode():
        for rows in range(1, 9):
            torch.testing.assert_close(
                plan.apply(layer.weight, x[:rows]) + layer.bias, layer(x[:rows])
            )
    assert [plan.padded(n) for n in (1, group, 8, 9)] == [group, group, 8, 9]


def test_installed_layers_keep_shapes_and_values_and_leave_large_passes_alone() -> None:
    net = model((32, 64), (64, 16), bias=True)
    plan = LinearPlan.uniform("weight_first", 4, max_rows=8)
    x = torch.randn(3, 1, 32)
    with torch.inference_mode():
        expected = net(x)
        big = torch.randn(20, 32)
        expected_big = net(big)
        assert install(net, {shape_key(m): plan for m in net}) == 2
        torch.testing.assert_close(net(x), expected)
        assert net(x).shape == (3, 1, 16)
        # 20 rows is past max_rows: the layer runs as it is, bit for bit.
        assert torch.equal(net(big), expected_big)


def test_a_dispatched_module_keeps_its_hook() -> None:
    layer = torch.nn.Linear(8, 8)
    calls: list[int] = []
    original = layer.forward

    def hook(x: torch.Tensor) -> torch.Tensor:  # what accelerate's hook does around the layer
        calls.append(1)
        return layer._old_forward(x)  # type: ignore[operator]

    layer._old_forward = original  # type: ignore[assignment]
    layer.forward = hook  # type: ignore[method-assign]
    install(layer, {shape_key(layer): LinearPlan.uniform("weight_first", 2, max_rows=4)})
    with torch.inference_mode():
        torch.testing.assert_close(layer(torch.ones(1, 8)), original(torch.ones(1, 8)))
    assert calls == [1]
    assert layer._old_forward is not original


def test_the_chosen_plan_gives_each_row_the_same_bits_in_any_pass() -> None:
    """Sizes like the embedded model's layers; a row alone and among 1..7 others, anywhere."""
    net = model((576, 1536), (1536, 576), (576, 2048))
    install(net, choose_plans(net, max_rows=8))
    generator = torch.Generator().manual_seed(1)
    probe = torch.randn(576, generator=generator)
    with torch.inference_mode():
        alone = net(probe[None, None])[0, 0]
        for rows in range(2, 9):
            for place in (0, rows - 1, rows // 2):
                x = torch.randn(rows, 1, 576, generator=generator)
                x[place, 0] = probe
                assert torch.equal(net(x)[place, 0], alone), (rows, place)


def test_a_kernel_whose_rows_depend_on_each_other_does_not_qualify() -> None:
    def leaky(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x + 1e-3 * x.mean(0), weight)

    probe = (torch.randn(16, 8), torch.randn(8, 8))
    # One row per call has no neighbours to depend on: the only class left.
    assert _classes(leaky, [1, 2, 3, 4], probe) == [[1]]


def test_sizes_that_give_other_bits_fall_into_other_classes() -> None:
    def by_parity(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # Odd and even call sizes give other last bits, as two BLAS code paths would.
        out = torch.nn.functional.linear(x, weight)
        return out if x.shape[0] % 2 == 0 else out + 0.5

    # Small integers: every summation order gives the same exact sums, whatever the BLAS does.
    probe = (torch.randint(-3, 4, (16, 8)).float(), torch.randint(-3, 4, (8, 8)).float())
    classes = _classes(by_parity, [1, 2, 3, 4], probe)
    assert sorted(classes) == [[1, 3], [2, 4]]


def test_passes_are_cut_into_the_cheapest_calls() -> None:
    # As with a BLAS: one row costs more than four, eight less than two calls of four.
    calls = _best_calls({1: 1.2, 4: 1.1, 8: 1.5}, max_rows=12)
    assert calls[1] == (4,)
    assert calls[4] == (4,)
    assert calls[5] == (8,)
    assert sorted(calls[9]) == sorted(calls[12]) == [4, 8]
    assert LinearPlan("weight_first", calls).padded(5) == 8


def test_large_passes_run_in_one_call_of_their_own_kernel() -> None:
    net = model((32, 48), bias=True)
    big = torch.randn(2, 10, 32)  # 20 rows, past max_rows
    with torch.inference_mode():
        expected = net(big)
        install(net, {shape_key(net[0]): LinearPlan.uniform("weight_first", 4, 8, "weight_first")})
        torch.testing.assert_close(net(big), expected)
        assert net(big).is_contiguous()


def test_pass_sizes_past_a_threshold_qualify_for_shared_passes() -> None:
    def small_passes_differ(x: torch.Tensor) -> torch.Tensor:
        # Below 20 rows another "code path" gives other bits, as MKL does below 12 rows.
        return x * 2 if x.shape[0] >= 20 else x * 2 + 1e-3

    x = torch.randn(70, 4)
    sizes = [9, 12, 16, 20, 24, 36, 54, 64]
    bits = _size_bits(small_passes_differ, sizes, x, head=9)
    assert _window([bits], sizes) == (20, 64)

    def rows_depend_on_each_other(x: torch.Tensor) -> torch.Tensor:
        return x + x.mean(0)

    assert _size_bits(rows_depend_on_each_other, sizes, x, head=9) == [None] * len(sizes)


def test_the_window_leaves_out_larger_passes_that_give_other_bits() -> None:
    sizes = [9, 12, 16, 24, 36, 54, 81, 121, 128, 192, 256]
    each = [bytes([i]) for i in range(len(sizes))]  # every size its own result
    # One result from 81 to 192 rows, other bits below and again at 256 (as MKL does on one of
    # these machines).
    shape = [*each[:6], b"g", b"g", b"g", b"g", b"h"]
    assert _window([shape], sizes) == (81, 192)
    # Every shape must give one result over the window: the smallest low wins, then the largest
    # high.
    other = [b"a", b"a", b"a", *[b"b"] * 8]
    assert _window([other], sizes) == (24, 256)
    assert _window([shape, other], sizes) == (81, 192)
    # No room for two chunks, or no result at all: no window.
    assert _window([each], sizes) is None
    assert _window([[None] * len(sizes)], sizes) is None


def test_chunks_of_the_probed_size_get_their_rows_bits_in_any_larger_pass() -> None:
    net = model((576, 1536), (1536, 576))
    plans = choose_plans(net, max_rows=8)
    window = shared_pass_window(net, plans, max_pass_rows=256)
    # Where MKL's kernels change with the row count depends on the CPU (12 rows on some of
    # these machines; 81 to 192 rows on others, with other bits again at 256): what must hold is
    # the promise, checked on real rows.
    assert window is not None
    low, high = window
    assert low > 8
    assert 2 * low <= high <= 256
    big = torch.randn(high, 576)
    install(net, plans)
    with torch.inference_mode():
        whole = net(big)
        for start, end in ((0, low), (high - low, high), (0, 2 * low)):
            assert torch.equal(net(big[start:end]), whole[start:end]), (start, end)
    # Nothing can share a pass that is no larger than a decode pass.
    assert shared_pass_window(net, plans, max_pass_rows=8) is None


def test_half_precision_probes_see_another_summation_order() -> None:
    """Rounding to bfloat16 hides most differences in summation order; the probe's planted
    inputs make them show, so call sizes that add terms in another order get other classes."""
    from server.engine.invariant_linear import _probe_input, _probe_rows

    def by_order(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # Exact products summed one by one in float32, backwards for odd call sizes (two code
        # paths of a BLAS), then rounded to the weight's dtype as a half-precision GEMM does.
        terms = x.float()[:, None, :] * weight.float()[None, :, :]
        if x.shape[0] % 2:
            terms = terms.flip(-1)
        total = torch.zeros(terms.shape[:2])
        for k in range(terms.shape[-1]):  # each addition rounded to float32
            total = total + terms[..., k]
        return total.to(weight.dtype)

    generator = torch.Generator().manual_seed(0)
    weight = (torch.randn(48, 64, generator=generator) / 8).to(torch.bfloat16)
    rows = _probe_rows(weight)
    assert rows > 1
    probe = (weight, _probe_input(weight, rows + 8, generator))
    assert sorted(_classes(by_order, [1, 2, 3, 4], probe, rows)) == [[1, 3], [2, 4]]
    # The planted values are exact in the dtype and the results finite.
    assert torch.isfinite(by_order(*probe)).all()


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="oneDNN is not built in")  # type: ignore[no-untyped-call]
def test_onednn_calls_of_one_class_give_each_row_the_same_bits_in_any_pass() -> None:
    """oneDNN's kernel (weights reordered once) as a plan would use it, on the embedded model's
    shapes: the probed class holding 8-row calls, a row alone and among 1..7 others, anywhere."""
    net = model((576, 1536), (1536, 576), (576, 192))
    generator = torch.Generator().manual_seed(3)
    plans = {}
    with torch.inference_mode():
        for layer in net.modules():
            if not isinstance(layer, torch.nn.Linear):
                continue
            x = torch.randn(16, layer.weight.shape[1], generator=generator)
            classes = _classes(KERNELS["onednn"], list(range(1, 9)), (layer.weight, x))
            eight = next(c for c in classes if 8 in c)
            calls = _best_calls({size: 1.0 / size for size in eight}, max_rows=8)
            plans[shape_key(layer)] = LinearPlan("onednn", calls)
    probe = torch.randn(576, generator=generator)
    with torch.inference_mode():
        expected = net(probe[None, None])[0, 0]
    install(net, plans)
    with torch.inference_mode():
        alone = net(probe[None, None])[0, 0]
        torch.testing.assert_close(alone, expected)
        for rows in range(2, 9):
            for place in (0, rows - 1, rows // 2):
                x = torch.randn(rows, 1, 576, generator=generator)
                x[place, 0] = probe
                assert torch.equal(net(x)[place, 0], alone), (rows, place)

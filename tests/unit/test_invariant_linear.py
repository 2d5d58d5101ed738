"""The decode passes' linear layers: right values, bit-identical rows whatever the pass holds."""

from __future__ import annotations

import pytest
import torch

from server.engine.invariant_linear import KERNELS, LinearPlan, _qualifies, choose_plan, install


def model(*shapes: tuple[int, int], bias: bool = False) -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        *(torch.nn.Linear(n_in, n_out, bias=bias) for n_in, n_out in shapes)
    ).eval()


@pytest.mark.parametrize("kernel", sorted(KERNELS))
@pytest.mark.parametrize("group", [1, 2, 4])
def test_plans_compute_the_linear_layer(kernel: str, group: int) -> None:
    layer = torch.nn.Linear(48, 80)
    plan = LinearPlan(kernel=kernel, group=group, max_rows=8)
    x = torch.randn(8, 48)
    with torch.inference_mode():
        for rows in range(1, 9):
            torch.testing.assert_close(
                plan.apply(layer.weight, x[:rows]) + layer.bias, layer(x[:rows])
            )
    assert [plan.padded(n) for n in (1, group, 8, 9)] == [group, group, 8, 9]


def test_installed_layers_keep_shapes_and_values_and_leave_large_passes_alone() -> None:
    net = model((32, 64), (64, 16), bias=True)
    plan = LinearPlan(kernel="weight_first", group=4, max_rows=8)
    x = torch.randn(3, 1, 32)
    with torch.inference_mode():
        expected = net(x)
        big = torch.randn(20, 32)
        expected_big = net(big)
        assert install(net, plan) == 2
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
    install(layer, LinearPlan(kernel="weight_first", group=2, max_rows=4))
    with torch.inference_mode():
        torch.testing.assert_close(layer(torch.ones(1, 8)), original(torch.ones(1, 8)))
    assert calls == [1]
    assert layer._old_forward is not original


def test_the_chosen_plan_gives_each_row_the_same_bits_in_any_pass() -> None:
    """Sizes like the embedded model's layers; a row alone and among 1..7 others, anywhere."""
    net = model((576, 1536), (1536, 576), (576, 2048))
    plan = choose_plan(net, max_rows=8)
    install(net, plan)
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

    probes = [(torch.randn(16, 8), torch.randn(8, 8))]
    assert not _qualifies(leaky, 2, probes)
    assert _qualifies(leaky, 1, probes)  # one row per call has no neighbours to depend on
    assert _qualifies(KERNELS["input_first"], 1, probes)

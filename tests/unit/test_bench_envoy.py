"""The Envoy benchmark's bookkeeping: what JSON via Envoy adds, and the parts it is split into.

The samples are synthetic, so every figure is known exactly; running Envoy and the server is
the benchmark's job (`make bench`), not the test suite's.
"""

from __future__ import annotations

import pytest

from bench.envoy import ADDED_LATENCY_MS_TARGET, Samples, UnaryResult


def _samples(wall_ms: list[float], cpu_ms: float) -> Samples:
    """Calls of the given latencies, each with `cpu_ms` of client CPU time."""
    return Samples(wall=[w / 1000 for w in wall_ms], cpu=[cpu_ms / 1000] * len(wall_ms))


def _result() -> UnaryResult:
    # Medians beyond the clients' CPU: direct 10.0, gRPC via Envoy 10.6, the JSON route's RPC
    # direct 10.3, JSON via Envoy 11.1; the clients spend 0.1-0.3 ms of CPU a call, each its own.
    return UnaryResult(
        "embed",
        json_via_envoy=_samples([11.2, 11.4, 11.6], 0.3),
        direct=_samples([9.9, 10.1, 10.4], 0.1),
        grpc_via_envoy=_samples([10.6, 10.8, 11.1], 0.2),
        typed_direct=_samples([10.4, 10.6, 10.9], 0.5),
        gateway_direct=_samples([10.4, 10.6, 10.8], 0.3),
    )


def test_the_target_takes_each_clients_cpu_out() -> None:
    result = _result()
    assert result.added_ms == pytest.approx(11.4 - 10.1)
    assert result.added_beyond_clients_ms == pytest.approx(11.1 - 10.0)
    assert result.added_vs_typed_ms == pytest.approx(11.4 - 10.6)


def test_the_added_latency_is_split_into_parts_that_sum_to_it() -> None:
    result = _result()
    assert result.envoy_hop_ms == pytest.approx(0.6)
    assert result.json_work_ms == pytest.approx(0.3)
    assert result.rest_ms == pytest.approx(1.1 - 0.6 - 0.3)
    assert result.envoy_hop_ms + result.json_work_ms + result.rest_ms == pytest.approx(
        result.added_beyond_clients_ms
    )


def test_only_the_added_latency_is_judged() -> None:
    metrics = {m.name: m for m in _result().metrics()}
    judged = [m for m in metrics.values() if m.target is not None]
    assert [m.name for m in judged] == ["envoy: embed latency added, clients' CPU excluded"]
    assert judged[0].target == ADDED_LATENCY_MS_TARGET
    assert judged[0].verdict == "FAIL"  # 1.1 ms
    assert metrics["envoy: embed of it, Envoy's gRPC hop"].value == pytest.approx(0.6)
    assert metrics["envoy: embed of it, the server's JSON work"].value == pytest.approx(0.3)
    figures = _result().as_dict()
    assert figures["gateway_direct_median_ms"] == pytest.approx(10.6)
    assert figures["json_work_ms"] == pytest.approx(0.3)

"""The Envoy benchmark's bookkeeping: what JSON via Envoy adds, with and without client CPU.

The samples are synthetic, so every figure is known exactly; running Envoy and the server is
the benchmark's job (`make bench`), not the test suite's.
"""

from __future__ import annotations

import pytest

from bench.defaults import ENVOY_ADDED_MS_TARGET, ENVOY_CHAT_RATIO_TARGET
from bench.envoy import EnvoyResult, Samples, UnaryResult


def _samples(wall_ms: list[float], cpu_ms: float) -> Samples:
    """Calls of the given latencies, each with `cpu_ms` of client CPU time."""
    return Samples(wall=[w / 1000 for w in wall_ms], cpu=[cpu_ms / 1000] * len(wall_ms))


def _result(json_cpu_ms: float = 0.5) -> UnaryResult:
    # Medians: direct gRPC 10.1 ms with 0.1 ms of client CPU, gRPC via Envoy 10.8, JSON via
    # Envoy 11.4 with `json_cpu_ms` of client CPU.
    return UnaryResult(
        "embed",
        json_via_envoy=_samples([11.2, 11.4, 11.6], json_cpu_ms),
        direct=_samples([9.9, 10.1, 10.4], 0.1),
        grpc_via_envoy=_samples([10.6, 10.8, 11.1], 0.1),
    )


def test_the_added_latency_is_reported_with_and_without_the_clients_cpu() -> None:
    result = _result()
    assert result.added_ms == pytest.approx(11.4 - 10.1)
    assert result.added_beyond_clients_ms == pytest.approx((11.4 - 0.5) - (10.1 - 0.1))
    assert result.grpc_envoy_added_ms == pytest.approx(10.8 - 10.1)
    figures = result.as_dict()
    assert figures["json_via_envoy_client_cpu_ms"] == pytest.approx(0.5)
    assert figures["grpc_via_envoy_median_ms"] == pytest.approx(10.8)


def test_only_the_added_latency_without_client_cpu_is_judged() -> None:
    # 0.9 ms beyond the clients: PASS; a lighter JSON client leaves 1.2 ms: FAIL.
    for cpu_ms, verdict in ((0.5, "PASS"), (0.2, "FAIL")):
        judged = [m for m in _result(cpu_ms).metrics() if m.target is not None]
        assert [m.name for m in judged] == [
            "envoy: embed latency JSON via Envoy adds, clients' CPU excluded"
        ]
        assert judged[0].target == ENVOY_ADDED_MS_TARGET
        assert judged[0].verdict == verdict


def test_the_chat_ratio_is_judged_and_a_busy_machine_marks_every_line() -> None:
    quiet = EnvoyResult(
        (_result(),), chat_direct_tok_s=20.0, chat_envoy_tok_s=18.0, background_cores=0.0
    )
    chat = next(m for m in quiet.metrics() if m.name == "envoy: chat tok/s via Envoy / direct")
    assert chat.value == pytest.approx(0.9)
    assert chat.target == ENVOY_CHAT_RATIO_TARGET
    assert chat.verdict == "FAIL"
    busy = EnvoyResult((_result(),), 20.0, 19.6, background_cores=1.5)
    assert all(m.noisy for m in busy.metrics())
    assert {m.verdict for m in busy.metrics() if m.target is not None} == {"PASS*"}

"""Replicas on one host: their settings, and the Envoy config that balances over them.

What Envoy and the supervisor then do with them is checked with real processes in
tests/e2e/test_replicas.py.
"""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.envoy_config import (
    COMPOSE_CONFIG,
    K8S_CONFIG,
    SHORT_CALLS_PER_REPLICA,
    render,
    replica_capacity,
    target_from_settings,
)
from gateway.supervisor import RESTART_PAUSE_S, Replica, Supervisor, replica_settings
from server.config import load_model_specs
from server.settings import DEFAULT_CONFIG, Settings, load_settings


def config_of(settings: Settings) -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(render(target_from_settings(settings)))
    return config


def backend(config: dict[str, Any]) -> dict[str, Any]:
    [cluster] = [c for c in config["static_resources"]["clusters"] if c["name"] == "glm_backend"]
    return cluster


def route(config: dict[str, Any]) -> dict[str, Any]:
    listener = config["static_resources"]["listeners"][0]
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    [vhost, *_] = manager["route_config"]["virtual_hosts"]
    # The catch-all route to the servers (the chat page's and the 405 routes answer in Envoy).
    [served] = [r["route"] for r in vhost["routes"] if r["match"] == {"prefix": "/"}]
    return dict(served)


def test_replicas_setting_from_env_and_flag() -> None:
    assert load_settings([], environ={"GLM_REPLICAS": "3"}).replicas == 3
    assert load_settings(["--replicas", "2"], environ={"GLM_REPLICAS": "3"}).replicas == 2
    with pytest.raises(ValueError, match="replicas must be between 1 and"):
        load_settings(["--replicas", "0"], environ={})
    with pytest.raises(ValueError, match="fixed grpc_address port"):
        load_settings(["--replicas", "2", "--grpc-address", "127.0.0.1:0"], environ={})
    with pytest.raises(ValueError, match="run past 65535"):
        load_settings(["--replicas", "3", "--grpc-address", "127.0.0.1:65534"], environ={})
    with pytest.raises(ValueError, match="drain_delay_s"):
        load_settings(["--drain-delay-s", "-1"], environ={})


def test_each_replica_gets_its_port_metrics_port_and_thread_share() -> None:
    settings = Settings(
        grpc_address="127.0.0.1:6000", metrics_port=9400, torch_threads=8, replicas=3
    )
    replicas = [replica_settings(settings, i) for i in range(3)]
    assert [r.grpc_address for r in replicas] == [
        "127.0.0.1:6000",
        "127.0.0.1:6001",
        "127.0.0.1:6002",
    ]
    assert [r.metrics_port for r in replicas] == [9400, 9401, 9402]
    assert {r.torch_threads for r in replicas} == {2}
    assert {r.replicas for r in replicas} == {1}
    # No metrics port: none for the replicas either; never fewer than one thread.
    few = replace(settings, metrics_port=0, torch_threads=2)
    assert {replica_settings(few, i).metrics_port for i in range(3)} == {0}
    assert {replica_settings(few, i).torch_threads for i in range(3)} == {1}
    # One replica is the server as configured.
    single = Settings(torch_threads=0)
    assert replica_settings(single, 0) == single


def test_envoy_balances_over_every_replica_by_least_request() -> None:
    config = config_of(Settings(grpc_address="127.0.0.1:6000", replicas=3))
    cluster = backend(config)
    assert cluster["lb_policy"] == "LEAST_REQUEST"
    ports = [
        e["endpoint"]["address"]["socket_address"]["port_value"]
        for e in cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    ]
    assert ports == [6000, 6001, 6002]
    # Active gRPC health checks, and no panic mode sending calls to failing replicas.
    assert cluster["health_checks"][0]["grpc_health_check"]["service_name"] == "glm.v1.GlmService"
    assert cluster["common_lb_config"]["healthy_panic_threshold"]["value"] == 0


def test_health_changes_reach_the_load_balancers_at_once() -> None:
    # Envoy's default merge window held back a replica that turned healthy within a second of
    # another: /healthz counted it while it got none of the next 200 calls.
    for settings in (Settings(), Settings(grpc_address="127.0.0.1:6000", replicas=3)):
        lb = backend(config_of(settings))["common_lb_config"]
        assert lb["update_merge_window"] == "0s"
    # The compose and Kubernetes configs come from the same template.
    for rendered in (COMPOSE_CONFIG, K8S_CONFIG):
        [cluster] = [
            c
            for c in yaml.safe_load(rendered.read_text())["static_resources"]["clusters"]
            if c["name"] == "glm_backend"
        ]
        assert cluster["common_lb_config"]["update_merge_window"] == "0s"


def test_circuit_breaker_is_sized_to_the_servers_queues() -> None:
    specs = load_model_specs(DEFAULT_CONFIG)
    chat = [s for s in specs if s.kind.name == "CHAT"]
    assert replica_capacity(specs) == SHORT_CALLS_PER_REPLICA + sum(
        s.max_concurrent + s.max_waiting for s in chat
    )
    [thresholds] = backend(config_of(Settings(grpc_address="127.0.0.1:6000", replicas=3)))[
        "circuit_breakers"
    ]["thresholds"]
    assert thresholds["max_requests"] == 3 * replica_capacity(specs)
    assert thresholds["retry_budget"]["budget_percent"]["value"] == 25
    # Every call in flight on one replica may be retried at once when it dies (a budget share
    # alone refused retries in the replicas bench's failover: 32 callers, 7 calls lost).
    assert thresholds["retry_budget"]["min_retry_concurrency"] == replica_capacity(specs)


def test_retries_go_to_another_replica_only_for_failures_before_a_reply() -> None:
    policy = route(config_of(Settings()))["retry_policy"]
    assert set(policy["retry_on"].split(",")) == {
        "connect-failure",
        "refused-stream",
        "reset",
        "unavailable",
    }
    [predicate] = policy["retry_host_predicate"]
    assert predicate["name"] == "envoy.retry_host_predicates.previous_hosts"


def test_outlier_detection_ejects_on_connection_failures_not_on_call_errors() -> None:
    outlier = backend(config_of(Settings()))["outlier_detection"]
    assert outlier["split_external_local_origin_errors"] is True
    assert outlier["enforcing_consecutive_local_origin_failure"] == 100
    assert outlier["enforcing_consecutive_gateway_failure"] == 100
    # A gRPC INTERNAL answering one bad input is not the replica's failure.
    assert outlier["enforcing_consecutive_5xx"] == 0


def test_healthz_reads_the_counts_from_the_admin_socket(tmp_path: Path) -> None:
    target = target_from_settings(Settings(), tmp_path)
    assert target.admin_socket == str(tmp_path / "glm-api-envoy-admin.sock")
    config = yaml.safe_load(render(target))
    assert config["admin"]["address"]["pipe"]["path"] == target.admin_socket
    listener = config["static_resources"]["listeners"][0]
    filters = listener["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"]
    # First, before anything else can answer /healthz.
    assert filters[0]["name"] == "glm_api.healthz"
    source = filters[0]["typed_config"]["default_source_code"]["inline_string"]
    assert 'httpCall("envoy_admin"' in source
    assert "membership_healthy" in source


def _exiting(code: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-c", f"raise SystemExit({code})"])
    proc.wait()
    return proc


def test_a_dead_replica_is_started_again_after_a_pause(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    supervisor = Supervisor(Settings(grpc_address="127.0.0.1:6000", replicas=2), tmp_path)
    started: list[int] = []
    monkeypatch.setattr(Replica, "start", lambda self: started.append(self.index))
    dead = supervisor.replicas[1]
    dead.proc = _exiting(-9 % 256)
    dead.started_at = time.monotonic()
    assert supervisor._check_replicas() == 0
    assert started == []  # paused first
    assert dead.restart_at > time.monotonic()
    assert dead.pause_s == 2 * RESTART_PAUSE_S  # the next death waits longer
    dead.restart_at = time.monotonic()
    assert supervisor._check_replicas() == 0
    assert started == [1]
    assert dead.restarts == 1


def test_a_replica_with_a_bad_config_stops_everything(tmp_path: Path) -> None:
    supervisor = Supervisor(Settings(grpc_address="127.0.0.1:6000", replicas=2), tmp_path)
    supervisor.replicas[0].proc = _exiting(2)
    assert supervisor._check_replicas() == 1

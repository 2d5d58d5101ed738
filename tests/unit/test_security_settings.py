"""The security settings: protected mode, auth modes, TLS pairs, the Host allow-list default."""

from __future__ import annotations

import pytest

from server.settings import Settings, is_loopback, load_settings, protected_mode_problem


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.0.0.53", True),
        ("localhost", True),
        ("[::1]", True),
        ("::1", True),
        ("0.0.0.0", False),
        ("[::]", False),
        ("10.0.0.5", False),
        ("api.example.com", False),
    ],
)
def test_loopback_addresses(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


@pytest.mark.parametrize(
    "env",
    [
        {"GLM_GRPC_ADDRESS": "0.0.0.0:50051"},
        {"GLM_GRPC_ADDRESS": "[::]:50051"},
        {"GLM_HTTP_HOST": "0.0.0.0"},
        {"GLM_GRPC_ADDRESS": "10.1.2.3:50051", "GLM_AUTH": "auto"},
    ],
)
def test_protected_mode_refuses_a_public_address_without_keys(env: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="protected mode") as refused:
        load_settings([], environ=env)
    message = str(refused.value)
    # The message says how to get out of it: create keys, or opt out explicitly.
    assert "python -m server keys add" in message
    assert "GLM_API_KEYS_FILE" in message
    assert "GLM_AUTH=none" in message


def test_protected_mode_lets_keys_or_an_explicit_opt_out_through() -> None:
    public = {"GLM_GRPC_ADDRESS": "0.0.0.0:50051", "GLM_HTTP_HOST": "0.0.0.0"}
    with_keys = load_settings([], environ={**public, "GLM_API_KEYS_FILE": "/etc/keys.toml"})
    assert protected_mode_problem(with_keys) is None
    opted_out = load_settings([], environ={**public, "GLM_AUTH": "none"})
    assert opted_out.auth == "none"
    assert protected_mode_problem(opted_out) is None
    # Loopback needs nothing.
    assert protected_mode_problem(Settings()) is None
    assert protected_mode_problem(Settings(grpc_address="0.0.0.0:1")) is not None


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"GLM_AUTH": "maybe"}, "auth must be one of"),
        ({"GLM_AUTH": "none", "GLM_API_KEYS_FILE": "k.toml"}, "auth=none"),
        ({"GLM_AUTH": "keys"}, "auth=keys needs api_keys_file"),
        ({"GLM_TLS_CERT_FILE": "c.pem"}, "go together"),
        ({"GLM_TLS_KEY_FILE": "k.pem"}, "go together"),
        ({"GLM_TLS_CLIENT_CA_FILE": "ca.pem"}, "needs tls_cert_file"),
        ({"GLM_RATE_LIMIT_WINDOW_S": "0"}, "rate_limit_window_s"),
        ({"GLM_HTTP_MAX_CONNECTIONS": "0"}, "http_max_connections"),
    ],
)
def test_inconsistent_security_settings_are_refused(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_settings([], environ=env)


def test_security_defaults() -> None:
    settings = load_settings([], environ={})
    assert settings.auth == "auto"
    assert settings.api_keys_file == ""
    assert settings.reflection is True
    assert settings.tls is False
    assert settings.metrics_host == "127.0.0.1"
    tls = load_settings(
        ["--tls-cert-file", "c.pem", "--tls-key-file", "k.pem", "--reflection", "false"],
        environ={},
    )
    assert tls.tls is True
    assert tls.reflection is False


def test_the_host_allow_list_defaults_to_loopback_names_on_loopback() -> None:
    assert Settings().http_allowed_host_list == ("localhost", "127.0.0.1", "[::1]")
    assert Settings(http_host="0.0.0.0").http_allowed_host_list == ("*",)
    explicit = Settings(http_allowed_hosts="API.example.com, other.example.com")
    assert explicit.http_allowed_host_list == ("api.example.com", "other.example.com")

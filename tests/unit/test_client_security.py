"""The clients' API key and TLS options (the calls themselves: tests/test_auth.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

import grpc
import pytest

from clients import tls_credentials
from clients.__main__ import _credentials, build_parser
from clients._transport import with_api_key
from tests.certs import Certs, make_certs


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


def test_the_api_key_becomes_a_bearer_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GLM_API_KEY", raising=False)
    assert with_api_key((), None) == ()
    assert with_api_key((), "k1") == (("authorization", "Bearer k1"),)
    monkeypatch.setenv("GLM_API_KEY", "from-env")
    assert with_api_key((("x-request-id", "r"),), None) == (
        ("x-request-id", "r"),
        ("authorization", "Bearer from-env"),
    )
    # "" sends no key even with the variable set; metadata with a key of its own wins.
    assert with_api_key((), "") == ()
    assert with_api_key((("x-api-key", "mine"),), "k1") == (("x-api-key", "mine"),)
    assert with_api_key((("authorization", "Bearer mine"),), None) == (
        ("authorization", "Bearer mine"),
    )


def test_tls_credentials_read_the_files(certs: Certs) -> None:
    assert isinstance(tls_credentials(), grpc.ChannelCredentials)
    assert isinstance(
        tls_credentials(certs.ca, certs.client_cert, certs.client_key), grpc.ChannelCredentials
    )
    with pytest.raises(ValueError, match="both cert_file and key_file"):
        tls_credentials(certs.ca, cert_file=certs.client_cert)
    with pytest.raises(FileNotFoundError):
        tls_credentials(certs.folder / "missing.pem")


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args([*argv, "models"])


def test_the_cli_takes_tls_from_options_or_the_environment(
    certs: Certs, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in (
        "GLM_TLS",
        "GLM_TLS_CA_FILE",
        "GLM_TLS_CLIENT_CERT_FILE",
        "GLM_TLS_CLIENT_KEY_FILE",
    ):
        monkeypatch.delenv(name, raising=False)
    assert _credentials(parse()) is None
    assert _credentials(parse("--tls")) is not None
    assert _credentials(parse("--ca-file", str(certs.ca))) is not None
    with pytest.raises(ValueError, match="both"):
        _credentials(parse("--cert-file", str(certs.client_cert)))
    monkeypatch.setenv("GLM_TLS", "true")
    assert _credentials(parse()) is not None
    monkeypatch.setenv("GLM_TLS", "false")
    assert _credentials(parse()) is None
    monkeypatch.setenv("GLM_TLS_CLIENT_CERT_FILE", str(certs.client_cert))
    monkeypatch.setenv("GLM_TLS_CLIENT_KEY_FILE", str(Path(certs.client_key)))
    assert _credentials(parse()) is not None
    assert parse("--api-key", "k").api_key == "k"

"""What the settings say about who may connect: the auth interceptor and the TLS credentials."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc

from server.auth.keys import KeysFileError, KeyStore
from server.auth.limits import RateLimiter
from server.auth.tls import ReloadingServerCredentials, TlsFiles, TlsFilesError
from server.config import ConfigError
from server.settings import Settings, protected_mode_problem
from server.transport.auth import AuthInterceptor


class SecurityConfigError(ConfigError):
    """The keys file or a TLS file does not load, or the settings would serve anyone."""


@dataclass(frozen=True, slots=True)
class Security:
    """The pieces the gRPC server is built with (None: that protection is off)."""

    interceptor: AuthInterceptor | None
    credentials: grpc.ServerCredentials | None
    keys: KeyStore | None = None
    tls: ReloadingServerCredentials | None = None

    def describe(self) -> str:
        """How calls are authenticated, for the start-up log line."""
        if self.keys is None:
            return "no API keys (GLM_AUTH=none or loopback only)"
        return f"API keys from {self.keys.path}"


def load_security(settings: Settings) -> Security:
    """Load the keys file and the TLS files the settings name; SecurityConfigError if one fails.

    The protected-mode rule is checked again here, for settings built without load_settings().
    """
    problem = protected_mode_problem(settings)
    if problem:
        raise SecurityConfigError(problem)
    keys = interceptor = tls = None
    try:
        if settings.api_keys_file and settings.auth != "none":
            keys = KeyStore(Path(settings.api_keys_file))
            interceptor = AuthInterceptor(keys, RateLimiter(settings.rate_limit_window_s))
        if settings.tls:
            client_ca = Path(settings.tls_client_ca_file) if settings.tls_client_ca_file else None
            tls = ReloadingServerCredentials(
                TlsFiles(Path(settings.tls_cert_file), Path(settings.tls_key_file), client_ca)
            )
    except (KeysFileError, TlsFilesError) as exc:
        raise SecurityConfigError(str(exc)) from exc
    return Security(interceptor, None if tls is None else tls.credentials, keys, tls)

"""Process-wide settings: one frozen object built from `GLM_*` environment variables and CLI flags.

Flags win over the environment, the environment over the defaults. Everything that varies between
deployments lives here; per-model settings live in the models config file (server/config.py).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

_PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = _PROJECT_ROOT / "config" / "default.toml"


def _default_cache_dir() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "glm-api"


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the server process needs to know before it loads a model."""

    # Where the gRPC server listens, host:port; port 0 picks a free port.
    grpc_address: str = "127.0.0.1:50051"
    # The models config file (TOML).
    config: Path = DEFAULT_CONFIG
    # Python logging level name.
    log_level: str = "INFO"
    # "text" for people, "json" for log collectors.
    log_format: str = "text"
    # Where converted models (GGUF -> safetensors) are kept between starts.
    cache_dir: Path = field(default_factory=_default_cache_dir)
    # Seconds in-flight calls get to finish after SIGTERM/SIGINT before they are cancelled.
    shutdown_grace_s: float = 10.0
    # On SIGTERM, seconds the server keeps accepting calls after it reports NOT_SERVING, so that
    # a balancer (Envoy's health checks, Kubernetes' endpoints) stops sending it new ones before
    # it refuses them; above Envoy's health-check interval. SIGINT (Ctrl-C) skips the wait.
    drain_delay_s: float = 2.0
    # Server processes `python -m gateway` starts, on consecutive gRPC ports from grpc_address's
    # (and metrics ports from metrics_port's), each with its share of torch_threads; Envoy
    # balances calls over all of them and the supervisor restarts one that dies.
    replicas: int = 1
    # The largest gRPC message received or sent, in bytes (gRPC's own default is 4 MiB).
    max_message_bytes: int = 16 * 1024 * 1024
    # Threads torch may use per operation; 0 keeps torch's default (one per core).
    torch_threads: int = 0
    # Run one tiny request through each model before reporting SERVING.
    warmup: bool = True
    # Where Envoy serves the JSON routes and passes gRPC through (`make run`): the legacy port.
    http_host: str = "127.0.0.1"
    http_port: int = 8100
    # Browser origins allowed by CORS, comma-separated (e.g. "https://app.example.com"); none by
    # default, and never "*" unless written here.
    cors_origins: str = ""
    # Serve the chat page (GET / and its script, web/) on the HTTP port.
    chat_page: bool = True
    # Envoy's log level (trace, debug, info, warning, error, critical, off).
    envoy_log_level: str = "warning"
    # Where Prometheus scrapes the metrics (GET /metrics), on the host of grpc_address; 0 serves
    # none. Off by default: a fixed default port would make two servers on one host (replicas,
    # a test server beside a running one) fail to start, and nobody scrapes a port nobody asked
    # for. 9464 (the usual Prometheus exporter port) is a good choice; servers side by side each
    # take their own.
    metrics_port: int = 0
    # Seconds between the SSE comments (": keep-alive") a streamed JSON chat sends while it waits
    # for its first token, queued behind other requests: proxies with a read timeout (often 60 s)
    # would otherwise close a stream that has sent nothing yet. 0 sends none.
    sse_heartbeat_s: float = 15.0

    # -- security (docs/security.md) ----------------------------------------------------------
    # "auto": API keys are required when api_keys_file is set; without one, only loopback
    # addresses may be served (protected mode). "keys": a keys file is required. "none": no
    # authentication, even on a public address (an explicit opt-out).
    auth: str = "auto"
    # The TOML file of API keys (names, SHA-256 of the keys, allowed models, limits); re-read
    # when it changes. `python -m server keys add NAME` creates a key and appends it.
    api_keys_file: str = ""
    # The window that a key's requests_per_minute and tokens_per_minute are counted over, in
    # seconds: a minute, as the names say; shorter only to test the limits quickly.
    rate_limit_window_s: float = 60.0
    # Serve gRPC server reflection (it lists the services, nothing more; open like health).
    reflection: bool = True
    # PEM certificate chain and private key: TLS on the gRPC port and on Envoy's port (HTTPS
    # and gRPC over TLS), and on Envoy's hop to the server. Both or neither.
    tls_cert_file: str = ""
    tls_key_file: str = ""
    # PEM CA certificates: with it, both ports require a client certificate signed by one of
    # them (mTLS). Needs tls_cert_file.
    tls_client_ca_file: str = ""
    # Host names (the Host / :authority header, port ignored) Envoy answers, comma-separated;
    # "*" for any. Empty: the loopback names when http_host is loopback, else any. A guard
    # against DNS rebinding from web pages.
    http_allowed_hosts: str = ""
    # Envoy's limit on open client connections (its overload manager refuses more).
    http_max_connections: int = 4096
    # Where the metrics are served: loopback unless set (e.g. 0.0.0.0 for a Prometheus in
    # another container).
    metrics_host: str = "127.0.0.1"

    @property
    def cors_origin_list(self) -> tuple[str, ...]:
        """The allowed CORS origins, parsed."""
        return tuple(o.strip() for o in self.cors_origins.split(",") if o.strip())

    @property
    def grpc_host(self) -> str:
        """The host part of grpc_address."""
        return self.grpc_address.rsplit(":", 1)[0]

    @property
    def grpc_port(self) -> int:
        """The port part of grpc_address."""
        return int(self.grpc_address.rsplit(":", 1)[1])

    @property
    def tls(self) -> bool:
        """Whether the server and Envoy serve TLS."""
        return bool(self.tls_cert_file)

    @property
    def http_allowed_host_list(self) -> tuple[str, ...]:
        """The Host names Envoy answers ("*": any), with the default applied."""
        hosts = tuple(h.strip().lower() for h in self.http_allowed_hosts.split(",") if h.strip())
        if hosts:
            return hosts
        return LOOPBACK_NAMES if is_loopback(self.http_host) else ("*",)


# The names of this machine's loopback interface, as clients write them in a Host header.
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")
_AUTH_MODES = ("auto", "keys", "none")


def is_loopback(host: str) -> bool:
    """Whether a listen address only accepts connections from this machine."""
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any interface


# More server processes than this on one host is a typo rather than a plan.
MAX_REPLICAS = 64
_ENV_PREFIX = "GLM_"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _coerce(name: str, raw: str, default: object) -> object:
    """Turn a string from the environment or a flag into the type of the field's default."""
    if isinstance(default, bool):
        lowered = raw.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise ValueError(f"{name}: expected a boolean (true/false), got {raw!r}")
    if isinstance(default, int):
        return int(raw)
    if isinstance(default, float):
        return float(raw)
    if isinstance(default, Path):
        return Path(raw).expanduser()
    return raw


def _validate(settings: Settings) -> Settings:
    host, sep, port = settings.grpc_address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"grpc_address must be host:port, got {settings.grpc_address!r}")
    if settings.log_format not in ("text", "json"):
        raise ValueError(f"log_format must be 'text' or 'json', got {settings.log_format!r}")
    if settings.max_message_bytes < 1024:
        raise ValueError("max_message_bytes must be at least 1024")
    if not 0 <= settings.http_port < 65536:
        raise ValueError(f"http_port must be a TCP port, got {settings.http_port}")
    if not 0 <= settings.metrics_port < 65536:
        raise ValueError(f"metrics_port must be a TCP port or 0, got {settings.metrics_port}")
    if settings.shutdown_grace_s < 0:
        raise ValueError("shutdown_grace_s must not be negative")
    if settings.drain_delay_s < 0:
        raise ValueError("drain_delay_s must not be negative")
    if not 1 <= settings.replicas <= MAX_REPLICAS:
        raise ValueError(f"replicas must be between 1 and {MAX_REPLICAS}, got {settings.replicas}")
    if settings.replicas > 1 and settings.grpc_port == 0:
        raise ValueError("replicas need a fixed grpc_address port (their ports follow it)")
    if settings.replicas > 1 and settings.grpc_port + settings.replicas > 65536:
        raise ValueError("replicas: the gRPC ports after grpc_address's run past 65535")
    if settings.sse_heartbeat_s < 0:
        raise ValueError("sse_heartbeat_s must not be negative (0 sends no heartbeats)")
    _validate_security(settings)
    return settings


def _validate_security(settings: Settings) -> None:
    if settings.auth not in _AUTH_MODES:
        raise ValueError(f"auth must be one of {', '.join(_AUTH_MODES)}, got {settings.auth!r}")
    if settings.auth == "none" and settings.api_keys_file:
        raise ValueError("auth=none turns API keys off: unset api_keys_file, or drop auth=none")
    if settings.auth == "keys" and not settings.api_keys_file:
        raise ValueError("auth=keys needs api_keys_file (GLM_API_KEYS_FILE)")
    if settings.rate_limit_window_s <= 0:
        raise ValueError("rate_limit_window_s must be positive")
    if bool(settings.tls_cert_file) != bool(settings.tls_key_file):
        raise ValueError("tls_cert_file and tls_key_file go together: set both or neither")
    if settings.tls_client_ca_file and not settings.tls_cert_file:
        raise ValueError("tls_client_ca_file (mTLS) needs tls_cert_file and tls_key_file")
    if settings.http_max_connections < 1:
        raise ValueError("http_max_connections must be at least 1")
    problem = protected_mode_problem(settings)
    if problem:
        raise ValueError(problem)


def protected_mode_problem(settings: Settings) -> str | None:
    """Why these settings would serve anyone who can reach the machine, or None.

    Protected mode: without API keys, only loopback addresses are served, unless auth=none
    says so explicitly.
    """
    if settings.auth == "none" or settings.api_keys_file:
        return None
    public = [
        f"{name} {address}"
        for name, address, host in (
            ("GLM_GRPC_ADDRESS", settings.grpc_address, settings.grpc_host),
            ("GLM_HTTP_HOST", settings.http_host, settings.http_host),
        )
        if not is_loopback(host)
    ]
    if not public:
        return None
    return (
        f"protected mode: {' and '.join(public)} can be reached from other machines, and no API "
        "keys are configured. Create a key with `python -m server keys add NAME --file "
        "api-keys.toml` and set GLM_API_KEYS_FILE=api-keys.toml, or listen on 127.0.0.1, or "
        "opt out explicitly with GLM_AUTH=none"
    )


def load_settings(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Build the settings from `GLM_<FIELD>` variables, then `--field` flags on top."""
    environ = os.environ if environ is None else environ
    defaults = Settings()
    values: dict[str, object] = {}
    for f in fields(Settings):
        raw = environ.get(_ENV_PREFIX + f.name.upper())
        if raw is not None and raw != "":
            values[f.name] = _coerce(_ENV_PREFIX + f.name.upper(), raw, getattr(defaults, f.name))

    parser = argparse.ArgumentParser(
        prog="python -m server",
        description="Serve chat, embeddings and tokenization over gRPC (glm.v1.GlmService).",
    )
    for f in fields(Settings):
        parser.add_argument(
            flag_name(f.name),
            dest=f.name,
            default=None,
            metavar=f.name.upper(),
            help=f"(env {_ENV_PREFIX}{f.name.upper()}, default {getattr(defaults, f.name)})",
        )
    parsed = parser.parse_args(argv)
    for f in fields(Settings):
        raw = getattr(parsed, f.name)
        if raw is not None:
            values[f.name] = _coerce(flag_name(f.name), raw, getattr(defaults, f.name))
    return _validate(Settings(**values))  # type: ignore[arg-type]


def flag_name(field_name: str) -> str:
    """The CLI flag of a settings field."""
    return "--" + field_name.replace("_", "-")

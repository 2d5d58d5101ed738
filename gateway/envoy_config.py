"""Renders envoy/envoy.yaml.tmpl from the settings."""

from __future__ import annotations

import json
import string
from dataclasses import dataclass
from pathlib import Path

from server.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "envoy" / "envoy.yaml.tmpl"
DESCRIPTOR = ROOT / "gen" / "glm_v1.binpb"
COMPOSE_CONFIG = ROOT / "envoy" / "envoy.compose.yaml"

# Envoy's own error replies, as (status, OpenAI error type): the same JSON shape the server uses.
_LOCAL_REPLY_TYPES = (
    (400, "invalid_request_error"),
    (404, "not_found_error"),
    (405, "invalid_request_error"),
    (413, "invalid_request_error"),
    (429, "overloaded_error"),
    (500, "server_error"),
    (502, "service_unavailable_error"),
    (503, "service_unavailable_error"),
    (504, "service_unavailable_error"),
)
_CODES = {
    400: "invalid_argument",
    404: "not_found",
    405: "invalid_argument",
    413: "resource_exhausted",
    429: "resource_exhausted",
    500: "internal",
    502: "unavailable",
    503: "unavailable",
    504: "unavailable",
}


@dataclass(frozen=True, slots=True)
class EnvoyTarget:
    """Where Envoy listens and what it proxies to."""

    listen_host: str
    listen_port: int
    backend_host: str
    backend_port: int
    descriptor: str
    cors_origins: tuple[str, ...]
    max_body_bytes: int


def target_from_settings(settings: Settings) -> EnvoyTarget:
    """Envoy beside a local server: the backend is the server's gRPC address."""
    backend_host = settings.grpc_host
    if backend_host in ("0.0.0.0", "[::]", "::"):
        backend_host = "127.0.0.1"  # a wildcard listen address is reachable on loopback
    return EnvoyTarget(
        listen_host=settings.http_host,
        listen_port=settings.http_port,
        backend_host=backend_host,
        backend_port=settings.grpc_port,
        descriptor=str(DESCRIPTOR),
        cors_origins=settings.cors_origin_list,
        max_body_bytes=settings.max_message_bytes,
    )


def compose_target(settings: Settings) -> EnvoyTarget:
    """Envoy in docker-compose: all interfaces, the `server` service's replicas as backend."""
    return EnvoyTarget(
        listen_host="0.0.0.0",
        listen_port=8100,
        backend_host="server",
        backend_port=50051,
        descriptor="/etc/glm-api/glm_v1.binpb",
        cors_origins=settings.cors_origin_list,
        max_body_bytes=settings.max_message_bytes,
    )


def _local_reply_mappers(indent: str) -> str:
    lines = []
    for status, error_type in _LOCAL_REPLY_TYPES:
        body = {
            "error": {
                "message": "%LOCAL_REPLY_BODY%",
                "type": error_type,
                "param": None,
                "code": _CODES[status],
            }
        }
        lines += [
            f"{indent}- filter:",
            f"{indent}    status_code_filter:",
            f"{indent}      comparison:",
            f"{indent}        op: EQ",
            f"{indent}        value: {{default_value: {status}, runtime_key: glm_api.local_reply}}",
            f"{indent}  body_format_override:",
            f"{indent}    json_format: {json.dumps(body)}",
        ]
    return "\n".join(lines)


def render(target: EnvoyTarget) -> str:
    """The Envoy config for `target`."""
    origins = [{"exact": origin} for origin in target.cors_origins]
    return string.Template(TEMPLATE.read_text()).substitute(
        listen_host=json.dumps(target.listen_host),
        listen_port=target.listen_port,
        backend_host=json.dumps(target.backend_host),
        backend_port=target.backend_port,
        descriptor=json.dumps(target.descriptor),
        cors_origins=json.dumps(origins),
        max_body_bytes=target.max_body_bytes,
        local_reply_mappers=_local_reply_mappers(" " * 20),
    )

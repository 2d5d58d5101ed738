"""Renders envoy/envoy.yaml.tmpl from the settings."""

from __future__ import annotations

import json
import re
import string
from dataclasses import dataclass
from pathlib import Path

from google.api import annotations_pb2

from glm.v1 import http_gateway_pb2
from server.service.json_api.common import GRPC_ON_JSON_ROUTE
from server.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "envoy" / "envoy.yaml.tmpl"
DESCRIPTOR = ROOT / "gen" / "glm_v1.binpb"
COMPOSE_CONFIG = ROOT / "envoy" / "envoy.compose.yaml"

# Envoy's own error replies, as (status, OpenAI error type, code): the same JSON shape the server
# uses. 426 answers HTTP/1.0, 431 header floods and huge URLs, 501 unknown transfer encodings.
_LOCAL_REPLY_TYPES = (
    (400, "invalid_request_error", "invalid_argument"),
    (404, "not_found_error", "not_found"),
    (405, "invalid_request_error", "invalid_argument"),
    (413, "invalid_request_error", "resource_exhausted"),
    (426, "invalid_request_error", "failed_precondition"),
    (429, "overloaded_error", "resource_exhausted"),
    (431, "invalid_request_error", "resource_exhausted"),
    (500, "server_error", "internal"),
    (501, "invalid_request_error", "unimplemented"),
    (502, "service_unavailable_error", "unavailable"),
    (503, "service_unavailable_error", "unavailable"),
    (504, "service_unavailable_error", "unavailable"),
)
# Any other error status Envoy answers itself, by class: (lowest, type, code).
_LOCAL_REPLY_CLASSES = (
    (500, "server_error", "unknown"),
    (400, "invalid_request_error", "invalid_argument"),
)


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


def _error_format(error_type: str, code: str, *, detail: bool) -> str:
    error = {"message": "%LOCAL_REPLY_BODY%", "type": error_type, "param": None, "code": code}
    # The seed's routes answer with FastAPI's `detail` beside the error object, as the server
    # does (server/service/json_api/seed.py).
    body = {"detail": "%LOCAL_REPLY_BODY%", "error": error} if detail else {"error": error}
    return json.dumps(body)


def _local_reply_mappers(indent: str) -> str:
    """Mappers for the listed statuses, then one per class for the rest (the first match wins);
    each first for the seed's paths (a body with `detail`), then for any other."""
    lines = []
    filters = [("EQ", status, t, c) for status, t, c in _LOCAL_REPLY_TYPES]
    filters += [("GE", lowest, t, c) for lowest, t, c in _LOCAL_REPLY_CLASSES]
    seed_paths = json.dumps(seed_path_regex())
    for op, status, error_type, code in filters:
        comparison = [
            "status_code_filter:",
            "  comparison:",
            f"    op: {op}",
            f"    value: {{default_value: {status}, runtime_key: glm_api.local_reply}}",
        ]
        lines += [
            f"{indent}- filter:",
            f"{indent}    and_filter:",
            f"{indent}      filters:",
            f"{indent}        - " + comparison[0],
            *(f"{indent}          {line}" for line in comparison[1:]),
            f"{indent}        - header_filter:",
            f"{indent}            header:",
            f'{indent}              name: ":path"',
            f"{indent}              string_match: {{safe_regex: {{regex: {seed_paths}}}}}",
            f"{indent}  body_format_override:",
            f"{indent}    json_format: {_error_format(error_type, code, detail=True)}",
            f"{indent}- filter:",
            *(f"{indent}    {line}" for line in comparison),
            f"{indent}  body_format_override:",
            f"{indent}    json_format: {_error_format(error_type, code, detail=False)}",
        ]
    return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class HttpRule:
    """One JSON route: its HTTP method, and its path (`prefix`: a path template's fixed start)."""

    method: str
    path: str
    prefix: bool = False


def http_rules() -> tuple[HttpRule, ...]:
    """glm.v1.HttpGatewayService's HTTP rules, in the order of its methods."""
    service = http_gateway_pb2.DESCRIPTOR.services_by_name["HttpGatewayService"]
    rules = []
    for method in service.methods:
        for field, rule in method.GetOptions().ListFields():
            if field.full_name != annotations_pb2.http.full_name:
                continue
            pattern = rule.WhichOneof("pattern")
            if pattern is None or pattern == "custom":
                continue
            path = str(getattr(rule, pattern))
            fixed, brace, _ = path.partition("{")
            rules.append(HttpRule(pattern.upper(), fixed if brace else path, bool(brace)))
    return tuple(rules)


def json_routes() -> tuple[str, ...]:
    """The exact paths of the JSON routes (those without path parameters)."""
    return tuple(r.path for r in http_rules() if not r.prefix)


def seed_path_regex() -> str:
    """A regex of the seed's paths (the JSON routes outside /v1/), with any query string."""
    seed_paths = [r.path for r in http_rules() if not r.prefix and not r.path.startswith("/v1/")]
    return "^(" + "|".join(re.escape(p) for p in seed_paths) + r")(\?.*)?$"


def _method_routes(indent: str) -> str:
    """Routes that answer a JSON route's path with another method: 405 with Allow, before the
    transcoder (which would answer 404)."""
    allowed: dict[tuple[str, bool], list[str]] = {}
    for rule in http_rules():
        allowed.setdefault((rule.path, rule.prefix), []).append(rule.method)
    lines = []
    for (path, prefix), methods in allowed.items():
        regex = "^(" + "|".join(sorted(set(methods))) + ")$"
        lines += [
            f"{indent}- match:",
            f"{indent}    {'prefix' if prefix else 'path'}: {json.dumps(path)}",
            f"{indent}    headers:",
            f'{indent}      - name: ":method"',
            f"{indent}        string_match: {{safe_regex: {{regex: {json.dumps(regex)}}}}}",
            f"{indent}        invert_match: true",
            f"{indent}  direct_response:",
            f"{indent}    status: 405",
            f'{indent}    body: {{inline_string: "Method Not Allowed"}}',
            f"{indent}  response_headers_to_add:",
            f"{indent}    - header: {{key: allow, value: {json.dumps(', '.join(methods))}}}",
            f"{indent}  typed_per_filter_config:",
            f"{indent}    envoy.filters.http.grpc_json_transcoder:",
            f'{indent}      "@type": type.googleapis.com/envoy.config.route.v3.FilterConfig',
            f"{indent}      disabled: true",
        ]
    return "\n".join(lines)


def _lua_set(paths: tuple[str, ...]) -> str:
    """A Lua table literal with `paths` as keys (a set)."""
    return "{" + ", ".join(f"[{json.dumps(p)}] = true" for p in paths) + "}"


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
        method_routes=_method_routes(" " * 24),
        json_routes=_lua_set(json_routes()),
        grpc_on_json_route=json.dumps(GRPC_ON_JSON_ROUTE),
    )

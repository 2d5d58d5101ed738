"""Renders envoy/envoy.yaml.tmpl from the settings, and the SDS files Envoy reads TLS files by."""

from __future__ import annotations

import json
import re
import string
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from google.api import annotations_pb2

from glm.v1 import http_gateway_pb2
from server.config import ModelSpec, load_model_specs
from server.domain import ModelKind
from server.service.json_api.common import GRPC_ON_JSON_ROUTE
from server.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "envoy" / "envoy.yaml.tmpl"
DESCRIPTOR = ROOT / "gen" / "glm_v1.binpb"
COMPOSE_CONFIG = ROOT / "envoy" / "envoy.compose.yaml"
# The chat page: index.html (written by hand) and app.js (built by `make web`, committed).
PAGE_DIR = ROOT / "web"
PAGE_FILES = {"/": "index.html", "/app.js": "app.js"}

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


# The status a Host outside the allow-list gets (421 Misdirected Request: not served here).
_HOST_REFUSED_STATUS = 421
_TLS_SOCKET = "envoy.transport_sockets.tls"
_TLS_TYPES = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."
# Where a compose health probe finds Envoy's /healthz in plain HTTP (inside the container only).
COMPOSE_HEALTH_PORT = 8101
# The most server replicas a compose or Kubernetes deployment scales to (the autoscaler's
# maximum): Envoy's circuit breaker there is sized for that many.
MAX_SCALED_REPLICAS = 8
# Envoy's admin socket in a container (compose, Kubernetes): /tmp is its writable scratch space.
CONTAINER_ADMIN_SOCKET = "/tmp/envoy-admin.sock"
# The calls besides chat (Embed, Tokenize, ListModels and their JSON routes) that one replica is
# given at once by Envoy's circuit breaker: they are short and batched, and the server bounds
# nothing but its chat queues, so the breaker is what bounds them.
SHORT_CALLS_PER_REPLICA = 256
# The share of replicas (a percentage) that must pass their health checks for the health probe
# to pass: 1 %, i.e. any one of up to 100, so that one serving replica keeps the proxy serving.
# (Envoy reads a share much below 1 % as no requirement at all.)
_ANY_HEALTHY_PERCENT = 1.0


@dataclass(frozen=True, slots=True)
class EnvoyTls:
    """Envoy's TLS: its certificate, the client CA (mTLS), and TLS on its hop to the server.

    With `sds_dir`, Envoy reads the files through SDS files written there (sds_files()) and
    reloads them when they are replaced; without it they are read once, at start.
    """

    cert_file: str
    key_file: str
    client_ca_file: str | None = None
    # TLS to the server, which must present a certificate this file trusts (None: plaintext).
    backend_trust_file: str | None = None
    sds_dir: str | None = None


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
    tls: EnvoyTls | None = None
    # The Host names served ("*": any).
    allowed_hosts: tuple[str, ...] = ("*",)
    max_connections: int = 4096
    # A plaintext listener that answers only /healthz (0: none), on loopback unless said.
    health_port: int = 0
    health_host: str = "127.0.0.1"
    # Servers on consecutive ports from backend_port (replicas on one host); with a DNS name
    # that resolves to every replica, 1.
    backend_count: int = 1
    # The circuit breaker: calls in flight to all the servers together (replica_capacity()).
    max_requests: int = 1024
    # Retries always allowed at once, whatever the retry budget's share: one replica's calls
    # (replica_capacity()), so that every call in flight on a replica that dies can be retried.
    retry_concurrency: int = SHORT_CALLS_PER_REPLICA
    # Envoy's admin interface (a Unix socket; /healthz reads the replicas' counts from it).
    admin_socket: str = CONTAINER_ADMIN_SOCKET
    # The folder of the chat page's files, served at GET / (None: no page).
    page_dir: str | None = None


def replica_capacity(specs: tuple[ModelSpec, ...]) -> int:
    """The calls one server takes at once before it refuses more: its chat slots and waiting
    lines, plus SHORT_CALLS_PER_REPLICA for everything else."""
    chat = sum(s.max_concurrent + s.max_waiting for s in specs if s.kind is ModelKind.CHAT)
    return chat + SHORT_CALLS_PER_REPLICA


def capacity_for(settings: Settings) -> int:
    """One server's replica_capacity() for the models in settings.config: Envoy's circuit
    breaker holds that many calls per server, and its retries may use as many at once."""
    return replica_capacity(load_model_specs(settings.config))


def target_from_settings(
    settings: Settings, sds_dir: Path | None = None, backend_trust_file: Path | None = None
) -> EnvoyTarget:
    """Envoy beside local servers: the backend is the server's gRPC address, and with replicas
    the ports after it. Its admin socket goes in `sds_dir` (the supervisor's folder), else /tmp.

    With TLS, Envoy serves the server's certificate and speaks TLS to the server too; it trusts
    `backend_trust_file` there (the supervisor writes the server's own certificate into one),
    else the certificate file as it is (its first certificate and any CA certificates after it).
    """
    backend_host = settings.grpc_host
    if backend_host in ("0.0.0.0", "[::]", "::"):
        backend_host = "127.0.0.1"  # a wildcard listen address is reachable on loopback
    tls = None
    if settings.tls:
        tls = EnvoyTls(
            cert_file=str(Path(settings.tls_cert_file).resolve()),
            key_file=str(Path(settings.tls_key_file).resolve()),
            client_ca_file=(
                str(Path(settings.tls_client_ca_file).resolve())
                if settings.tls_client_ca_file
                else None
            ),
            backend_trust_file=str(backend_trust_file or Path(settings.tls_cert_file).resolve()),
            sds_dir=None if sds_dir is None else str(sds_dir),
        )
    capacity = capacity_for(settings)
    return EnvoyTarget(
        listen_host=settings.http_host,
        listen_port=settings.http_port,
        backend_host=backend_host,
        backend_port=settings.grpc_port,
        descriptor=str(DESCRIPTOR),
        cors_origins=settings.cors_origin_list,
        max_body_bytes=settings.max_message_bytes,
        tls=tls,
        allowed_hosts=settings.http_allowed_host_list,
        max_connections=settings.http_max_connections,
        backend_count=settings.replicas,
        max_requests=settings.replicas * capacity,
        retry_concurrency=capacity,
        admin_socket=str((sds_dir or Path("/tmp")) / "glm-api-envoy-admin.sock"),
        page_dir=str(PAGE_DIR) if settings.chat_page else None,
    )


# Where docker-compose mounts its secrets (docker-compose.yml's `secrets:`).
COMPOSE_SECRETS = "/run/secrets"
# Where docker-compose mounts web/ in the Envoy container.
COMPOSE_PAGE_DIR = "/etc/glm-api/web"


def compose_target(settings: Settings) -> EnvoyTarget:
    """Envoy in docker-compose: all interfaces, the `server` service's replicas as backend.

    TLS always, from the compose secrets (read at start: a secret file is bind-mounted, so a
    replaced file reaches the container only through a restart); mTLS when the settings name a
    client CA. The hop to the server stays on the compose network, in plaintext. A plaintext
    /healthz on loopback inside the container serves the compose health probe. The circuit
    breaker is sized for MAX_SCALED_REPLICAS servers (or settings.replicas, if more).
    """
    explicit_hosts = tuple(
        h.strip().lower() for h in settings.http_allowed_hosts.split(",") if h.strip()
    )
    capacity = capacity_for(settings)
    return EnvoyTarget(
        listen_host="0.0.0.0",
        listen_port=8100,
        backend_host="server",
        backend_port=50051,
        descriptor="/etc/glm-api/glm_v1.binpb",
        cors_origins=settings.cors_origin_list,
        max_body_bytes=settings.max_message_bytes,
        tls=EnvoyTls(
            cert_file=f"{COMPOSE_SECRETS}/tls_cert",
            key_file=f"{COMPOSE_SECRETS}/tls_key",
            client_ca_file=(
                f"{COMPOSE_SECRETS}/tls_client_ca" if settings.tls_client_ca_file else None
            ),
        ),
        allowed_hosts=explicit_hosts or ("*",),
        max_connections=settings.http_max_connections,
        health_port=COMPOSE_HEALTH_PORT,
        max_requests=max(settings.replicas, MAX_SCALED_REPLICAS) * capacity,
        retry_concurrency=capacity,
        page_dir=COMPOSE_PAGE_DIR if settings.chat_page else None,
    )


# Kubernetes (deploy/kubernetes): the namespace and headless Service the servers are found by,
# and where the TLS Secret and the descriptor are mounted.
K8S_NAMESPACE = "glm-api"
K8S_SERVER_SERVICE = "glm-api-server"
K8S_TLS_DIR = "/etc/glm-api/tls"
K8S_DESCRIPTOR = "/etc/glm-api/descriptor/glm_v1.binpb"
K8S_CONFIG = ROOT / "deploy" / "kubernetes" / "base" / "envoy" / "envoy.yaml"


def kubernetes_target(settings: Settings) -> EnvoyTarget:
    """Envoy as a Deployment of its own in Kubernetes, in front of the server pods.

    The backend is the headless Service's DNS name (STRICT_DNS: one endpoint per ready pod).
    TLS from the `glm-api-tls` Secret; the hop to the servers is plaintext inside the cluster,
    where a NetworkPolicy admits only Envoy. The plaintext /healthz listener is on every
    interface, for the kubelet's probes. No chat page: its files would need a volume of their own
    in the Envoy pod, which the manifests do not ship.
    """
    return replace(
        compose_target(settings),
        backend_host=f"{K8S_SERVER_SERVICE}.{K8S_NAMESPACE}.svc.cluster.local",
        descriptor=K8S_DESCRIPTOR,
        tls=EnvoyTls(cert_file=f"{K8S_TLS_DIR}/tls.crt", key_file=f"{K8S_TLS_DIR}/tls.key"),
        health_host="0.0.0.0",
        page_dir=None,
    )


def _error_format(error_type: str, code: str, *, detail: bool) -> str:
    error = {"message": "%LOCAL_REPLY_BODY%", "type": error_type, "param": None, "code": code}
    # The legacy routes answer with FastAPI's `detail` beside the error object, as the server
    # does (server/service/json_api/legacy.py).
    body = {"detail": "%LOCAL_REPLY_BODY%", "error": error} if detail else {"error": error}
    return json.dumps(body)


def _local_reply_mappers(indent: str) -> str:
    """Mappers for the listed statuses, then one per class for the rest (the first match wins);
    each first for the legacy paths (a body with `detail`), then for any other."""
    lines = []
    filters = [("EQ", status, t, c) for status, t, c in _LOCAL_REPLY_TYPES]
    filters += [("GE", lowest, t, c) for lowest, t, c in _LOCAL_REPLY_CLASSES]
    legacy_paths = json.dumps(legacy_path_regex())
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
            f"{indent}              string_match: {{safe_regex: {{regex: {legacy_paths}}}}}",
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


def legacy_path_regex() -> str:
    """A regex of the legacy paths (the JSON routes outside /v1/), with any query string."""
    legacy_paths = [r.path for r in http_rules() if not r.prefix and not r.path.startswith("/v1/")]
    return "^(" + "|".join(re.escape(p) for p in legacy_paths) + r")(\?.*)?$"


def _method_routes(indent: str) -> str:
    """Routes that answer a JSON route's path with another method: 405 with Allow, before the
    transcoder (which would answer 404)."""
    allowed: dict[tuple[str, bool], list[str]] = {}
    for rule in http_rules():
        allowed.setdefault((rule.path, rule.prefix), []).append(rule.method)
    lines = []
    for (path, prefix), methods in allowed.items():
        # OPTIONS passes on: a CORS preflight is the CORS filter's to answer on the route below.
        regex = "^(" + "|".join(sorted({*methods, "OPTIONS"})) + ")$"
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


# -- TLS --------------------------------------------------------------------------------------

_SERVER_CERT = "server_cert"
_CLIENT_CA = "client_ca"
_BACKEND_CA = "backend_ca"


def _watched(*files: str) -> dict[str, Any]:
    """A watched_directory for files that share a folder (one watch sees every rename there)."""
    folders = {str(Path(f).parent) for f in files}
    return {"watched_directory": {"path": folders.pop()}} if len(folders) == 1 else {}


def _secrets(tls: EnvoyTls) -> dict[str, dict[str, Any]]:
    """Each secret's body (an SDS Secret without its name), by name."""
    secrets: dict[str, dict[str, Any]] = {
        _SERVER_CERT: {
            "tls_certificate": {
                "certificate_chain": {"filename": tls.cert_file},
                "private_key": {"filename": tls.key_file},
                **_watched(tls.cert_file, tls.key_file),
            }
        }
    }
    for name, ca in ((_CLIENT_CA, tls.client_ca_file), (_BACKEND_CA, tls.backend_trust_file)):
        if ca is not None:
            secrets[name] = {"validation_context": {"trusted_ca": {"filename": ca}, **_watched(ca)}}
    return secrets


def sds_files(target: EnvoyTarget) -> dict[str, str]:
    """The SDS files (name -> YAML) Envoy reads its TLS files through; {} without SDS."""
    if target.tls is None or target.tls.sds_dir is None:
        return {}
    return {
        f"sds-{name}.yaml": json.dumps(
            {"resources": [{"@type": _TLS_TYPES + "Secret", "name": name, **body}]}, indent=2
        )
        + "\n"
        for name, body in _secrets(target.tls).items()
    }


def _secret_ref(tls: EnvoyTls, name: str) -> dict[str, Any]:
    """How a TLS context refers to a secret: by SDS from a file, or inline."""
    assert tls.sds_dir is not None
    return {
        "name": name,
        "sds_config": {
            "path_config_source": {
                "path": str(Path(tls.sds_dir) / f"sds-{name}.yaml"),
                "watched_directory": {"path": tls.sds_dir},
            },
            "resource_api_version": "V3",
        },
    }


def _common_tls_context(tls: EnvoyTls, alpn: list[str], validation: str | None) -> dict[str, Any]:
    secrets = _secrets(tls)
    context: dict[str, Any] = {"alpn_protocols": alpn}
    if tls.sds_dir is not None:
        context["tls_certificate_sds_secret_configs"] = [_secret_ref(tls, _SERVER_CERT)]
        if validation is not None:
            context["validation_context_sds_secret_config"] = _secret_ref(tls, validation)
    else:
        context["tls_certificates"] = [secrets[_SERVER_CERT]["tls_certificate"]]
        if validation is not None:
            context["validation_context"] = secrets[validation]["validation_context"]
    return context


def _listener_tls(tls: EnvoyTls) -> dict[str, Any]:
    """The listener's TLS: HTTPS and gRPC over TLS, ALPN picking HTTP/2 or HTTP/1.1."""
    mtls = tls.client_ca_file is not None
    config: dict[str, Any] = {
        "@type": _TLS_TYPES + "DownstreamTlsContext",
        "common_tls_context": _common_tls_context(
            tls, ["h2", "http/1.1"], _CLIENT_CA if mtls else None
        ),
    }
    if mtls:
        config["require_client_certificate"] = True
    return {"name": _TLS_SOCKET, "typed_config": config}


def _upstream_tls(tls: EnvoyTls) -> dict[str, Any]:
    """TLS on the hop to the server: Envoy presents the server's own certificate (which the
    server accepts as a client certificate under mTLS) and checks the server's against it."""
    return {
        "name": _TLS_SOCKET,
        "typed_config": {
            "@type": _TLS_TYPES + "UpstreamTlsContext",
            "common_tls_context": _common_tls_context(tls, ["h2"], _BACKEND_CA),
        },
    }


# -- the rest -----------------------------------------------------------------------------------


def _host_refusal(target: EnvoyTarget, indent: str) -> str:
    """A virtual host after the served one that answers every other Host with 421."""
    if "*" in target.allowed_hosts:
        return ""
    vhost = {
        "name": "host_not_allowed",
        "domains": ["*"],
        "routes": [
            {
                "match": {"prefix": "/"},
                "direct_response": {
                    "status": _HOST_REFUSED_STATUS,
                    "body": {
                        "inline_string": "this Host is not served here (GLM_HTTP_ALLOWED_HOSTS)"
                    },
                },
            }
        ],
    }
    return f"\n{indent}- {json.dumps(vhost)}"


def _healthz_mapper(indent: str) -> str:
    """/healthz answers with its own JSON body (replica counts), kept as it is: the first
    matching mapper wins, and this one changes nothing."""
    mapper = {
        "filter": {
            "header_filter": {
                "header": {
                    "name": ":path",
                    "string_match": {"safe_regex": {"regex": r"^/healthz(\?.*)?$"}},
                }
            }
        }
    }
    return f"\n{indent}- {json.dumps(mapper)}"


def _host_refusal_mapper(indent: str) -> str:
    """The JSON error body of the Host refusal (a local reply like Envoy's others)."""
    body = {
        "error": {
            "message": "%LOCAL_REPLY_BODY%",
            "type": "invalid_request_error",
            "param": None,
            "code": "host_not_allowed",
        }
    }
    mapper = {
        "filter": {
            "status_code_filter": {
                "comparison": {
                    "op": "EQ",
                    "value": {
                        "default_value": _HOST_REFUSED_STATUS,
                        "runtime_key": "glm_api.host_refused",
                    },
                }
            }
        },
        "body_format_override": {"json_format": body},
    }
    return f"\n{indent}- {json.dumps(mapper)}"


# The chat page is served by Envoy itself, as direct responses read from files at start: the
# files are small and static, so this needs no web server in the model server's process, no
# route or cluster of its own, and it answers while the models load. Envoy caps such bodies
# (max_direct_response_body_size_bytes), and serves what it read at start until restarted.
_PAGE_MAX_BYTES = 1 << 20
_PAGE_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8"}
# The page loads only its own script and talks only to its own origin.
_PAGE_CSP = (
    "default-src 'none'; script-src 'self'; connect-src 'self'; style-src 'unsafe-inline'; "
    "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def _page_routes(target: EnvoyTarget, indent: str) -> str:
    """Routes that answer GET / and GET /app.js with the page's files (none without a page)."""
    if target.page_dir is None:
        return ""
    routes = []
    for path, name in PAGE_FILES.items():
        headers = {
            "content-type": _PAGE_TYPES[Path(name).suffix],
            "content-security-policy": _PAGE_CSP,
            "x-content-type-options": "nosniff",
            "referrer-policy": "no-referrer",
            # Revalidated on every load, so that a new build is picked up after a restart.
            "cache-control": "no-cache",
        }
        route = {
            "match": {
                "path": path,
                "headers": [{"name": ":method", "string_match": {"exact": "GET"}}],
            },
            "direct_response": {
                "status": 200,
                "body": {"filename": str(Path(target.page_dir) / name)},
            },
            # The transcoder would answer an unknown method itself, before the router.
            "typed_per_filter_config": {
                "envoy.filters.http.grpc_json_transcoder": {
                    "@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig",
                    "disabled": True,
                }
            },
            "response_headers_to_add": [
                {
                    "header": {"key": key, "value": value},
                    "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                }
                for key, value in headers.items()
            ],
        }
        routes.append(f"\n{indent}- {json.dumps(route)}")
    return "".join(routes)


def _health_listener(target: EnvoyTarget, indent: str) -> str:
    """A loopback listener in plain HTTP that answers /healthz only (the compose probe)."""
    if not target.health_port:
        return ""
    listener = {
        "name": "health",
        "address": {
            "socket_address": {"address": target.health_host, "port_value": target.health_port}
        },
        "filter_chains": [
            {
                "filters": [
                    {
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.network"
                            ".http_connection_manager.v3.HttpConnectionManager",
                            "stat_prefix": "health",
                            "route_config": {
                                "virtual_hosts": [
                                    {
                                        "name": "health",
                                        "domains": ["*"],
                                        "routes": [
                                            {
                                                "match": {"prefix": "/"},
                                                "direct_response": {"status": 404},
                                            }
                                        ],
                                    }
                                ]
                            },
                            "http_filters": [
                                {
                                    "name": "envoy.filters.http.health_check",
                                    "typed_config": {
                                        "@type": "type.googleapis.com/envoy.extensions.filters"
                                        ".http.health_check.v3.HealthCheck",
                                        "pass_through_mode": False,
                                        "headers": [
                                            {"name": ":path", "string_match": {"exact": "/healthz"}}
                                        ],
                                        "cluster_min_healthy_percentages": {
                                            "glm_backend": {"value": _ANY_HEALTHY_PERCENT}
                                        },
                                    },
                                },
                                {
                                    "name": "envoy.filters.http.router",
                                    "typed_config": {
                                        "@type": "type.googleapis.com/envoy.extensions.filters"
                                        ".http.router.v3.Router"
                                    },
                                },
                            ],
                        },
                    }
                ]
            }
        ],
    }
    return f"\n{indent}- {json.dumps(listener)}"


def _lb_endpoints(target: EnvoyTarget) -> str:
    """The cluster's endpoints: one per server port."""
    return json.dumps(
        [
            {
                "endpoint": {
                    "address": {
                        "socket_address": {"address": target.backend_host, "port_value": port}
                    }
                }
            }
            for port in range(target.backend_port, target.backend_port + target.backend_count)
        ]
    )


def render(target: EnvoyTarget) -> str:
    """The Envoy config for `target` (with SDS, Envoy also needs sds_files(target))."""
    origins = [{"exact": origin} for origin in target.cors_origins]
    tls = target.tls
    listener_tls = upstream_tls = ""
    if tls is not None:
        listener_tls = f"\n{' ' * 10}transport_socket: {json.dumps(_listener_tls(tls))}"
        if tls.backend_trust_file is not None:
            upstream_tls = f"\n{' ' * 6}transport_socket: {json.dumps(_upstream_tls(tls))}"
    return string.Template(TEMPLATE.read_text()).substitute(
        listen_host=json.dumps(target.listen_host),
        listen_port=target.listen_port,
        lb_endpoints=_lb_endpoints(target),
        max_requests=target.max_requests,
        retry_concurrency=target.retry_concurrency,
        admin_socket=json.dumps(target.admin_socket),
        descriptor=json.dumps(target.descriptor),
        cors_origins=json.dumps(origins),
        max_body_bytes=target.max_body_bytes,
        # The Host refusal comes first: the catch-all mappers by status class would take it.
        local_reply_mappers=_healthz_mapper(" " * 20).lstrip("\n")
        + _host_refusal_mapper(" " * 20)
        + "\n"
        + _local_reply_mappers(" " * 20),
        method_routes=_method_routes(" " * 24),
        json_routes=_lua_set(json_routes()),
        grpc_on_json_route=json.dumps(GRPC_ON_JSON_ROUTE),
        max_connections=target.max_connections,
        listener_tls=listener_tls,
        upstream_tls=upstream_tls,
        allowed_hosts=json.dumps(list(target.allowed_hosts)),
        host_refusal=_host_refusal(target, " " * 20),
        health_listener=_health_listener(target, " " * 4),
        page_routes=_page_routes(target, " " * 24),
        page_max_bytes=_PAGE_MAX_BYTES,
    )

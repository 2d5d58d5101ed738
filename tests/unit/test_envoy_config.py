"""The rendered Envoy config: JSON errors for every local reply, and the JSON routes' Lua guard.

What Envoy then does with it is checked against a real Envoy in tests/e2e/test_isolation.py.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from gateway.envoy_config import json_routes, legacy_path_regex, render, target_from_settings
from server.service.json_api.common import GRPC_ON_JSON_ROUTE
from server.settings import Settings


def connection_manager() -> dict[str, object]:
    config = yaml.safe_load(render(target_from_settings(Settings())))
    listener = config["static_resources"]["listeners"][0]
    manager: dict[str, object] = listener["filter_chains"][0]["filters"][0]["typed_config"]
    return manager


def test_json_routes_are_the_gateway_services_http_rules() -> None:
    assert json_routes() == (
        "/chat",
        "/embedding",
        "/tokenize",
        "/models",
        "/v1/chat/completions",
        "/v1/embeddings",
        "/v1/models",
        "/v1/completions",
    )


def status_filter(mapper: dict[str, Any]) -> tuple[str, int, bool]:
    """A mapper's status comparison, and whether it applies to the legacy paths only."""
    found = mapper["filter"]
    legacy_only = "and_filter" in found
    if legacy_only:
        [found, path] = found["and_filter"]["filters"]
        assert path["header_filter"]["header"]["name"] == ":path"
    comparison = found["status_code_filter"]["comparison"]
    return comparison["op"], comparison["value"]["default_value"], legacy_only


def test_the_legacy_paths_regex_matches_them_alone() -> None:
    regex = re.compile(legacy_path_regex())
    for path in ("/chat", "/embedding", "/tokenize", "/models", "/models?x=1"):
        assert regex.match(path), path
    for path in ("/v1/models", "/v1/chat/completions", "/chatty", "/x/chat"):
        assert not regex.match(path), path


def test_a_json_routes_path_with_another_method_is_answered_405_with_allow() -> None:
    hosts = connection_manager()["route_config"]["virtual_hosts"]  # type: ignore[index]
    routes = [r for r in hosts[0]["routes"] if r.get("direct_response", {}).get("status") == 405]
    allowed = {
        (r["match"].get("path") or r["match"]["prefix"]): r["response_headers_to_add"][0]["header"]
        for r in routes
    }
    assert allowed["/chat"] == {"key": "allow", "value": "POST"}
    assert allowed["/models"] == {"key": "allow", "value": "GET"}
    assert allowed["/v1/models/"] == {"key": "allow", "value": "GET"}
    assert set(allowed) == {*json_routes(), "/v1/models/"}
    for route in routes:
        [method] = route["match"]["headers"]
        assert method["name"] == ":method"
        assert method["invert_match"] is True
        # CORS preflights (OPTIONS) pass on to the CORS filter instead of getting a 405.
        allowed_methods = re.compile(method["string_match"]["safe_regex"]["regex"])
        assert allowed_methods.match("OPTIONS")
        assert not allowed_methods.match("DELETE")


def test_every_local_reply_gets_the_json_error_shape() -> None:
    healthz, *mappers = connection_manager()["local_reply_config"]["mappers"]
    # /healthz's own JSON (the replica counts) is kept as it is: the first mapper matches it and
    # changes nothing.
    assert healthz["filter"]["header_filter"]["header"]["name"] == ":path"
    assert "body_format_override" not in healthz
    filters = [status_filter(m) for m in mappers]
    exact = {status for op, status, _ in filters if op == "EQ"}
    # HTTP/1.0 (426), header floods and huge URLs (431), unknown transfer encodings (501).
    assert {400, 404, 405, 413, 426, 431, 501, 502, 503} <= exact
    # Whatever else Envoy answers itself: by class, after the exact ones (the first match wins);
    # each first for the legacy paths, then for the others.
    assert filters[-4:] == [
        ("GE", 500, True),
        ("GE", 500, False),
        ("GE", 400, True),
        ("GE", 400, False),
    ]
    for mapper, (_, _, legacy_only) in zip(mappers, filters, strict=True):
        body = mapper["body_format_override"]["json_format"]
        error = body["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["message"] == "%LOCAL_REPLY_BODY%"
        # The legacy API's clients read FastAPI's `detail`; the others get the error object alone.
        assert set(body) == ({"detail", "error"} if legacy_only else {"error"})
    codes = {
        status: m["body_format_override"]["json_format"]["error"]["code"]
        for m, (op, status, legacy_only) in zip(mappers, filters, strict=True)
        if op == "EQ" and not legacy_only
    }
    assert codes[426] == "failed_precondition"
    assert codes[431] == "resource_exhausted"
    assert codes[501] == "unimplemented"


def test_the_lua_filter_renames_grpc_content_types_on_json_routes() -> None:
    filters = connection_manager()["http_filters"]
    [lua] = [f for f in filters if f["name"] == "envoy.filters.http.lua"]
    source = lua["typed_config"]["default_source_code"]["inline_string"]
    for path in json_routes():
        assert f'["{path}"] = true' in source
    assert f'headers:replace("content-type", "{GRPC_ON_JSON_ROUTE}")' in source
    # Before the transcoder, which passes gRPC content types through untouched.
    names = [f["name"] for f in filters]
    assert names.index("envoy.filters.http.lua") < names.index(
        "envoy.filters.http.grpc_json_transcoder"
    )

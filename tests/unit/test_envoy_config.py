"""The rendered Envoy config: JSON errors for every local reply, and the JSON routes' Lua guard.

What Envoy then does with it is checked against a real Envoy in tests/e2e/test_isolation.py.
"""

from __future__ import annotations

import yaml

from gateway.envoy_config import json_routes, render, target_from_settings
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
    )


def test_every_local_reply_gets_the_json_error_shape() -> None:
    healthz, *mappers = connection_manager()["local_reply_config"]["mappers"]
    # /healthz's own JSON (the replica counts) is kept as it is: the first mapper matches it and
    # changes nothing.
    assert healthz["filter"]["header_filter"]["header"]["name"] == ":path"
    assert "body_format_override" not in healthz
    filters = [
        (
            m["filter"]["status_code_filter"]["comparison"]["op"],
            m["filter"]["status_code_filter"]["comparison"]["value"]["default_value"],
        )
        for m in mappers
    ]
    exact = {status for op, status in filters if op == "EQ"}
    # HTTP/1.0 (426), header floods and huge URLs (431), unknown transfer encodings (501).
    assert {400, 404, 413, 426, 431, 501, 502, 503} <= exact
    # Whatever else Envoy answers itself: by class, after the exact ones (the first match wins).
    assert filters[-2:] == [("GE", 500), ("GE", 400)]
    for mapper in mappers:
        error = mapper["body_format_override"]["json_format"]["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["message"] == "%LOCAL_REPLY_BODY%"
    codes = {
        m["filter"]["status_code_filter"]["comparison"]["value"]["default_value"]: m[
            "body_format_override"
        ]["json_format"]["error"]["code"]
        for m in mappers
        if m["filter"]["status_code_filter"]["comparison"]["op"] == "EQ"
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

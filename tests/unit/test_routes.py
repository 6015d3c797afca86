"""The route table: matching, the BASTION_ROUTES syntax, and what each scope lets a restricted key do."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from bastion.config import Settings, describe
from bastion.routes import CATALOGUE, DEFAULT_ROUTES, TOKEN_ROUTE, ModelScope, RouteTable, parse_routes


def table(*entries: str) -> RouteTable:
    return RouteTable(parse_routes(entries or ("default",)))


def matched(routes: RouteTable, path: str) -> str | None:
    route = routes.match(path)
    return route.path if route is not None else None


def test_the_default_is_the_inference_routes_with_their_models_where_the_gateway_can_see_them() -> None:
    routes = table()
    assert matched(routes, "/v1/chat/completions") == "/v1/chat/completions"
    assert matched(routes, "/v1/models") == "/v1/models"
    assert matched(routes, "/v1/models/Qwen/Qwen2.5-7B-Instruct") == "/v1/models/{model}", "a model id spans segments"
    for path in (
        "/v1/load_lora_adapter",
        "/v1/unload_lora_adapter",
        "/v1/responses/resp_1",
        "/v1/files",
        "/v1/batches",
        "/v1/tokenize",
        "/v1/",
        "/v1/models/",
        "/v1/chat/completions/",
        "/v1/chat",
    ):
        assert routes.match(path) is None, path  # fmt: skip
    scopes = {path: CATALOGUE[path].scope for path in DEFAULT_ROUTES}
    assert ModelScope.UNSCOPED not in scopes.values(), "nothing a restricted key could use to escape its models"
    assert scopes["/v1/models/{model}"] is ModelScope.PATH and scopes["/v1/models"] is ModelScope.LIST


def test_templates_take_one_segment_or_the_rest_and_never_a_dot_segment() -> None:
    routes = table("/v1/responses/{id}", "/v1/responses/{id}/cancel", "/v1/models/{model}")
    assert matched(routes, "/v1/responses/resp_1") == "/v1/responses/{id}"
    assert matched(routes, "/v1/responses/resp_1/cancel") == "/v1/responses/{id}/cancel"
    for path in (
        "/v1/responses/a/b",
        "/v1/responses//cancel",
        "/v1/models/../load_lora_adapter",
        "/v1/models/a/./b",
        "/v1/models//x",
        "/v1/responses/",
    ):
        assert routes.match(path) is None, path  # fmt: skip
    assert RouteTable.model_in_path(CATALOGUE["/v1/models/{model}"], "/v1/models/org/m") == "org/m"


def test_methods_and_the_token_route() -> None:
    assert CATALOGUE["/v1/chat/completions"].methods == {"POST"}
    assert CATALOGUE["/v1/files"].methods == {"GET", "POST"}
    assert TOKEN_ROUTE.scope is ModelScope.GATEWAY and TOKEN_ROUTE.path not in CATALOGUE


def test_the_setting_takes_default_plus_catalogue_routes_and_names_a_mistake() -> None:
    settings = Settings(_env_file=None, routes="default,/v1/files")  # type: ignore[call-arg]
    assert [r.path for r in parse_routes(settings.routes)] == [*DEFAULT_ROUTES, "/v1/files"]
    with pytest.raises(ValidationError) as info:
        Settings(_env_file=None, routes="default,/v1/fiels")  # type: ignore[call-arg]
    message = "\n".join(describe(Settings, info.value))
    assert "BASTION_ROUTES" in message and "unknown route '/v1/fiels'" in message and "/v1/files" in message
    assert Settings(_env_file=None).routes == list(DEFAULT_ROUTES)  # type: ignore[call-arg]

"""The route table (app/routes.py): how paths are classified, and that it classifies every route
vLLM 0.32 defines (from vLLM's own code, tests/vllm_probe.py), so a vLLM upgrade that adds a route
fails here until the route is put in the table as an API or an admin route."""

from __future__ import annotations

import re

import pytest

from app.routes import ADMIN, ENGINE, LOCAL, REFUSED, TABLE, TRTLLM_ONLY, classify, route_label


@pytest.mark.parametrize(
    ("path", "kind", "template"),
    [
        ("/v1/chat/completions", ENGINE, "/v1/chat/completions"),
        ("/v1/responses/resp_123", ENGINE, "/v1/responses/{response_id}"),
        ("/v1/responses/resp_123/cancel", ENGINE, "/v1/responses/{response_id}/cancel"),
        ("/health", LOCAL, "/health"),
        ("/api/v1/historical_metrics/ttft_p95", LOCAL, "/api/v1/historical_metrics/{metric_name}"),
        ("/sleep", ADMIN, "/sleep"),
        ("/release_kv_cache_memory", ADMIN, "/release_kv_cache_memory"),
        ("/abort_requests", ADMIN, "/abort_requests"),
        ("/start_weight_update", ADMIN, "/start_weight_update"),
        ("/finish_weight_update", ADMIN, "/finish_weight_update"),
        ("/update_weight_version", ADMIN, "/update_weight_version"),
        ("/weight_info", ADMIN, "/weight_info"),
        ("/fault_tolerance/apply", ADMIN, "/fault_tolerance/apply"),
        ("/adapters/my-lora", ADMIN, "/adapters/{adapter_name}"),
        ("/metrics", LOCAL, "/metrics"),
        ("/metrics/", REFUSED, "/metrics{path:path}"),  # vLLM's metrics mount answers these
        ("/metricsfoo", REFUSED, "/metrics{path:path}"),
    ],
)
def test_paths_are_classified_by_the_table(path, kind, template):
    route = classify(path)
    assert route is not None and (route.kind, route.path) == (kind, template)
    assert route_label(route) == template


@pytest.mark.parametrize(
    "path",
    [
        "/v1/models/",  # Starlette would redirect; the proxy does not guess
        "/v1/chat/completions?",  # a decoded `?`, `#`, space or control character is never a route
        "/v1/responses/a b",
        "/v1/responses/a\nb",
        "/v1/responses/a#b",
        "/v1/responses/a?b/cancel",
        "/v1/../sleep",
        "/€",
        "/v1/responses/",
        "",
        "/sleep/",
    ],
)
def test_unknown_and_bad_paths_are_not_routes(path):
    assert classify(path) is None
    assert route_label(None) == "other"


def test_the_table_marks_only_probes_for_the_health_port_and_quiets_probes_scrapes_and_the_dashboard():
    assert {r.path for r in TABLE if r.health_port} == {"/health", "/ping"}
    quiet = {r.path for r in TABLE if r.quiet}
    assert {"/health", "/ping", "/metrics", "/dashboard", "/api/v1/live_metrics"} <= quiet
    assert not any(r.quiet for r in TABLE if r.kind in (ENGINE, ADMIN))


def _samples(mount: dict) -> list[str]:
    regex = re.compile(mount["regex"])
    tails = ["", "/", "/x", "x", "/x/y.js"]
    return [mount["mount"] + t for t in tails if regex.match(mount["mount"] + t)]


def test_every_route_vllm_defines_is_in_the_table(vllm_probe):
    """An upgrade of vLLM with a route this table does not know fails here: put it in app/routes.py
    as `_engine(...)` or `_admin(...)` (README, Security)."""
    templates = {r.path for r in TABLE}
    missing = []
    for route in vllm_probe["routes"]:
        if isinstance(route, dict):  # a mount: every path under it must be classified
            missing += [p for p in _samples(route) if classify(p) is None]
        elif route not in templates:
            missing.append(route)
    assert not missing, f"vLLM routes the route table does not classify: {sorted(set(missing))}"


def test_every_engine_route_in_the_table_is_one_vllm_defines(vllm_probe):
    """No stale allow-list entry: each engine or admin route is one of vLLM's."""
    theirs = {r for r in vllm_probe["routes"] if isinstance(r, str)}
    theirs |= {r["mount"] + "/{path:path}" for r in vllm_probe["routes"] if isinstance(r, dict)}
    ours = {r.path for r in TABLE if r.kind in (ENGINE, ADMIN)}
    assert ours - theirs == TRTLLM_ONLY
    assert not TRTLLM_ONLY & theirs  # a route vLLM gained belongs with vLLM's


def test_trtllm_serves_routes_are_passed_on_and_its_internals_need_the_admin_key():
    """ENGINE=trtllm: trtllm-serve's own routes (tensorrt_llm/serve/openai_server.py) are not
    404'd by the proxy; the deeper health check takes an API key, the rest the admin key."""
    assert classify("/health_generate").kind == ENGINE
    for path in TRTLLM_ONLY - {"/health_generate"}:
        assert classify(path).kind == ADMIN, path


def test_the_admin_routes_the_issue_names_are_admin():
    """Issue 12: admin routes missing from the old deny-list."""
    for path in (
        "/release_kv_cache_memory",
        "/abort_requests",
        "/start_weight_update",
        "/finish_weight_update",
        "/update_weight_version",
        "/weight_info",
        "/fault_tolerance/apply",
        "/fault_tolerance/status",
    ):
        route = classify(path)
        assert route is not None and route.kind == ADMIN, path

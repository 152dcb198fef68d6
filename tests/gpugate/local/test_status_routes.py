"""`gpugate status` on a stack that routes shows each tier and provider green / yellow / red, in its table and in
--json, and a red route makes it exit 1. The states come from a real router's metrics text (tests/runtime/
test_routehealth.py drives one in process); supervisord's and the prober's answers are given, so nothing starts."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest
from gpugate_runtime.routehealth import route_health
from prometheus_client import generate_latest
from typer.testing import CliRunner

from gpugate.cli import app
from gpugate.local.gateway import LocalGateway
from tests.gpugate.local.test_provider_keys import with_providers
from tests.runtime.test_routehealth import make_router

RUNNING = [{"name": "router", "statename": "RUNNING", "pid": 42, "now": 100, "start": 40}]


@pytest.fixture
def routed_status(stack_copy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Run `gpugate status` on a local stack with providers whose router reports `metrics_text`."""
    path = stack_copy("local", with_providers, name="routed")

    def run(metrics_text: str, *args: str):
        monkeypatch.setattr(LocalGateway, "processes", lambda self: RUNNING)
        monkeypatch.setattr(LocalGateway, "probe_status", lambda self: [{"check": "health", "ok": True, "seconds": 0.01}])
        monkeypatch.setattr(LocalGateway, "route_health", lambda self: route_health(metrics_text, time.time()))
        env = {"GPUGATE_STATE_DIR": str(tmp_path / "state"), "COLUMNS": "200"}
        return CliRunner().invoke(app, ["status", "--stack", str(path), *args], env=env)

    return run


def test_status_shows_each_route_and_exits_1_while_a_tier_is_held_down(routed_status, tmp_path: Path):
    # given a router that holds its tier general down
    router = make_router(tmp_path)
    router.metrics.tier_up.labels("general").set(0)
    text = generate_latest(router.registry).decode()
    asyncio.run(router.aclose())
    # when status runs, as JSON and as a table
    as_json = routed_status(text, "--json")
    table = routed_status(text)
    # then each route is listed with its state, the held-down tier red, and the stack not healthy
    assert as_json.exit_code == 1, as_json.output
    report = json.loads(as_json.output)
    assert {r["route"]: r["state"] for r in report["routes"]} == {
        "tier:fast": "green", "tier:general": "red", "provider:cloud": "green",
    }  # fmt: skip
    assert report["healthy"] is False
    assert table.exit_code == 1 and "tier:general" in table.output and "held down" in table.output
    assert "routes (from the router's metrics)" in table.output


def test_status_is_healthy_with_a_yellow_route_and_says_why(routed_status, tmp_path: Path):
    router = make_router(tmp_path)
    router.metrics.last_fallback.labels("tier:general").set(time.time() - 20)
    text = generate_latest(router.registry).decode()
    asyncio.run(router.aclose())
    result = routed_status(text, "--json")
    assert result.exit_code == 0, result.output
    (general,) = [r for r in json.loads(result.output)["routes"] if r["route"] == "tier:general"]
    assert general["state"] == "yellow" and general["detail"].startswith("a request fell back from it")

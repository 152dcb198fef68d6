"""Each tier's and provider's green / yellow / red, read from a real router's /metrics text: the router runs in
process (its ASGI app called directly) and its upstreams are closed loopback ports, so no service is started."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from gpugate_runtime.contract.host import KEY_ID_HEADER, REQUEST_ID_HEADER
from gpugate_runtime.contract.routing import RoutePolicy
from gpugate_runtime.routehealth import RECENT_S, SLOW_TTFT_S, State, route_health
from gpugate_runtime.router import Router
from gpugate_runtime.routetable import ModelRoute, ProviderRoute, RouteTable, TierRoute
from prometheus_client import generate_latest


def closed_port() -> int:
    """A loopback port nothing listens on (bound, never listened, then closed): connections to it are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_router(tmp_path: Path) -> Router:
    (tmp_path / "vllm_api_key").write_text("internal\n")
    (tmp_path / "provider_cloud_api_key").write_text("sk-provider\n")
    table = RouteTable(
        default_policy=RoutePolicy.LOCAL_FIRST,
        tiers={
            "general": TierRoute(url=f"http://127.0.0.1:{closed_port()}", served_name="general"),
            "fast": TierRoute(url=f"http://127.0.0.1:{closed_port()}", served_name="fast"),
        },
        providers={
            "cloud": ProviderRoute(
                base_url=f"http://127.0.0.1:{closed_port()}/v1", key_file=tmp_path / "provider_cloud_api_key",
                models={"general": "cloud-large"}, input_usd_per_mtok=1.0, output_usd_per_mtok=4.0,
            )  # fmt: skip
        },
        models={"general": ModelRoute(tier="general", provider="cloud"), "fast": ModelRoute(tier="fast")},
        connect_timeout_seconds=2,
        hold_down_seconds=60,
    )
    return Router(table, tmp_path / "route.log", tmp_path / "vllm_api_key")


async def chat(router: Router, model: str) -> int:
    """One chat completion through the router's ASGI app, as Caddy would send it; returns the status."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]}).encode()
    headers = [(REQUEST_ID_HEADER.lower().encode(), b"req-1"), (KEY_ID_HEADER.lower().encode(), b"key-1")]
    scope = {"type": "http", "path": "/v1/chat/completions", "method": "POST", "headers": headers}
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await router(scope, receive, send)
    return next(m["status"] for m in sent if m["type"] == "http.response.start")


def states(router: Router, now: float) -> dict[str, tuple[State, str]]:
    return {h.route: (h.state, h.detail) for h in route_health(generate_latest(router.registry).decode(), now)}


def test_a_tier_that_refuses_and_a_provider_that_fails_are_red_and_a_tier_not_asked_is_green(tmp_path: Path):
    async def scenario() -> dict[str, tuple[State, str]]:
        router = make_router(tmp_path)
        try:
            # given no route at all yet asked: every route is reported, green
            before = states(router, time.time())
            assert {route: state for route, (state, _) in before.items()} == {
                "tier:fast": State.GREEN, "tier:general": State.GREEN, "provider:cloud": State.GREEN,
            }  # fmt: skip
            assert before["provider:cloud"][1] == "serving, no request yet"
            # when a local-first request finds the tier and its provider both refusing connections
            assert await chat(router, "general") == 503
            return states(router, time.time())
        finally:
            await router.aclose()

    after = asyncio.run(scenario())
    # then the tier is held down (red), the provider failing (red), and the untouched tier still green
    assert after["tier:general"][0] is State.RED and after["tier:general"][1].startswith("held down")
    assert after["provider:cloud"][0] is State.RED and "no success yet" in after["provider:cloud"][1]
    assert after["tier:fast"][0] is State.GREEN
    assert list(after) == ["tier:fast", "tier:general", "provider:cloud"], "tiers first, each once"


@pytest.mark.parametrize(
    ("event", "age", "state"),
    [
        ("fallback", 10, State.YELLOW),
        ("fallback", RECENT_S + 1, State.GREEN),
        ("failure", 10, State.YELLOW),  # a tier's failure after its last success, not held down
        ("failure", RECENT_S + 1, State.GREEN),
        ("slow", 0, State.YELLOW),
        ("none", 0, State.GREEN),
    ],
)
def test_a_tier_is_yellow_after_a_recent_fallback_failure_or_slow_first_tokens_and_green_again_later(
    tmp_path: Path, event: str, age: float, state: State
):
    router = make_router(tmp_path)
    now = time.time()
    # given a tier that answered a minute ago, then the event (set where the router sets it, read from its exposition)
    router.metrics.last_success.labels("tier:general").set(now - 60)
    router.metrics.ttft_average.labels("tier:general").set(SLOW_TTFT_S + 0.5 if event == "slow" else 0.3)
    if event == "fallback":
        router.metrics.last_fallback.labels("tier:general").set(now - age)
    if event == "failure":
        router.metrics.last_failure.labels("tier:general").set(now - age)
    # then
    assert states(router, now)["tier:general"][0] is state
    asyncio.run(router.aclose())


def test_a_provider_that_answered_since_its_last_failure_is_yellow_not_red(tmp_path: Path):
    router = make_router(tmp_path)
    now = time.time()
    router.metrics.last_failure.labels("provider:cloud").set(now - 30)
    router.metrics.last_success.labels("provider:cloud").set(now - 5)
    assert states(router, now)["provider:cloud"] == (State.YELLOW, "an attempt failed 30 s ago")
    router.metrics.last_success.labels("provider:cloud").set(now - 40)
    assert states(router, now)["provider:cloud"][0] is State.RED
    asyncio.run(router.aclose())

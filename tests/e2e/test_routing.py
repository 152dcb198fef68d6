"""Routing end to end, real parts only: two local tiers and an external provider, each a real vLLM CPU process
(the same small model under three names; the provider with a key of its own), behind the real Caddy, authz and
router rendered from a routing copy of the local stack. The tests run in order on one module-scoped gateway:
the tiers answer, a killed tier falls back to the provider within 2 s (local-first) or gets 503 + Retry-After
(local-only), a restarted tier takes traffic back, and the route header, route log and router metrics say
what happened. No prompt reaches any file."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from gpugate_runtime.contract.host import CADDY_GO_ENV, HostLayout, Ports
from gpugate_runtime.contract.routing import ROUTE_HEADER, ROUTE_POLICY_HEADER, RouteRecord
from gpugate_runtime.keys import Scope, rotate_key

from gpugate.render.bundle import write_bundle
from gpugate.stackfile import load_stack
from gpugate.targets import render_bundle
from tests.conftest import edit_stack
from tests.e2e.conftest import VllmServer, find_free_port, running_vllm
from tests.e2e.gateway_fixtures import CADDY, INTERNAL_KEY, REPO, Gateway, _stop, free_internal_base, free_port, wait_until

# The fixture starts three vLLMs (and the restart test one more): longer than pytest's default 600 s on a busy machine.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(2400)]

GENERAL, FAST, PROVIDER_MODEL = "smollm2-135m-instruct", "smollm2-fast", "provider-smollm2"
PROVIDER_KEY = "sk-provider-" + os.urandom(8).hex()
CANARY = "canary-" + os.urandom(6).hex() + " say the word blue"
# Three vLLMs start one after the other on a small shared machine: each may take minutes there.
START_TIMEOUT_S = 600


@dataclass
class Routed:
    gateway: Gateway
    key: str
    vllm_python: Path
    model: Path
    root: Path
    tiers: dict[str, contextlib.ExitStack]

    def chat(self, model: str, policy: str | None = None, key: str | None = None, **body: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key or self.key}"}
        if policy:
            headers[ROUTE_POLICY_HEADER] = policy
        payload = {"model": model, "messages": [{"role": "user", "content": CANARY}], "max_tokens": 4, **body}
        with self.gateway.client() as client:  # a CPU model on a busy machine: more than the client's 10 s
            return self.gateway.request(client, "POST", "/v1/chat/completions", json=payload, headers=headers, timeout=120)

    def start_tier(self, name: str, served: str, port: int) -> VllmServer:
        stack = contextlib.ExitStack()
        workdir = self.root / f"vllm-{name}-{time.monotonic_ns()}"
        workdir.mkdir()
        server = stack.enter_context(
            running_vllm(
                self.vllm_python,
                self.model,
                workdir,
                served_model_name=served,
                key=INTERNAL_KEY,
                port=port,
                health_timeout=START_TIMEOUT_S,
            )
        )
        self.tiers[name] = stack
        return server

    def stop_tier(self, name: str) -> None:
        self.tiers.pop(name).close()

    def records(self) -> list[RouteRecord]:
        return [RouteRecord.from_json(line) for line in self.gateway.layout.route_log.read_text().splitlines()]

    def router_metrics(self) -> str:
        return httpx.get(f"http://127.0.0.1:{self.gateway.ports.router}/metrics", timeout=5).text


@pytest.fixture(scope="module")
def routed(vllm_python: Path, smollm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Routed]:
    root = tmp_path_factory.mktemp("routed")
    base, https_port, http_port, provider_port = free_internal_base(span=12), free_port(), free_port(), find_free_port()

    def change(config: dict[str, Any]) -> None:
        config["gpugate:ports"] = {"https": https_port, "http": http_port, "internal_base": base}
        config["gpugate:tiers"] = {"fast": {"model": {**config["gpugate:model"], "served_name": FAST}}}
        cloud = {"base_url": f"http://127.0.0.1:{provider_port}/v1", "models": {GENERAL: PROVIDER_MODEL}}
        config["gpugate:providers"] = {"cloud": {**cloud, "input_usd_per_mtok": 0.15, "output_usd_per_mtok": 0.6}}
        config["gpugate:routing"] = {"hold_down_seconds": 1, "retry_after_seconds": 3, "first_byte_timeout_seconds": 120}

    layout = HostLayout(root / "host")
    stack = load_stack(edit_stack("local", root / "Pulumi.routed.yaml", change))
    write_bundle(render_bundle(stack, layout, smollm_dir), layout.etc)
    for directory in (layout.logs, layout.state, root / "home", layout.secrets):
        directory.mkdir(parents=True, exist_ok=True)
    layout.caddy_storage.mkdir(mode=0o700, parents=True, exist_ok=True)
    for path, secret in ((layout.vllm_key_file, INTERNAL_KEY), (layout.provider_key_file("cloud"), PROVIDER_KEY)):
        path.write_text(secret + "\n")
        path.chmod(0o600)
    ports = Ports(base)
    gateway = Gateway(
        root=root,
        layout=layout,
        ports=ports,
        https_port=https_port,
        http_port=http_port,
        upstream=None,
        ca_file=layout.local_ca_file,
    )
    state = Routed(gateway, "", vllm_python, smollm_dir, root, {})
    home = str(root / "home")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": home, "XDG_CONFIG_HOME": home, "XDG_DATA_HOME": home}
    runtime_env = {
        **env,
        "GPUGATE_ENV_FILE": str(layout.runtime_env),
        "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "runtime")]),
    }
    provider = contextlib.ExitStack()
    try:
        provider_dir = root / "provider"
        provider_dir.mkdir()
        # The external provider: a third real vLLM with a key of its own, on a port the stack reaches as a URL.
        provider.enter_context(
            running_vllm(
                vllm_python,
                smollm_dir,
                provider_dir,
                served_model_name=PROVIDER_MODEL,
                key=PROVIDER_KEY,
                port=provider_port,
                health_timeout=START_TIMEOUT_S,
            )
        )
        state.start_tier("general", GENERAL, ports.vllm)
        state.start_tier("fast", FAST, ports.tier(0))
        for service in ("authz", "router"):
            with (layout.logs / f"{service}.stderr.log").open("wb") as out:
                gateway.processes.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "gpugate_runtime", service, "serve"], env=runtime_env, stdout=out, stderr=out
                    )
                )
        with (layout.logs / "caddy.log").open("wb") as out:
            gateway.processes.append(
                subprocess.Popen(
                    [CADDY, "run", "--adapter", "caddyfile", "--config", str(layout.etc / "caddy" / "Caddyfile")],
                    env={**env, **CADDY_GO_ENV, "GPUGATE_VLLM_API_KEY": INTERNAL_KEY},
                    stdout=out,
                    stderr=out,
                )
            )
        for port in (ports.authz, ports.router):
            wait_until(
                lambda p=port: httpx.get(f"http://127.0.0.1:{p}/health", timeout=1).status_code == 200, 30, what=f"port {port}"
            )
        wait_until(gateway.ca_file.exists, 20, what="Caddy's local CA")
        with gateway.client() as client:
            wait_until(lambda: gateway.request(client, "GET", "/healthz").status_code == 200, 20, what="Caddy")
        wait_until(lambda: "following access log" in gateway.authz_log.read_text(), 10, what="authz to follow the access log")
        state.key = gateway.new_key("routing-e2e").token
        yield state
    finally:
        for process in reversed(gateway.processes):
            _stop(process)
        for name in list(state.tiers):
            state.stop_tier(name)
        provider.close()


def test_each_local_tier_answers_its_own_model_and_says_so(routed: Routed) -> None:
    general, fast = routed.chat(GENERAL), routed.chat(FAST)
    assert general.status_code == 200 and general.headers[ROUTE_HEADER] == "tier:general"
    assert fast.status_code == 200 and fast.headers[ROUTE_HEADER] == "tier:fast"
    assert general.json()["model"] == GENERAL and fast.json()["model"] == FAST
    with routed.gateway.client() as client:
        listed = routed.gateway.request(client, "GET", "/v1/models", headers={"Authorization": f"Bearer {routed.key}"}).json()[
            "data"
        ]
    assert {m["id"] for m in listed} == {GENERAL, FAST}


def test_a_killed_tier_falls_back_to_the_provider_within_two_seconds(routed: Routed) -> None:
    routed.stop_tier("general")
    started = time.monotonic()
    answer = routed.chat(GENERAL, max_tokens=1)
    elapsed = time.monotonic() - started
    assert answer.status_code == 200, answer.text
    assert answer.headers[ROUTE_HEADER] == "provider:cloud"
    assert answer.json()["model"] == PROVIDER_MODEL, "the provider got its own model name"
    assert elapsed < 2, f"fallback answer took {elapsed:.2f} s"
    record = routed.records()[-1]
    assert (record.route, record.fallback, record.model, record.status) == ("provider:cloud", True, GENERAL, 200)
    assert record.input_tokens > 0 and record.output_tokens > 0 and record.cost_usd > 0


def test_local_only_gets_503_with_retry_after_while_the_tier_is_down(routed: Routed) -> None:
    answer = routed.chat(GENERAL, policy="local-only")
    assert answer.status_code == 503
    assert answer.headers["Retry-After"] == "3"
    assert "local-only" in answer.json()["error"]["message"]
    assert routed.records()[-1].route == "none"


def test_a_stream_falls_back_before_its_first_byte_and_counts_its_tokens(routed: Routed) -> None:
    answer = routed.chat(GENERAL, stream=True)
    assert answer.headers[ROUTE_HEADER] == "provider:cloud"
    events = [line for line in answer.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and not any('"usage"' in e and '"choices":[]' in e for e in events)
    record = routed.records()[-1]
    assert record.output_tokens > 0 and record.ttft_ms is not None


def test_traffic_returns_to_the_restarted_tier(routed: Routed) -> None:
    routed.start_tier("general", GENERAL, routed.gateway.ports.vllm)
    wait_until(
        lambda: routed.chat(GENERAL).headers.get(ROUTE_HEADER) == "tier:general",
        30,
        interval=0.5,
        what="traffic back on the tier",
    )
    assert 'gpugate_route_tier_up{tier="general"} 1.0' in routed.router_metrics()


def test_router_metrics_match_what_happened(routed: Routed) -> None:
    metrics = routed.router_metrics()
    assert 'gpugate_route_fallbacks_total{from_route="tier:general",policy="local-first",to_route="provider:cloud"}' in metrics
    assert 'gpugate_route_errors_total{reason="connect",route="tier:general"}' in metrics
    assert 'gen_ai_client_token_usage_count{gen_ai_token_type="output",route="provider:cloud"}' in metrics
    assert 'gen_ai_server_time_to_first_token_seconds_count{route="tier:fast"}' in metrics
    fallbacks = [r for r in routed.records() if r.fallback]
    assert fallbacks and all(r.route == "provider:cloud" for r in fallbacks)


def test_no_prompt_and_no_provider_key_in_any_file(routed: Routed) -> None:
    offenders = []
    checked = 0
    for path in routed.root.rglob("*"):
        # The provider's key is in its two key files only: the gateway's secret and the provider vLLM's own.
        if not path.is_file() or path in (
            routed.gateway.layout.provider_key_file("cloud"),
            routed.root / "provider" / "vllm_api_key",
        ):
            continue
        data = path.read_bytes()
        checked += 1
        if CANARY.encode() in data or PROVIDER_KEY.encode() in data:
            offenders.append(str(path))
    assert checked > 10, "the walk saw the state dir's files"
    assert offenders == []


def test_a_spent_token_budget_gets_429_naming_it_and_rotation_keeps_the_spend(routed: Routed) -> None:
    # given a key whose family may spend 60 tokens a day (one answer here is about 40: prompt + 4 tokens)
    issued = routed.gateway.new_key("budgeted", scope=Scope(budget_tokens=60, budget_period="day"))
    key = issued.token
    # when it asks until refused (authz counts each answer from the route log within one store check)
    answers: list[httpx.Response] = []
    deadline = time.monotonic() + 180
    while len(answers) < 8 and time.monotonic() < deadline:
        answers.append(routed.chat(GENERAL, key=key))
        if answers[-1].status_code == 429:
            break
        time.sleep(0.3)
    # then it was served until its spend passed the budget, and then refused with the budget's name and reset
    statuses = [a.status_code for a in answers]
    assert statuses[0] == 200 and statuses[-1] == 429 and set(statuses[:-1]) == {200}, statuses
    served = [r for r in routed.records() if r.status == 200 and r.key_id == issued.record.id]
    assert sum(r.input_tokens + r.output_tokens for r in served) >= 60
    refusal = answers[-1]
    error = refusal.json()["error"]
    assert error["code"] == "budget_exceeded" and "token budget 'day'" in error["message"] and "60 tokens" in error["message"]
    assert "resets at" in error["message"] and int(refusal.headers["Retry-After"]) > 0
    assert ROUTE_HEADER not in refusal.headers, "refused by authz, before the router"
    # and the key that replaces it by rotation inherits the spend: refused from its first request
    rotated = rotate_key(routed.gateway.layout.key_store, "budgeted", overlap=timedelta(0), expires=timedelta(days=1))
    # (401 until authz has reloaded the store; its first answer after that must already be the refusal: a fresh
    # family would be served, and would spend, first)
    first: list[httpx.Response] = []
    for _ in range(20):
        first.append(routed.chat(GENERAL, key=rotated.issued.token))
        if first[-1].status_code != 401:
            break
        time.sleep(0.5)
    assert first[-1].status_code == 429, [a.status_code for a in first]
    assert first[-1].json()["error"]["code"] == "budget_exceeded"

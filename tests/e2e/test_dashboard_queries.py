"""Every panel of the local stack's dashboard, queried against that stack's own Prometheus, shows data."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import openai
import pytest
from gpugate_runtime.contract.host import HostLayout

from gpugate.render.dashboards import executable, panel_queries, panels
from gpugate.local.gateway import LocalGateway
from gpugate.stackfile import load_stack
from tests.e2e.local_stack import RunningStack, running_local_stack

pytestmark = pytest.mark.e2e

AUTHZ_BACK_TIMEOUT_S = 30
# Prometheus scrapes every 15 s, and rate() needs two samples of a series that the traffic only
# just created: four scrapes are plenty, and the wait ends as soon as every panel has data.
DATA_TIMEOUT_S = 120
POLL_S = 5
# What Grafana's $__rate_interval becomes here: wide enough to hold all of this module's traffic.
WINDOW = "5m"

SPEC = load_stack("local").spec  # the running copy differs only in its ports
QUERIES = panel_queries(SPEC)
# Panels that cannot have data on this machine, and why. Only panels of the GPU row may be listed,
# and only while the stack runs vLLM's CPU build (checked below); an entry that starts seeing data
# fails too, so the list cannot go stale.
NO_DATA_ON_CPU = {"GPU memory used": "no GPU: the prober exports no GPU memory series on a CPU host"}


@dataclass
class Traffic:
    """What the module sent through the stack, by the status each request ended with."""

    stack: RunningStack
    statuses: dict[str, list[int]] = field(default_factory=dict)
    limited_key_id: str = ""


def _status(call) -> int:
    """The HTTP status the official client ended with: 200 or the status of the error it raised."""
    try:
        call()
    except openai.APIStatusError as err:
        return err.status_code
    return 200


@pytest.fixture(scope="module")
def stack(tmp_path_factory, vllm_python, smollm_dir) -> Iterator[RunningStack]:
    """A private copy of the local stack on free ports with its own state dir, up for this module only."""
    with running_local_stack(tmp_path_factory.mktemp("dashboard-stack")) as running:
        yield running


def _server_error_while_authz_is_stopped(stack: RunningStack) -> int:
    """Stop authz under the stack's supervisord, send one request, start it again: Caddy answers 5xx meanwhile."""
    supervisor = LocalGateway(load_stack(str(stack.stack_file)), HostLayout(stack.state)).supervisor().supervisor
    supervisor.stopProcess("authz")
    try:
        return _status(lambda: stack.client().models.list())
    finally:
        supervisor.startProcess("authz")
        deadline = time.monotonic() + AUTHZ_BACK_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{stack.ports['authz']}/metrics", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)


@pytest.fixture(scope="module")
def traffic(stack: RunningStack) -> Traffic:
    """A little of everything the dashboard shows: a 5xx, completions (one streamed), 401s, a 429."""
    sent = Traffic(stack)
    # The 5xx first: restarting authz resets its counters, which the refusals below must land in.
    sent.statuses["5xx"] = [_server_error_while_authz_is_stopped(stack)]
    chat = stack.client().chat.completions
    ok = [
        _status(lambda: chat.create(model=stack.model, messages=[{"role": "user", "content": "Say hello"}], max_tokens=8))
        for _ in range(3)
    ]
    ok.append(_status(lambda: list(chat.create(
        model=stack.model, messages=[{"role": "user", "content": "Count to five"}], max_tokens=12, stream=True))))
    sent.statuses["ok"] = ok
    bad_keys = ("not-a-key", "ggk_000000000000_" + "0" * 64)  # malformed, and well formed but unknown
    sent.statuses["401"] = [_status(lambda k=k: stack.client(k).models.list()) for k in bad_keys]
    limited = stack.keys("create", "dashboard-limited", "--rpm", "1")
    sent.limited_key_id = limited["id"]
    sent.statuses["429"] = [_status(lambda: stack.client(limited["key"]).models.list()) for _ in range(2)]
    return sent


def _query(stack: RunningStack, expr: str) -> list[dict]:
    response = httpx.get(f"http://127.0.0.1:{stack.ports['prometheus']}/api/v1/query", params={"query": expr}, timeout=10)
    body = response.json()
    assert body["status"] == "success", body  # a query Prometheus refuses fails here, not as "no data"
    return body["data"]["result"]


def _has_data(result: list[dict]) -> bool:
    return any(math.isfinite(float(sample["value"][1])) for sample in result)


@pytest.fixture(scope="module")
def results(traffic: Traffic) -> dict[tuple[str, str], list[dict]]:
    """Every panel query's result, taken once every panel that can have data has it (or the wait ran out)."""
    deadline = time.monotonic() + DATA_TIMEOUT_S
    while True:
        found = {(title, expr): _query(traffic.stack, executable(expr, WINDOW)) for title, expr in QUERIES}
        waiting = [k for k, result in found.items() if k[0] not in NO_DATA_ON_CPU and not _has_data(result)]
        if not waiting or time.monotonic() > deadline:
            return found
        time.sleep(POLL_S)


def test_the_traffic_produced_a_5xx_successes_401s_and_a_429(traffic):
    assert traffic.statuses["5xx"][0] >= 500
    assert traffic.statuses["ok"] == [200] * 4
    assert traffic.statuses["401"] == [401, 401]
    assert traffic.statuses["429"] == [200, 429]


@pytest.mark.parametrize(("title", "expr"), QUERIES, ids=[f"{t}:{i}" for i, (t, _) in enumerate(QUERIES)])
def test_panel_query_returns_data_from_the_stacks_prometheus(results, title, expr):
    result = results[(title, expr)]
    if title in NO_DATA_ON_CPU and SPEC.gpu.type == "cpu":
        assert result == [], f"{title!r} has data now: remove it from NO_DATA_ON_CPU"
    else:
        assert _has_data(result), f"{title!r}: no data within {DATA_TIMEOUT_S} s for {executable(expr, WINDOW)}"


def test_refusals_are_broken_down_by_the_key_that_caused_them(results, traffic):
    def series(title: str) -> set[tuple[str, str]]:
        found = next(r for (t, _), r in results.items() if t == title)
        return {(s["metric"]["key_id"], s["metric"]["outcome"]) for s in found}

    assert {("-", "malformed_key"), ("-", "unknown_key")} <= series("401 rate by key id")
    assert (traffic.limited_key_id, "rate_limited") in series("429 rate by key id")


def test_no_data_is_excused_only_for_gpu_panels_on_a_cpu_stack():
    assert SPEC.gpu.type == "cpu"
    gpu_panels = {p.title for p in panels(SPEC) if p.row == "GPU"}
    assert set(NO_DATA_ON_CPU) <= gpu_panels

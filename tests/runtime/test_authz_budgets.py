"""authz over real HTTP with scoped keys: the scope header, token and cost budgets, tpm, spend kept across
rotation and restart. Spend comes from route-log lines written here as the router writes them."""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from gpugate_runtime.contract import metrics as metricnames
from gpugate_runtime.contract.host import KEY_ID_HEADER
from gpugate_runtime.contract.routing import KEY_SCOPE_HEADER, KeyScope, RoutePolicy, RouteRecord
from gpugate_runtime.keys import Scope, read_store, rotate_key
from gpugate_runtime.spend import period_end
from tests.runtime.test_authz import AuthzProcess, error_of, own_authz, wait_for  # noqa: F401 - own_authz is a fixture

# seconds: authz reads the route log at each store check (0.5 s); the rest is margin for a busy machine
ACCOUNTED_WITHIN = 10
# Each test runs its own authz process: not part of the service-free fast subset.
pytestmark = pytest.mark.e2e


def spend(authz: AuthzProcess, family: str, tokens: int = 0, usd: float = 0.0, key_id: str = "0" * 12) -> None:
    """Append what the router writes when a request of `family` ends."""
    record = RouteRecord(
        ts=time.time(), request_id=f"r-{time.monotonic_ns()}", key_id=key_id, family=family, model="smol",
        policy="local-first", route="tier:general", status=200, input_tokens=tokens // 2, output_tokens=tokens - tokens // 2,
        cost_usd=usd,
    )  # fmt: skip
    with (authz.log_file.parent / "route.log").open("a") as handle:
        handle.write(record.to_json() + "\n")


def refused(authz: AuthzProcess, token: str):  # noqa: ANN201
    """The first 429 for the budget or tpm, polled: each allowed poll ends at once (its access-log line), so the
    polls never hold the key's concurrency slots and a slow accounting cannot turn into a concurrency 429."""

    def ask() -> httpx.Response | None:
        request_id = f"poll-{time.monotonic_ns()}"
        response = authz.ask(token, request_id=request_id)
        if response.status_code == 200:
            authz.finish(response.headers[KEY_ID_HEADER], request_id)
        if response.status_code == 429:
            return response
        time.sleep(0.25)  # at most ~4 polls a second: within the key's rpm however slow the accounting
        return None

    return wait_for(ask, ACCOUNTED_WITHIN, "the spend to be accounted")


def test_an_allowed_request_carries_the_keys_scope_for_the_router(own_authz) -> None:  # noqa: ANN001
    authz = own_authz(default_route_policy="cost-optimized")
    key = authz.key("scoped", scope=Scope(models=("smol",), policies=(RoutePolicy.LOCAL_ONLY, RoutePolicy.COST_OPTIMIZED)))
    plain = authz.key("plain")
    scoped = KeyScope.from_header(authz.ask(key.token).headers[KEY_SCOPE_HEADER])
    unscoped = KeyScope.from_header(authz.ask(plain.token).headers[KEY_SCOPE_HEADER])
    assert scoped == KeyScope(
        family=key.record.id,
        default_policy=RoutePolicy.COST_OPTIMIZED,
        policies=(RoutePolicy.LOCAL_ONLY, RoutePolicy.COST_OPTIMIZED),
        models=("smol",),
    )
    assert unscoped == KeyScope(family=plain.record.id, default_policy=RoutePolicy.COST_OPTIMIZED)
    assert KEY_SCOPE_HEADER not in authz.ask("ggk_" + "0" * 12 + "_" + "f" * 64).headers


def test_a_spent_token_budget_gets_429_naming_the_budget_family_and_reset(own_authz) -> None:  # noqa: ANN001
    # given a key with 1000 tokens a month, 600 spent
    authz = own_authz()
    key = authz.key("monthly", scope=Scope(budget_tokens=1000))
    family = key.record.id
    spend(authz, family, tokens=600)
    time.sleep(1)
    assert authz.ask(key.token).status_code == 200
    # when the family reaches 1000
    spend(authz, family, tokens=400)
    response = refused(authz, key.token)
    # then 429 says which budget, whose, and when it resets, and Retry-After waits until then
    reset = period_end("month", time.time())
    message = error_of(response)["message"]
    assert f"token budget 'month' (1000 tokens per UTC month) of key family {family} is spent" in message
    assert f"resets at {reset:%Y-%m-%dT%H:%M:%SZ}" in message
    assert error_of(response)["code"] == "budget_exceeded"
    assert abs(int(response.headers["Retry-After"]) - (reset.timestamp() - time.time())) < 5
    assert authz.metric(metricnames.AUTHZ_DECISIONS, f'key_id="{key.record.id}",outcome="budget_exhausted"') >= 1


def test_a_spent_daily_cost_budget_gets_429_and_other_families_are_untouched(own_authz) -> None:  # noqa: ANN001
    authz = own_authz()
    key = authz.key("daily", scope=Scope(budget_usd=0.5, budget_period="day"))
    other = authz.key("other", scope=Scope(budget_usd=0.5, budget_period="day"))
    spend(authz, key.record.id, tokens=10, usd=0.3)
    spend(authz, key.record.id, tokens=10, usd=0.2)
    response = refused(authz, key.token)
    assert "cost budget 'day' (0.5 USD per UTC day)" in error_of(response)["message"]
    assert int(response.headers["Retry-After"]) <= 86400
    assert authz.ask(other.token).status_code == 200


def test_rotation_keeps_spend_the_new_key_is_refused_too(own_authz) -> None:  # noqa: ANN001
    # given a family whose budget is spent by its first key
    authz = own_authz()
    old = authz.key("rotating", scope=Scope(budget_tokens=100))
    spend(authz, old.record.id, tokens=100, key_id=old.record.id)
    refused(authz, old.token)
    # when the key is rotated
    new = rotate_key(authz.key_store, "rotating", overlap=timedelta(hours=1), expires=timedelta(days=1)).issued
    # then the new key draws on the same spent budget
    response = authz.ask(new.token)
    assert response.status_code == 429 and f"key family {old.record.id}" in error_of(response)["message"]


def test_spend_survives_an_authz_restart_counted_once(tmp_path: Path, own_authz) -> None:  # noqa: ANN001
    # given a budget of 100 with 60 spent, accounted and saved
    first = own_authz()
    key = first.key("durable", scope=Scope(budget_tokens=100))
    spend(first, key.record.id, tokens=60)
    wait_for(lambda: first.metric(metricnames.KEY_BUDGET_USED_RATIO, f'budget="tokens",family="{key.record.id}",period="month"') == 0.6,
             ACCOUNTED_WITHIN, "60 of 100 tokens accounted")  # fmt: skip
    first.process.terminate()
    first.process.wait(timeout=10)
    # when 30 more are spent while it is down and it starts again on the same files
    spend(first, key.record.id, tokens=30)
    from tests.runtime.test_authz import start_authz, stop  # noqa: PLC0415

    again = start_authz(first.key_store.parent)
    try:
        # then 90 count (not 60, not 150), and the key is still allowed
        series = f'budget="tokens",family="{key.record.id}",period="month"'
        wait_for(lambda: again.metric(metricnames.KEY_BUDGET_USED_RATIO, series) == 0.9, ACCOUNTED_WITHIN, "90 of 100 tokens")
        assert again.ask(key.token).status_code == 200
    finally:
        stop(again)


def test_a_family_over_its_tpm_gets_429_naming_tpm_until_the_next_minute(own_authz) -> None:  # noqa: ANN001
    authz = own_authz()
    key = authz.key("tpm", scope=Scope(tpm=500))
    while time.time() % 60 > 50:  # the records and the checks (up to ~5 s) must fall in one UTC minute
        time.sleep(0.5)
    spend(authz, key.record.id, tokens=499)
    time.sleep(1)
    assert authz.ask(key.token).status_code == 200
    spend(authz, key.record.id, tokens=1)
    response = refused(authz, key.token)
    assert "500 tokens per minute (tpm)" in error_of(response)["message"]
    assert 1 <= int(response.headers["Retry-After"]) <= 60


def test_the_budget_ratio_metric_names_family_budget_and_period(own_authz) -> None:  # noqa: ANN001
    authz = own_authz()
    key = authz.key("ratio", scope=Scope(budget_tokens=200, budget_usd=4.0, budget_period="day"))
    spend(authz, key.record.id, tokens=50, usd=3.0)
    family = key.record.id
    wait_for(lambda: authz.metric(metricnames.KEY_BUDGET_USED_RATIO, f'budget="usd",family="{family}",period="day"') == 0.75,
             ACCOUNTED_WITHIN, "the usd ratio")  # fmt: skip
    assert authz.metric(metricnames.KEY_BUDGET_USED_RATIO, f'budget="tokens",family="{family}",period="day"') == 0.25
    assert authz.metric(metricnames.SPEND_RECORDS) == 1
    assert read_store(authz.key_store).keys[0].scope is not None

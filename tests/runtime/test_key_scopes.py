"""Key scopes in the store and on the `keys` command: models, policies, tpm, budgets, families kept by rotation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from pydantic import ValidationError

from gpugate_runtime.contract.routing import KeyScope, RoutePolicy
from gpugate_runtime.keys import Scope, create_key, read_store, rotate_key
from gpugate_runtime.livekeys import exhausted_budget, live_keys
from gpugate_runtime.spend import Spend

REPO = Path(__file__).resolve().parents[2]
DAY = timedelta(days=1)


def run_keys(*args: str) -> subprocess.CompletedProcess:
    environment = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "runtime"), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "COLUMNS": "200",
    }
    return subprocess.run(
        [sys.executable, "-m", "gpugate_runtime", "keys", *args], capture_output=True, text=True, env=environment, timeout=60
    )


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return tmp_path / "state" / "keys.json"


# --- the store ------------------------------------------------------------------------------------


def test_a_store_written_before_scopes_reads_as_unrestricted_keys_of_their_own_family(store: Path) -> None:
    # given a store as the runtime wrote it before scopes existed
    store.parent.mkdir(parents=True)
    old = {
        "version": 1,
        "keys": [
            {
                "id": "0123456789ab", "name": "legacy", "sha256": "a" * 64, "created_at": "2026-01-01T00:00:00Z",
                "expires_at": "2099-01-01T00:00:00Z", "revoked_at": None, "rpm": None, "max_concurrent": 5,
            }
        ],
    }  # fmt: skip
    store.write_text(json.dumps(old))
    # when it is read and served
    record = read_store(store).keys[0]
    live = live_keys(read_store(store), 60, 4)["0123456789ab"]
    # then the key is its own family, unrestricted, with the stack's default policy in its scope header
    assert record.lineage == "0123456789ab" and record.scope is None
    assert KeyScope.from_header(live.scope_header.decode()) == KeyScope(family="0123456789ab")
    assert (live.tpm, live.budget_tokens, live.budget_usd, live.max_concurrent) == (None, None, None, 5)


def test_an_unscoped_key_is_stored_without_scope_fields_as_before(store: Path) -> None:
    create_key(store, "plain", expires=DAY)
    (entry,) = json.loads(store.read_text())["keys"]
    assert set(entry) == {"id", "name", "sha256", "created_at", "expires_at", "revoked_at", "rpm", "max_concurrent"}


def test_scope_is_stored_and_handed_to_the_router_as_the_contract_header(store: Path) -> None:
    scope = Scope(models=("smol",), policies=(RoutePolicy.LOCAL_ONLY,), latency_objective_ms=900, tpm=1000, budget_tokens=5000)
    issued = create_key(store, "pinned", expires=DAY, scope=scope)
    live = live_keys(read_store(store), 60, 4, RoutePolicy.LOCAL_FIRST)[issued.record.id]
    header = KeyScope.from_header(live.scope_header.decode())
    # the stack default (local-first) is not allowed, so the key's only policy is its default
    assert header == KeyScope(
        family=issued.record.id,
        default_policy=RoutePolicy.LOCAL_ONLY,
        policies=(RoutePolicy.LOCAL_ONLY,),
        models=("smol",),
        latency_objective_ms=900,
    )
    assert header.allows_model("smol") and not header.allows_model("big")
    assert (live.tpm, live.budget_tokens, live.budget_period) == (1000, 5000, "month")


def test_a_key_without_its_own_default_takes_the_stacks_default_policy(store: Path) -> None:
    issued = create_key(store, "default", expires=DAY)
    live = live_keys(read_store(store), 60, 4, RoutePolicy.COST_OPTIMIZED)[issued.record.id]
    assert KeyScope.from_header(live.scope_header.decode()).default_policy is RoutePolicy.COST_OPTIMIZED


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"policies": ("local-only",), "default_policy": "cloud-first"}, "not among the allowed policies"),
        ({"models": ("a b",)}, "is not a model id"),
        ({"models": ("a", "a")}, "listed twice"),
        ({"budget_period": "week"}, "budget_period"),
        ({"budget_usd": 0}, "budget_usd"),
        ({"tpm": 0}, "tpm"),
    ],
)
def test_an_inconsistent_scope_is_refused_saying_why(fields: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Scope(**fields)


def test_rotation_keeps_family_limits_and_scope_so_spend_carries_over(store: Path) -> None:
    # given a scoped key with its own limits
    scope = Scope(budget_usd=2.5, budget_period="day", tpm=100)
    first = create_key(store, "team", expires=DAY, rpm=30, scope=scope)
    # when it is rotated twice
    second = rotate_key(store, "team", overlap=timedelta(hours=1), expires=DAY).issued
    third = rotate_key(store, "team", overlap=timedelta(hours=1), expires=DAY).issued
    # then every key draws on the first key's family with the same scope and limits
    assert [k.lineage for k in (first.record, second.record, third.record)] == [first.record.id] * 3
    assert second.record.scope == third.record.scope == scope and third.record.rpm == 30
    stored = {k.id: k for k in read_store(store).keys}
    assert stored[third.record.id].family == first.record.id


def test_rotation_can_change_the_scope_and_still_keeps_the_family(store: Path) -> None:
    first = create_key(store, "raise", expires=DAY, scope=Scope(budget_tokens=100))
    second = rotate_key(
        store, "raise", overlap=timedelta(0), expires=DAY, rescope=lambda old: old.model_copy(update={"budget_tokens": 500})
    ).issued
    assert second.record.scope == Scope(budget_tokens=500) and second.record.lineage == first.record.id


def test_a_budget_is_exhausted_at_its_limit_not_before() -> None:
    live = live_keys_for(Scope(budget_tokens=100, budget_usd=1.0))
    assert exhausted_budget(live, Spend(99, 0.99)) is None
    assert exhausted_budget(live, Spend(100, 0.5)) == "tokens"
    assert exhausted_budget(live, Spend(10, 1.0)) == "usd"


def live_keys_for(scope: Scope):  # noqa: ANN201
    from gpugate_runtime.keys import KeyRecord, KeyStore, utcnow  # noqa: PLC0415

    now = utcnow()
    record = KeyRecord(id="a" * 12, name="x", sha256="b" * 64, created_at=now, expires_at=now + DAY, scope=scope)
    return live_keys(KeyStore(keys=(record,)), 60, 4)["a" * 12]


# --- the command ----------------------------------------------------------------------------------


def test_create_with_scope_flags_then_list_shows_scope_family_and_spend(store: Path) -> None:
    created = run_keys(
        "create", "scoped", "--store", str(store), "--models", "smol,big", "--policies", "local-only,local-first",
        "--default-policy", "local-only", "--tpm", "1000", "--budget-usd", "2.5", "--budget-period", "day", "--json",
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    issued = json.loads(created.stdout)
    assert issued["scope"]["models"] == ["smol", "big"] and issued["scope"]["budget_usd"] == 2.5
    listed = run_keys("list", "--store", str(store), "--json")
    (entry,) = json.loads(listed.stdout)
    assert entry["family"] == issued["id"] and entry["scope"]["default_policy"] == "local-only"
    assert entry["spend"]["period"] == "day" and entry["spend"]["tokens"] == 0 and entry["spend"]["resets_at"].endswith("T00:00:00Z")
    table = run_keys("list", "--store", str(store)).stdout
    assert "tpm 1000" in table and "2.5 USD/day" in table


def test_rotate_with_a_new_budget_keeps_the_rest_of_the_scope(store: Path) -> None:
    assert run_keys("create", "grow", "--store", str(store), "--tpm", "50", "--budget-tokens", "100").returncode == 0
    rotated = run_keys("rotate", "grow", "--store", str(store), "--budget-tokens", "900", "--json")
    assert rotated.returncode == 0, rotated.stderr
    scope = json.loads(rotated.stdout)["scope"]
    assert (scope["tpm"], scope["budget_tokens"], scope["budget_period"]) == (50, 900, "month")


@pytest.mark.parametrize(
    ("args", "flag", "allowed"),
    [
        (["--policies", "local-first,fastest"], "--policies", "local-first, cloud-first, cost-optimized, local-only"),
        (["--default-policy", "nearest"], "--default-policy", "local-only"),
        (["--budget-period", "week"], "--budget-period", "day, month"),
        (["--tpm", "0"], "--tpm", "1"),
        (["--budget-usd", "-1"], "--budget-usd", "0.000001"),
        (["--models", "a b"], "--models", "A-Z a-z 0-9"),
        (["--policies", "local-only", "--default-policy", "cloud-first"], "--default-policy", "local-only"),
    ],
)
def test_a_bad_scope_value_exits_2_naming_the_flag_and_what_is_allowed(store: Path, args: list[str], flag: str, allowed: str) -> None:
    result = run_keys("create", "bad", "--store", str(store), *args)
    assert result.returncode == 2
    text = " ".join(result.stderr.replace("│", " ").split())
    assert flag in text and allowed in text, text
    assert not store.exists() or not read_store(store).keys

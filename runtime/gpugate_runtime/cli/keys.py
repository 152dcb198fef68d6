"""`gpugate-runtime keys`: create, list, rotate and revoke client keys in a key store.

The options and the `run_*` bodies are shared with `gpugate keys --stack S` (the operator's command for a local stack),
so both say and do the same; only where the settings come from differs.
"""

from __future__ import annotations

import json
import re
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from gpugate_runtime.cli.options import JsonOption, settings_or_exit
from gpugate_runtime.contract.exits import ExitCode
from gpugate_runtime.contract.host import VM_LAYOUT
from gpugate_runtime.contract.routing import RoutePolicy
from gpugate_runtime.keys import (
    BUDGET_PERIODS,
    MAX_LATENCY_MS,
    MAX_LIMIT,
    MAX_TOKENS,
    MAX_USD,
    NAME_PATTERN,
    NAME_RULE,
    IssuedKey,
    KeyInputError,
    KeyRecord,
    KeyStoreError,
    Scope,
    create_key,
    parse_duration,
    read_store,
    revocation_target,
    revoke_key,
    rotate_key,
    utcnow,
)
from gpugate_runtime.settings import KeysSettings
from gpugate_runtime.spend import FileSpendStore, period_end

app = typer.Typer(help="Client API keys: create, list, rotate, revoke.", no_args_is_help=True, add_completion=False)

StoreOption = Annotated[
    Path | None,
    typer.Option("--store", help="key store file (default: GPUGATE_KEYS_STORE, from the env file, else /var/lib/gpugate/keys.json)"),
]


def _name(value: str) -> str:
    if not re.fullmatch(NAME_PATTERN, value):
        raise typer.BadParameter(f"{value!r} is not a key name; allowed: {NAME_RULE}")
    return value


def _duration_option(allow_zero: bool):
    def check(value: str | None) -> str | None:
        if value is not None:
            try:
                parse_duration(value, allow_zero=allow_zero)
            except ValueError as exc:
                raise typer.BadParameter(str(exc)) from None
        return value

    return check


NameArgument = Annotated[str, typer.Argument(callback=_name, help="who the key is for, e.g. team-search")]
RotateNameArgument = Annotated[str, typer.Argument(callback=_name, help="the key name to rotate")]
RpmOption = Annotated[int | None, typer.Option("--rpm", min=1, max=MAX_LIMIT, help="requests per minute (default: the stack's)")]
MaxConcurrentOption = Annotated[
    int | None, typer.Option("--max-concurrent", min=1, max=MAX_LIMIT, help="requests in flight (default: the stack's)")
]
ExpiresOption = Annotated[
    str | None, typer.Option("--expires", callback=_duration_option(False), help="validity, e.g. 90d (default: the stack's)")
]
OverlapOption = Annotated[
    str | None,
    typer.Option("--overlap", callback=_duration_option(True), help="how long the old key stays valid, e.g. 24h (default: the stack's)"),
]
NewExpiresOption = Annotated[
    str | None, typer.Option("--expires", callback=_duration_option(False), help="validity of the new key (default: the stack's)")
]
POLICY_NAMES = ", ".join(p.value for p in RoutePolicy)


def _policies(value: str | None) -> str | None:
    if value is not None:
        for item in value.split(","):
            if item.strip() not in {p.value for p in RoutePolicy}:
                raise typer.BadParameter(f"{item.strip()!r} is not a route policy; allowed: {POLICY_NAMES} (comma-separated)")
    return value


def _default_policy(value: str | None) -> str | None:
    if value is not None and value not in {p.value for p in RoutePolicy}:
        raise typer.BadParameter(f"{value!r} is not a route policy; allowed: {POLICY_NAMES}")
    return value


def _models(value: str | None) -> str | None:
    if value is not None:
        try:
            Scope(models=tuple(m.strip() for m in value.split(",")))
        except ValidationError as exc:
            problem = exc.errors()[0]["msg"].removeprefix("Value error, ")
            raise typer.BadParameter(f"{value!r}: {problem} (comma-separated)") from None
    return value


def _period(value: str | None) -> str | None:
    if value is not None and value not in BUDGET_PERIODS:
        raise typer.BadParameter(f"{value!r} is not a budget period; allowed: {', '.join(BUDGET_PERIODS)} (UTC calendar periods)")
    return value


ModelsOption = Annotated[
    str | None,
    typer.Option("--models", callback=_models, help="public model ids or tiers the key may use, comma-separated (default: all)"),
]
PoliciesOption = Annotated[
    str | None,
    typer.Option(
        "--policies", callback=_policies, help=f"route policies the key may ask for, comma-separated: {POLICY_NAMES} (default: all)"
    ),
]
DefaultPolicyOption = Annotated[
    str | None,
    typer.Option("--default-policy", callback=_default_policy, help="route policy without a request header (default: the stack's)"),
]
LatencyObjectiveOption = Annotated[
    int | None,
    typer.Option("--latency-objective-ms", min=1, max=MAX_LATENCY_MS, help="cost-optimized: the slowest route (ms) the key accepts"),
]
TpmOption = Annotated[
    int | None,
    typer.Option("--tpm", min=1, max=MAX_TOKENS, help="tokens per UTC minute for the key's family (default: no limit)"),
]
BudgetTokensOption = Annotated[
    int | None, typer.Option("--budget-tokens", min=1, max=MAX_TOKENS, help="tokens per budget period for the key's family")
]
BudgetUsdOption = Annotated[
    float | None,
    typer.Option("--budget-usd", min=0.000001, max=MAX_USD, help="cost in USD per budget period for the key's family"),
]
BudgetPeriodOption = Annotated[
    str | None,
    typer.Option("--budget-period", callback=_period, help="the budgets' period: day or month, UTC calendar (default: month)"),
]

def scope_of(
    base: Scope | None,
    models: str | None = None,
    policies: str | None = None,
    default_policy: str | None = None,
    latency_objective_ms: int | None = None,
    tpm: int | None = None,
    budget_tokens: int | None = None,
    budget_usd: float | None = None,
    budget_period: str | None = None,
) -> Scope | None:
    """`base` (a rotated key's scope, or none) with what the options set; None when nothing is set at all."""
    given: dict[str, Any] = {
        "models": None if models is None else tuple(m.strip() for m in models.split(",")),
        "policies": None if policies is None else tuple(p.strip() for p in policies.split(",")),
        "default_policy": default_policy,
        "latency_objective_ms": latency_objective_ms,
        "tpm": tpm,
        "budget_tokens": budget_tokens,
        "budget_usd": budget_usd,
        "budget_period": budget_period,
    }
    given = {name: value for name, value in given.items() if value is not None}
    if not given:
        return base
    try:
        return Scope.model_validate({**(base.model_dump() if base else {}), **given})
    except ValidationError as exc:
        problems = "; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())
        raise KeyInputError(f"--default-policy / --policies: {problems}") from None


RevokeIdArgument = Annotated[
    str | None,
    typer.Argument(
        metavar="ID",
        help="the key id (12 hex digits, see `keys list`). Without ID, or with -, the key itself is read from stdin or a "
        "hidden prompt; a key on the command line is refused",
        show_default=False,
    ),
]


def _settings() -> KeysSettings:
    return settings_or_exit(KeysSettings, "key")


def _fail(exc: Exception) -> typer.Exit:
    typer.echo(f"error: {exc}", err=True)
    return typer.Exit(ExitCode.BAD_INPUT if isinstance(exc, KeyInputError) else ExitCode.CHECK_FAILED)


def _when(moment: datetime | None) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ") if moment else "-"


# ---- the commands' bodies, shared with `gpugate keys` -------------------------------------------


def run_create(
    settings: KeysSettings,
    name: str,
    rpm: int | None,
    max_concurrent: int | None,
    expires: str | None,
    json_out: bool,
    scope: dict[str, Any] | None = None,
) -> None:
    validity = parse_duration(expires) if expires else timedelta(days=settings.expires_days)
    try:
        issued = create_key(
            settings.store, name, expires=validity, rpm=rpm, max_concurrent=max_concurrent, scope=scope_of(None, **(scope or {}))
        )
    except (KeyInputError, KeyStoreError) as exc:
        raise _fail(exc) from None
    _show_issued(issued, json_out, f"Created key {issued.record.id} for {name}")


def _show_issued(issued: IssuedKey, json_out: bool, headline: str, extra: dict[str, object] | None = None) -> None:
    record = issued.record
    if json_out:
        typer.echo(json.dumps({**record.public(utcnow()), "key": issued.token, **(extra or {})}, sort_keys=True))
        return
    typer.echo(f"{headline}, expires {_when(record.expires_at)}.")
    typer.echo("The key is shown only now; store it in a secret manager:")
    typer.echo(issued.token)


def _spend(record: KeyRecord, store: FileSpendStore, now: float) -> dict[str, Any]:
    """The family's spend in the budget period now (the single-host spend store next to the key store)."""
    scope = record.effective_scope
    spent = store.ledger.spent(record.lineage, scope.budget_period, now)
    return {
        "period": scope.budget_period,
        "tokens": spent.tokens,
        "usd": round(spent.usd, 6),
        "resets_at": _when(period_end(scope.budget_period, now)),
    }


def _spend_cell(record: KeyRecord, spend: dict[str, Any]) -> str:
    scope = record.effective_scope
    parts = [f"{spend['tokens']}" + (f"/{scope.budget_tokens}" if scope.budget_tokens else "") + " tok"]
    parts.append(f"{spend['usd']:.4g}" + (f"/{scope.budget_usd:g}" if scope.budget_usd else "") + " USD")
    return " ".join(parts) + f" ({spend['period']})"


def run_list(path: Path, json_out: bool) -> None:
    try:
        keys = read_store(path).keys
    except KeyStoreError as exc:
        raise _fail(exc) from None
    now = utcnow()
    spend_store = FileSpendStore(path.parent / VM_LAYOUT.spend_store.name)
    spends = {k.id: _spend(k, spend_store, time.time()) for k in keys}
    if json_out:
        typer.echo(json.dumps([{**k.public(now), "spend": spends[k.id]} for k in keys], sort_keys=True))
        return
    table = Table(title=f"keys in {path}")
    for column in ("id", "name", "status", "created", "expires", "revoked", "rpm", "max concurrent", "family", "scope", "spend"):
        table.add_column(column)
    for k in sorted(keys, key=lambda k: (k.name, k.created_at)):
        table.add_row(
            k.id, k.name, k.status(now), _when(k.created_at), _when(k.expires_at), _when(k.revoked_at),
            str(k.rpm or "default"), str(k.max_concurrent or "default"),
            k.lineage, k.effective_scope.summary(), _spend_cell(k, spends[k.id]),
        )  # fmt: skip
    console = Console()
    # A pipe gets rich's 80 columns, which would cut ids; a terminal keeps its own width.
    (console if console.is_terminal else Console(width=240)).print(table)


def run_rotate(
    settings: KeysSettings,
    name: str,
    overlap: str | None,
    expires: str | None,
    json_out: bool,
    scope: dict[str, Any] | None = None,
) -> None:
    window = parse_duration(overlap, allow_zero=True) if overlap else timedelta(hours=settings.rotation_overlap_hours)
    validity = parse_duration(expires) if expires else timedelta(days=settings.expires_days)
    try:
        rotation = rotate_key(
            settings.store, name, overlap=window, expires=validity, rescope=lambda old: scope_of(old, **(scope or {}))
        )
    except (KeyInputError, KeyStoreError) as exc:
        raise _fail(exc) from None
    retiring = {k.id: _when(k.expires_at) for k in rotation.retiring}
    _show_issued(rotation.issued, json_out, f"Rotated {name}: new key {rotation.issued.record.id}", {"retiring": retiring})
    if not json_out:
        for key_id, until in retiring.items():
            typer.echo(f"Old key {key_id} stays valid until {until}.")


def run_revoke(path: Path, key_id: str | None, json_out: bool) -> None:
    try:
        target, token = revocation_target(key_id)
        record = revoke_key(path, target, token=token)
    except (KeyInputError, KeyStoreError) as exc:
        raise _fail(exc) from None
    if json_out:
        typer.echo(json.dumps(record.public(utcnow()), sort_keys=True))
    else:
        typer.echo(f"Key {record.id} ({record.name}) revoked at {_when(record.revoked_at)}.")


def scope_options(
    models: str | None,
    policies: str | None,
    default_policy: str | None,
    latency_objective_ms: int | None,
    tpm: int | None,
    budget_tokens: int | None,
    budget_usd: float | None,
    budget_period: str | None,
) -> dict[str, Any]:
    """The scope options as `run_create` / `run_rotate` take them."""
    return {
        "models": models, "policies": policies, "default_policy": default_policy, "latency_objective_ms": latency_objective_ms,
        "tpm": tpm, "budget_tokens": budget_tokens, "budget_usd": budget_usd, "budget_period": budget_period,
    }  # fmt: skip


# ---- gpugate-runtime keys ------------------------------------------------------------------------


def _settings_for(store: Path | None) -> KeysSettings:
    """The keys settings from the environment, with --store in place of the configured store when given."""
    settings = _settings()
    return settings.model_copy(update={"store": store}) if store else settings


@app.command()
def create(
    name: NameArgument,
    rpm: RpmOption = None,
    max_concurrent: MaxConcurrentOption = None,
    expires: ExpiresOption = None,
    models: ModelsOption = None,
    policies: PoliciesOption = None,
    default_policy: DefaultPolicyOption = None,
    latency_objective_ms: LatencyObjectiveOption = None,
    tpm: TpmOption = None,
    budget_tokens: BudgetTokensOption = None,
    budget_usd: BudgetUsdOption = None,
    budget_period: BudgetPeriodOption = None,
    json_out: JsonOption = False,
    store: StoreOption = None,
) -> None:
    """Issue a key and print it once: only its hash is stored. Scope options limit models, route policies,
    tokens per minute and a token or USD budget per UTC day or month (docs/keys.md)."""
    settings = _settings_for(store)
    scope = scope_options(models, policies, default_policy, latency_objective_ms, tpm, budget_tokens, budget_usd, budget_period)
    run_create(settings, name, rpm, max_concurrent, expires, json_out, scope)


@app.command("list")
def list_(json_out: JsonOption = False, store: StoreOption = None) -> None:
    """Show keys (never a key or its hash)."""
    run_list(store or _settings().store, json_out)


@app.command()
def rotate(
    name: RotateNameArgument,
    overlap: OverlapOption = None,
    expires: NewExpiresOption = None,
    models: ModelsOption = None,
    policies: PoliciesOption = None,
    default_policy: DefaultPolicyOption = None,
    latency_objective_ms: LatencyObjectiveOption = None,
    tpm: TpmOption = None,
    budget_tokens: BudgetTokensOption = None,
    budget_usd: BudgetUsdOption = None,
    budget_period: BudgetPeriodOption = None,
    json_out: JsonOption = False,
    store: StoreOption = None,
) -> None:
    """Issue a new key for NAME; its old keys expire at the end of the overlap. The new key keeps the old one's
    family (its spend and budgets carry over) and scope; scope options change only what they name."""
    settings = _settings_for(store)
    scope = scope_options(models, policies, default_policy, latency_objective_ms, tpm, budget_tokens, budget_usd, budget_period)
    run_rotate(settings, name, overlap, expires, json_out, scope)


@app.command()
def revoke(key_id: RevokeIdArgument = None, json_out: JsonOption = False, store: StoreOption = None) -> None:
    """Revoke a key now, by its id or by the key itself on stdin; authz rejects it within a second."""
    run_revoke(store or _settings().store, key_id, json_out)

"""`gpugate keys create / list / rotate / revoke --stack S`: a local stack's client keys.

The same commands, options, rules and output as `gpugate-runtime keys` on a host (they share its code); only the
store and the defaults come from the stack: its state dir's key store, its gpugate:limits expiry and overlap.
"""

from __future__ import annotations

import typer
from gpugate_runtime.cli import keys as runtime_keys
from gpugate_runtime.cli.options import JsonOption
from gpugate_runtime.settings import KeysSettings

from gpugate.cli.local import LocalStackOpt
from gpugate.cli.options import bad_input, load_or_exit
from gpugate.local.gateway import LocalGateway
from gpugate.spec import Target

VM_VERBS = (
    "on a VM stack the same verbs run on its host through the runbook tasks: `gpugate run rotate-key --stack {stack} NAME`, "
    "`gpugate run revoke-key --stack {stack} ID` (or `-` and the key itself on stdin), `gpugate run status --stack {stack}` (key counts)"
)

app = typer.Typer(
    help=(
        "A local stack's client keys: create, list, rotate, revoke (keys are shown once and stored hashed); "
        + VM_VERBS.format(stack="S")
        + " (docs/runbook-tasks.md)."
    ),
    no_args_is_help=True,
    add_completion=False,
)


def _settings(stack: str) -> KeysSettings:
    loaded = load_or_exit(stack)
    target = loaded.spec.target
    if target is not Target.LOCAL:
        todo = VM_VERBS.format(stack=stack) if target is not Target.KUBERNETES else "the runbook tasks serve VM stacks (aws, gcp); not Kubernetes"
        bad_input(f"stack {loaded.name!r} targets {target}: `gpugate keys` manages a local stack's key store", todo)
    return LocalGateway(loaded).keys_settings()


@app.command()
def create(
    name: runtime_keys.NameArgument,
    rpm: runtime_keys.RpmOption = None,
    max_concurrent: runtime_keys.MaxConcurrentOption = None,
    expires: runtime_keys.ExpiresOption = None,
    models: runtime_keys.ModelsOption = None,
    policies: runtime_keys.PoliciesOption = None,
    default_policy: runtime_keys.DefaultPolicyOption = None,
    latency_objective_ms: runtime_keys.LatencyObjectiveOption = None,
    tpm: runtime_keys.TpmOption = None,
    budget_tokens: runtime_keys.BudgetTokensOption = None,
    budget_usd: runtime_keys.BudgetUsdOption = None,
    budget_period: runtime_keys.BudgetPeriodOption = None,
    json_out: JsonOption = False,
    stack: LocalStackOpt = "local",
) -> None:
    """Issue a key for NAME and print it once: only its hash is stored. Authz accepts it within a second.

    Scope options limit its models, route policies, tokens per minute and a token or USD budget per UTC day or month.
    """
    scope = runtime_keys.scope_options(
        models, policies, default_policy, latency_objective_ms, tpm, budget_tokens, budget_usd, budget_period
    )
    runtime_keys.run_create(_settings(stack), name, rpm, max_concurrent, expires, json_out, scope)


@app.command("list")
def list_(json_out: JsonOption = False, stack: LocalStackOpt = "local") -> None:
    """Show the stack's keys: id, name, status, dates, limits, family, scope and spend (never a key or its hash)."""
    runtime_keys.run_list(_settings(stack).store, json_out)


@app.command()
def rotate(
    name: runtime_keys.RotateNameArgument,
    overlap: runtime_keys.OverlapOption = None,
    expires: runtime_keys.NewExpiresOption = None,
    models: runtime_keys.ModelsOption = None,
    policies: runtime_keys.PoliciesOption = None,
    default_policy: runtime_keys.DefaultPolicyOption = None,
    latency_objective_ms: runtime_keys.LatencyObjectiveOption = None,
    tpm: runtime_keys.TpmOption = None,
    budget_tokens: runtime_keys.BudgetTokensOption = None,
    budget_usd: runtime_keys.BudgetUsdOption = None,
    budget_period: runtime_keys.BudgetPeriodOption = None,
    json_out: JsonOption = False,
    stack: LocalStackOpt = "local",
) -> None:
    """Issue a new key for NAME and print it once; NAME's old keys expire at the end of the overlap.

    The new key keeps the old one's family (so its spend and budgets carry over) and scope; scope options change what they name.
    """
    scope = runtime_keys.scope_options(
        models, policies, default_policy, latency_objective_ms, tpm, budget_tokens, budget_usd, budget_period
    )
    runtime_keys.run_rotate(_settings(stack), name, overlap, expires, json_out, scope)


@app.command()
def revoke(key_id: runtime_keys.RevokeIdArgument = None, json_out: JsonOption = False, stack: LocalStackOpt = "local") -> None:
    """Revoke a key now, by its id or by the key itself on stdin (no ID, or -) or a hidden prompt; authz rejects it within a second.

    A key on the command line is refused: it would stay in shell history and process lists.
    """
    runtime_keys.run_revoke(_settings(stack).store, key_id, json_out)

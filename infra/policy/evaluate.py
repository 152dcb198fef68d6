"""The policy pack evaluated on a recorded plan, as `pulumi up --policy-pack` would, plus the plan-only
check that no secret the plan fed in appears in plain text."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any

from pulumi_policy import ResourceValidationArgs

from gpugate.plan.inventory import SECRET_SIG, SECRET_SIG_KEY
from gpugate.plan.report import Verdict, Violation
from infra.offline import Recorded, Run
from infra.policy.rules import RULES


def evaluate_policies(resources: list[Recorded]) -> list[Verdict]:
    """Every rule of the policy pack on every recorded resource, as `pulumi up --policy-pack` would."""
    checked = [r for r in resources if r.custom and not r.type.startswith("pulumi:providers:")]
    return [_verdict(rule, checked) for rule in RULES]


def _verdict(rule: Any, resources: list[Recorded]) -> Verdict:
    found: list[Violation] = []
    for res in resources:

        def report(message: str, urn: str | None = None, res: Recorded = res) -> None:
            found.append(Violation(policy=rule.name, resource=res.name, resource_type=res.type, message=message))

        rule.validate(ResourceValidationArgs(res.type, res.policy_props(), res.urn, res.name, None, None), report)
    return Verdict(policy=rule.name, description=rule.description, checked=len(resources), violations=found)


def plain_secrets(run: Run) -> Verdict:
    """Where a secret the plan fed in shows up outside a Pulumi secret: resource inputs and stack outputs."""
    found = []
    for res in run.resources:
        for path in _plain_canary_paths(res.wire, run.canaries, res.type.split(":")[-1]):
            found.append(
                Violation(
                    policy="secrets-stay-secret",
                    resource=res.name,
                    resource_type=res.type,
                    message=f"{path} carries a secret in plain text; wrap it in pulumi.Output.secret",
                )
            )
    for name, (value, secret) in run.outputs.items():
        if not secret and any(c in json.dumps(value, default=str) for c in run.canaries):
            found.append(
                Violation(
                    policy="secrets-stay-secret",
                    resource=f"output {name}",
                    resource_type="pulumi:pulumi:Stack",
                    message=f"stack output {name} carries a secret but is not a secret output",
                )
            )
    return Verdict(
        policy="secrets-stay-secret",
        description="No secret appears in a plain resource input or stack output (plan only: traced with canary values).",
        checked=len(run.resources) + len(run.outputs),
        violations=found,
    )


def _plain_canary_paths(value: Any, canaries: tuple[str, ...], path: str) -> Iterator[str]:
    if isinstance(value, Mapping):
        if value.get(SECRET_SIG_KEY) == SECRET_SIG:
            return  # a secret: encrypted in state, masked in output
        for key, item in value.items():
            yield from _plain_canary_paths(item, canaries, f"{path}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _plain_canary_paths(item, canaries, f"{path}[{i}]")
    elif isinstance(value, str) and any(c in value for c in canaries):
        yield path

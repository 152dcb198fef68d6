"""`gpugate plan`: run the stack's Pulumi program offline (under mocks), evaluate the policy pack, and report
the resources, verdicts, capacity and cost. The only place gpugate imports the Pulumi program."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from gpugate.catalog import MODELS
from gpugate.cli.options import ExitCode, JsonOpt, StackOpt, bad_input, console, load_or_exit
from gpugate.kubernetes import objects, pod_build
from gpugate.kubernetes.access import private_api_note
from gpugate.kubernetes.allocatable import node_fits
from gpugate.kubernetes.vllm import hf_token_problem
from gpugate.plan.capacity import capacity, scaling
from gpugate.plan.cost import cost, kubernetes_cost
from gpugate.plan.inventory import inventory, user_data_size
from gpugate.plan.report import PlanReport
from gpugate.plan.sizing import sizing_markdown
from gpugate.plan.tiers import provider_prices, tier_capacity
from gpugate.spec import Target
from gpugate.stackfile import NAMESPACE, Stack, load_stack


def plan(stack: Stack, build: Any = None) -> PlanReport:
    """Plan a loaded stack. `build(stack)` may replace the program's component (tests use it to inject a change)."""
    # The Pulumi SDKs load only when a plan runs: every other command starts without them.
    from infra.offline import record  # noqa: PLC0415
    from infra.policy.evaluate import evaluate_policies, plain_secrets  # noqa: PLC0415
    from infra.secrets import needs_alert_credential  # noqa: PLC0415

    spec = stack.spec
    warnings: list[str] = []
    fit = capacity(spec)
    if spec.target not in (Target.AWS, Target.GCP, Target.KUBERNETES):
        note = "local target: runs on this machine with `gpugate up`; Pulumi provisions nothing"
        return PlanReport(
            stack=stack.name,
            target=str(spec.target),
            planned=False,
            note=note,
            capacity=fit,
            tiers=tier_capacity(spec),
            providers=provider_prices(spec),
        )

    run = record(stack, build)
    verdicts = evaluate_policies(run.resources) + [plain_secrets(run)]
    if needs_alert_credential(spec) and "alert_credential" not in stack.secrets:
        warnings.append(
            f"{stack.path.name} holds no {NAMESPACE}:alert_credential yet; before `pulumi up` run "
            f"`pulumi config set --secret {NAMESPACE}:alert_credential <value> -s {stack.name}` "
            "(the plan used a stand-in of 128 characters)"
        )
    outputs = {name: ("[secret]" if secret else str(value)) for name, (value, secret) in run.outputs.items()}
    kube = spec.kubernetes
    errors: list[str] = []
    if kube is not None:
        errors += filter(None, [hf_token_problem(spec, stack.name, stack.secrets)])
        warnings += filter(None, [private_api_note(spec, stack.name)])
    elif MODELS[spec.model.id].gated and spec.model.source == "huggingface":
        warnings.append(
            f"model.id: {spec.model.id} is gated on Hugging Face and a VM's vLLM gets no token yet "
            "(gpugate:hf_token reaches the Kubernetes pods only): the download will be refused"
        )
    note = "addresses, ids and the AMI / image are stand-ins; the cloud decides them at `pulumi up`"
    if kube is not None:
        note = (
            "addresses, ids and the cluster's endpoint are stand-ins; every Kubernetes object is in the bundle "
            f"(gpugate render --stack {stack.name}: kubernetes/*.yaml)"
        )
    return PlanReport(
        stack=stack.name,
        target=str(spec.target),
        planned=True,
        note=note,
        resources=inventory(run.resources),
        policies=verdicts,
        capacity=fit,
        tiers=tier_capacity(spec),
        providers=provider_prices(spec),
        scaling=scaling(spec, fit),
        node_fits=node_fits(spec, objects(pod_build(stack))) if kube else [],
        cost=kubernetes_cost(spec, run.resources, kube.replicas.min) if kube else cost(spec, run.resources),
        cost_at_max=kubernetes_cost(spec, run.resources, kube.replicas.max) if kube else None,
        user_data_bytes=user_data_size(run.resources),
        outputs=outputs,
        warnings=warnings,
        errors=errors,
    )


def plan_stack(stack_name: str | Path) -> PlanReport:
    """Plan a stack by name (`staging`) or by the path of its stack file. Raises SpecError on a bad stack."""
    return plan(load_stack(stack_name))


def sizing_page(stack_name: str = "prod") -> str:
    """docs/scaling.md's figures for a Kubernetes stack, from its plan."""
    return sizing_markdown(stack_name, load_stack(stack_name).spec, plan_stack(stack_name))


def plan_command(stack: StackOpt, as_json: JsonOpt = False) -> None:
    """Plan a stack offline: resources, policy verdicts, whether the model and pods fit, monthly cost.

    The resources `pulumi up` would create, the policy pack's verdicts, whether the model fits the GPU,
    whether each Kubernetes pod fits its node pool's machine type, and the monthly cost. Exits 1 on a
    policy violation, a model that does not fit or a pod that cannot be scheduled, 2 on a bad stack file."""
    loaded = load_or_exit(stack)
    try:
        report = plan(loaded)
    except ValueError as problem:  # the program's own backstops (e.g. no machine for the GPU count)
        bad_input(str(problem))
    if as_json:
        console.print_json(report.model_dump_json())
    else:
        console.print(report.to_table())
    raise typer.Exit(ExitCode.OK if report.ok else ExitCode.CHECK_FAILED)

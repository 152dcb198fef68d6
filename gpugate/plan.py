"""The offline plan: run the real Pulumi program under mocks, then report its resources, the policy
verdicts, whether the model fits the GPU, and what a month of it costs. No cloud, no Pulumi CLI.

    report = plan_stack("staging")
    report.ok, report.violations, report.cost.monthly_usd
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from gpugate_runtime.capacity import CapacityReport, CpuBudget, GpuBudget, ModelArch, plan_capacity
from gpugate_runtime.host import VM_LAYOUT, Ports
from pydantic import BaseModel, ConfigDict, computed_field
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from gpugate.catalog import DTYPE_BYTES, MODELS, QUANT_WEIGHT_BYTES
from gpugate.prices import CostEstimate, estimate
from gpugate.spec import GatewaySpec, Target
from gpugate.stackfile import NAMESPACE, REPO_ROOT, SpecError, Stack, load_stack
from gpugate.userdata import USER_DATA_LIMIT_BYTES

if TYPE_CHECKING:  # the Pulumi SDKs load only when a plan runs: `gpugate --help` stays fast
    from infra.offline import Recorded, Run

# How the engine marks a secret on the wire (pulumi's rpc.py, pulumi-policy's deserialize.py).
SECRET_SIG_KEY = "4dabf18193072939515e22adb298388d"
SECRET_SIG = "1b47061264138c4ac30d75fd1eb44270"
EXIT_OK, EXIT_CHECK_FAILED, EXIT_BAD_INPUT = 0, 1, 2


# ---- the report -----------------------------------------------------------------------------


class Violation(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    policy: str
    resource: str
    resource_type: str
    message: str


class Verdict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    policy: str
    description: str
    checked: int
    violations: list[Violation]

    @computed_field  # type: ignore[prop-decorator]
    @property
    def ok(self) -> bool:
        return not self.violations


class ResourceRow(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    type: str
    name: str
    role: str
    properties: dict[str, str]


class PlanReport(BaseModel):
    """What `pulumi up` would create for a stack, and whether it may."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    stack: str
    target: str
    planned: bool
    note: str | None = None
    resources: list[ResourceRow] = []
    policies: list[Verdict] = []
    capacity: CapacityReport | None = None
    cost: CostEstimate | None = None
    user_data_bytes: int | None = None
    user_data_limit_bytes: int = USER_DATA_LIMIT_BYTES
    outputs: dict[str, str] = {}
    warnings: list[str] = []

    @computed_field  # type: ignore[prop-decorator]
    @property
    def violations(self) -> list[Violation]:
        return [v for verdict in self.policies for v in verdict.violations]

    @computed_field  # type: ignore[prop-decorator]
    @property
    def ok(self) -> bool:
        fits = self.capacity is None or self.capacity.fits
        size = self.user_data_bytes is None or self.user_data_bytes <= self.user_data_limit_bytes
        return not self.violations and fits and size

    def to_table(self) -> Group:
        """The report for people: resources, policy verdicts, capacity, cost."""
        parts: list[Any] = [Text.from_markup(f"[bold]stack {self.stack}[/] ({self.target})")]
        if self.note:
            parts.append(Text(self.note))
        if self.resources:
            table = Table(title="resources", title_justify="left")
            for column in ("resource", "name", "key properties"):
                table.add_column(column, overflow="fold")
            for row in self.resources:
                props = ", ".join(f"{k}={v}" for k, v in row.properties.items())
                table.add_row(row.type, row.name, Text(props))
            parts.append(table)
        if self.policies:
            table = Table("policy", "checked", "verdict", title="policy", title_justify="left")
            for verdict in self.policies:
                mark = "[green]pass[/]" if verdict.ok else f"[bold red]FAIL ({len(verdict.violations)})[/]"
                table.add_row(verdict.policy, str(verdict.checked), mark)
            parts.append(table)
            # One line per violation, unwrapped, so that logs and grep find it whole.
            for v in self.violations:
                parts.append(Text(f"FAIL {v.policy}: {v.message}", style="bold red"))
        if self.user_data_bytes is not None:
            mark = "[green]ok[/]" if self.user_data_bytes <= self.user_data_limit_bytes else "[bold red]TOO LARGE[/]"
            parts.append(
                Text.from_markup(
                    f"user-data {self.user_data_bytes:,} of {self.user_data_limit_bytes:,} bytes (raw, secrets included) {mark}"
                )
            )
        if self.capacity is not None:
            parts.append(
                Text("capacity: ") + Text(self.capacity.message, style=None if self.capacity.fits else "bold red")
            )
        if self.cost is not None:
            table = Table(
                "item",
                "unit price",
                "per month",
                "source",
                title=f"cost ({self.cost.currency}, "
                f"{self.cost.hours_per_month} h/month, list prices as of {self.cost.prices_as_of}; re-check)",
                title_justify="left",
            )
            for line in self.cost.lines:
                table.add_row(
                    line.item,
                    f"{line.unit_usd:g}/{line.unit}",
                    f"{line.monthly_usd:,.2f}",
                    Text(f"{line.source} [{line.confidence} confidence]"),
                )
            total = "unknown" if self.cost.monthly_usd is None else f"{self.cost.monthly_usd:,.2f}"
            table.add_row(Text("total", style="bold"), "", Text(total, style="bold"), f"excludes {self.cost.excludes}")
            parts.append(table)
            for item in self.cost.missing:
                parts.append(Text(f"no price in gpugate/prices.toml for {item}", style="yellow"))
            if self.cost.alternative:
                parts.append(Text(f"alternative {self.cost.alternative}"))
        for warning in self.warnings:
            parts.append(Text(f"warning: {warning}", style="yellow"))
        parts.append(Text.from_markup("[bold green]plan ok[/]" if self.ok else "[bold red]plan failed[/]"))
        return Group(*parts)


def _importable_infra() -> None:
    # infra/ is the Pulumi program of this checkout, next to stacks/ (it is not an installed package).
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))


# ---- checks on the recording ----------------------------------------------------------------


def evaluate_policies(resources: list[Recorded]) -> list[Verdict]:
    """Every rule of the policy pack on every recorded resource, as `pulumi up --policy-pack` would."""
    _importable_infra()
    from infra.policy.rules import RULES  # noqa: PLC0415

    checked = [r for r in resources if r.custom and not r.type.startswith("pulumi:providers:")]
    return [_verdict(rule, checked) for rule in RULES]


def _verdict(rule: Any, resources: list[Recorded]) -> Verdict:
    from pulumi_policy import ResourceValidationArgs  # noqa: PLC0415

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


def capacity(spec: GatewaySpec) -> CapacityReport:
    """Does the model fit: vLLM's KV cache for the spec's model, sized from the launch spec the
    bundle gives the host (GPU memory, utilization, tensor parallelism, or the CPU KV budget)."""
    from gpugate.render import launch_spec  # noqa: PLC0415 - templates load only when needed

    launch = launch_spec(spec, Ports(spec.ports.internal_base), VM_LAYOUT)
    facts = MODELS[spec.model.id]
    arch = ModelArch(
        num_layers=facts.num_layers,
        num_kv_heads=facts.num_kv_heads,
        head_dim=facts.head_dim,
        max_position_embeddings=facts.max_position_embeddings,
    )
    dtype_bytes = DTYPE_BYTES.get(launch.dtype, 2)
    per_param = QUANT_WEIGHT_BYTES.get(launch.quantization) or dtype_bytes
    budget: CpuBudget | GpuBudget
    if launch.device == "cpu":
        budget = CpuBudget(kv_cache_gib=launch.cpu_kv_cache_gib)
    else:
        budget = GpuBudget(
            gpu_memory_gib=launch.gpu_memory_gib,
            gpu_count=launch.gpu_count,
            gpu_memory_utilization=launch.gpu_memory_utilization,
        )
    return plan_capacity(
        arch,
        budget,
        max_model_len=launch.max_model_len,
        max_num_seqs=launch.max_num_seqs,
        kv_dtype_bytes=dtype_bytes,
        weight_bytes=int(facts.num_params * per_param),
        tensor_parallel_size=launch.tensor_parallel_size,
    )


# ---- inventory and cost ---------------------------------------------------------------------

AWS_INSTANCE = "aws:ec2/instance:Instance"
GCP_INSTANCE = "gcp:compute/instance:Instance"
ROLES = {
    AWS_INSTANCE: "gpu-vm",
    GCP_INSTANCE: "gpu-vm",
    "aws:ec2/securityGroup:SecurityGroup": "firewall",
    "aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule": "firewall",
    "aws:vpc/securityGroupEgressRule:SecurityGroupEgressRule": "firewall",
    "gcp:compute/firewall:Firewall": "firewall",
    "aws:route53/record:Record": "dns-record",
    "gcp:dns/recordSet:RecordSet": "dns-record",
    "aws:ec2/eip:Eip": "static-ip",
    "gcp:compute/address:Address": "static-ip",
    "aws:iam/role:Role": "identity",
    "aws:iam/rolePolicyAttachment:RolePolicyAttachment": "identity",
    "aws:iam/instanceProfile:InstanceProfile": "identity",
    "gcp:serviceaccount/account:Account": "identity",
    "gcp:projects/iAMMember:IAMMember": "identity",
    "random:index/randomPassword:RandomPassword": "secret",
}
ROLE_ORDER = ("component", "provider", "network", "firewall", "identity", "secret", "gpu-vm", "static-ip", "dns-record")
KEY_PROPERTIES = {
    AWS_INSTANCE: ("instanceType", "ami", "rootBlockDevice", "metadataOptions", "instanceMarketOptions", "userData"),
    GCP_INSTANCE: ("machineType", "zone", "bootDisk", "scheduling", "serviceAccount", "metadata"),
    "aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule": ("ipProtocol", "fromPort", "toPort", "cidrIpv4"),
    "aws:vpc/securityGroupEgressRule:SecurityGroupEgressRule": ("ipProtocol", "cidrIpv4"),
    "gcp:compute/firewall:Firewall": ("direction", "allows", "sourceRanges", "targetTags"),
    "aws:route53/record:Record": ("name", "type", "records"),
    "gcp:dns/recordSet:RecordSet": ("name", "type", "rrdatas"),
    "aws:ec2/eip:Eip": ("domain",),
    "gcp:compute/address:Address": ("addressType", "networkTier"),
    "aws:iam/rolePolicyAttachment:RolePolicyAttachment": ("policyArn",),
    "gcp:projects/iAMMember:IAMMember": ("role",),
    "aws:ec2/subnet:Subnet": ("cidrBlock", "availabilityZone"),
    "aws:ec2/vpc:Vpc": ("cidrBlock",),
    "gcp:compute/subnetwork:Subnetwork": ("ipCidrRange", "region"),
    "gcp:compute/network:Network": ("autoCreateSubnetworks",),
    "gcp:serviceaccount/account:Account": ("accountId",),
    "random:index/randomPassword:RandomPassword": ("length",),
    "pulumi:providers:aws": ("region",),
    "pulumi:providers:gcp": ("project", "region", "zone"),
}


def _show(value: Any, wire: Any) -> str:
    """A property for people: secrets as their size only, whole numbers without `.0`."""
    if isinstance(wire, Mapping) and wire.get(SECRET_SIG_KEY) == SECRET_SIG:
        return f"[secret, {len(str(value).encode()):,} bytes]"
    if isinstance(value, Mapping):
        wire = wire if isinstance(wire, Mapping) else {}
        return "{" + ", ".join(f"{k}: {_show(v, wire.get(k))}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        wires = wire if isinstance(wire, list) else [None] * len(value)
        return "[" + ", ".join(_show(v, w) for v, w in zip(value, wires, strict=True)) + "]"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def inventory(resources: list[Recorded]) -> list[ResourceRow]:
    rows = []
    for res in resources:
        if res.type == "pulumi:pulumi:Stack":
            continue
        props = res.props
        role = ROLES.get(res.type) or (
            "component" if not res.custom else "provider" if res.type.startswith("pulumi:providers:") else "network"
        )
        keys = KEY_PROPERTIES.get(res.type, ())
        shown = {k: _show(props[k], res.wire.get(k)) for k in keys if k in props and props[k] not in (None, "", [], {})}
        rows.append(ResourceRow(type=res.type, name=res.name, role=role, properties=shown))
    # Registration order varies from run to run (it is asynchronous): show a stable one.
    return sorted(rows, key=lambda row: (ROLE_ORDER.index(row.role), row.type, row.name))


def _vm(resources: list[Recorded]) -> Recorded | None:
    return next((r for r in resources if r.type in (AWS_INSTANCE, GCP_INSTANCE)), None)


def user_data_size(resources: list[Recorded]) -> int | None:
    vm = _vm(resources)
    if vm is None:
        return None
    props = vm.props
    text = props.get("userData") if vm.type == AWS_INSTANCE else (props.get("metadata") or {}).get("user-data")
    return len(text.encode()) if isinstance(text, str) else None


def cost(spec: GatewaySpec, resources: list[Recorded]) -> CostEstimate | None:
    """Price what the recording creates: the VM, its boot disk, static IPs, the DNS zone."""
    vm = _vm(resources)
    if vm is None or spec.region is None:
        return None
    props = vm.props
    static_ips = sum(r.type in ("aws:ec2/eip:Eip", "gcp:compute/address:Address") for r in resources)
    dns = int(any(r.type in ("aws:route53/record:Record", "gcp:dns/recordSet:RecordSet") for r in resources))
    if vm.type == AWS_INSTANCE:
        root = props.get("rootBlockDevice") or {}
        market = (props.get("instanceMarketOptions") or {}).get("marketType")
        return estimate(
            "aws",
            spec.region,
            props["instanceType"],
            spot=market == "spot",
            disk_type=root.get("volumeType", "gp3"),
            disk_gib=float(root.get("volumeSize", 8)),
            static_ips=static_ips,
            dns_zones=dns,
        )
    disk = (props.get("bootDisk") or {}).get("initializeParams") or {}
    scheduling = props.get("scheduling") or {}
    spot = scheduling.get("provisioningModel") == "SPOT" or bool(scheduling.get("preemptible"))
    return estimate(
        "gcp",
        spec.region,
        props["machineType"],
        spot=spot,
        disk_type=disk.get("type", "pd-standard"),
        disk_gib=float(disk.get("size", 10)),
        static_ips=static_ips,
        dns_zones=dns,
    )


# ---- entry points ---------------------------------------------------------------------------


def plan(stack: Stack, build: Any = None) -> PlanReport:
    """Plan a loaded stack. `build(stack)` may replace the program's component (tests use it to inject a change)."""
    spec = stack.spec
    warnings: list[str] = []
    fit = capacity(spec)
    if spec.target not in (Target.AWS, Target.GCP):
        note = (
            "kubernetes target: planned in a later release"
            if spec.target is Target.KUBERNETES
            else "local target: runs on this machine with `gpugate up`; Pulumi provisions nothing"
        )
        return PlanReport(stack=stack.name, target=str(spec.target), planned=False, note=note, capacity=fit)

    _importable_infra()
    from infra.offline import record  # noqa: PLC0415 - loads the Pulumi SDKs

    run = record(stack, build)
    verdicts = evaluate_policies(run.resources) + [plain_secrets(run)]
    from infra.secrets import needs_alert_credential  # noqa: PLC0415

    if needs_alert_credential(spec) and "alert_credential" not in stack.secrets:
        warnings.append(
            f"{stack.path.name} holds no {NAMESPACE}:alert_credential yet; before `pulumi up` run "
            f"`pulumi config set --secret {NAMESPACE}:alert_credential <value> -s {stack.name}` "
            "(the plan used a stand-in of 128 characters)"
        )
    outputs = {name: ("[secret]" if secret else str(value)) for name, (value, secret) in run.outputs.items()}
    return PlanReport(
        stack=stack.name,
        target=str(spec.target),
        planned=True,
        note="addresses, ids and the AMI / image are stand-ins; the cloud decides them at `pulumi up`",
        resources=inventory(run.resources),
        policies=verdicts,
        capacity=fit,
        cost=cost(spec, run.resources),
        user_data_bytes=user_data_size(run.resources),
        outputs=outputs,
        warnings=warnings,
    )


def plan_stack(stack_name: str | Path) -> PlanReport:
    """Plan a stack by name (`staging`) or by the path of its stack file. Raises SpecError on a bad stack."""
    return plan(load_stack(stack_name))


StackOpt = Annotated[
    str, typer.Option("--stack", "-s", help="stack name (stacks/Pulumi.<name>.yaml) or a stack file path")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="machine-readable output")]


def plan_command(stack: StackOpt, as_json: JsonOpt = False) -> None:
    """Plan a stack offline: the resources `pulumi up` would create, the policy verdicts, whether the
    model fits the GPU, and the monthly cost. Exits 1 on a policy violation or a model that does not
    fit, 2 on a bad stack file."""
    out, err = Console(soft_wrap=True), Console(stderr=True, soft_wrap=True)
    try:
        report = plan_stack(stack)
    except SpecError as problem:
        err.print(f"[bold red]error:[/] stack {stack!r} is not valid:")
        for item in problem.problems:
            err.print(f"  {item}", highlight=False, markup=False)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    except ValueError as problem:  # the program's own backstops (e.g. no machine for the GPU count)
        err.print(f"[bold red]error:[/] {problem}", highlight=False)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    if as_json:
        out.print_json(report.model_dump_json())
    else:
        out.print(report.to_table())
    raise typer.Exit(EXIT_OK if report.ok else EXIT_CHECK_FAILED)

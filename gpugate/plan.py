"""The offline plan: run the real Pulumi program under mocks, then report its resources, the policy
verdicts, whether the model fits the GPU, and what a month of it costs. No cloud, no Pulumi CLI.

    report = plan_stack("staging")
    report.ok, report.violations, report.cost.monthly_usd
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from gpugate_runtime.capacity import CapacityReport, CpuBudget, GpuBudget, ModelArch, plan_capacity
from gpugate_runtime.contract.host import VM_LAYOUT, Ports
from pydantic import BaseModel, ConfigDict, Field, computed_field
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


class Workload(BaseModel):
    """The request the fleet is sized for: one client holds one stream of this shape."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt_tokens: int = 1000
    completion_tokens: int = 250

    @property
    def context_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class ReplicaThroughput(BaseModel):
    """What one vLLM replica serves of a workload, from a memory-bandwidth roofline (see docs/scaling.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    workload: Workload
    streams: int = Field(description="concurrent streams: max_num_seqs, or fewer when the KV cache runs out first")
    step_seconds: float = Field(description="one decode step for all streams: weights plus their KV cache read once")
    tokens_per_second_per_stream: float
    decode_tokens_per_second: float
    prefill_seconds: float = Field(description="one prompt's prefill, compute-bound")
    requests_per_second: float


class ScalingReport(BaseModel):
    """How far one Kubernetes stack scales: per vLLM replica (from the KV-cache plan), and at the
    autoscaler's bounds."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    replicas_min: int
    replicas_max: int
    gpu_nodes_max: int
    kv_tokens_per_replica: int
    max_num_seqs: int = Field(description="sequences one replica batches at once at most (vLLM --max-num-seqs)")
    full_length_sequences_per_replica: float = Field(description="max_model_len requests one replica's KV cache holds")
    tokens_per_sequence_at_max_num_seqs: int = Field(description="KV tokens each sequence may hold when max_num_seqs run")
    queue_target_per_replica: int
    throughput: ReplicaThroughput = Field(description="a roofline estimate for the planning workload, not a measurement")
    kv_tokens_at_min: int
    kv_tokens_at_max: int
    sequences_at_min: int
    sequences_at_max: int


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
    scaling: ScalingReport | None = None
    cost: CostEstimate | None = None
    cost_at_max: CostEstimate | None = Field(None, description="Kubernetes: the month at replicas.max (cost is at replicas.min)")
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
        if self.scaling is not None:
            sc = self.scaling
            parts.append(
                Text(
                    f"scaling: {sc.replicas_min}..{sc.replicas_max} vLLM replicas (GPU nodes up to {sc.gpu_nodes_max}); "
                    f"per replica {sc.kv_tokens_per_replica:,} KV tokens, up to {sc.max_num_seqs} sequences at once "
                    f"({sc.tokens_per_sequence_at_max_num_seqs:,} tokens each), {sc.full_length_sequences_per_replica:.2f} "
                    f"at full length; KEDA holds {sc.queue_target_per_replica} waiting per replica; "
                    f"{sc.sequences_at_min:,} sequences at min, {sc.sequences_at_max:,} at max"
                )
            )
            tp = sc.throughput
            parts.append(
                Text(
                    f"throughput (roofline estimate, {tp.workload.prompt_tokens:,}-token prompts, "
                    f"{tp.workload.completion_tokens:,}-token completions): per replica {tp.streams} streams at "
                    f"{tp.tokens_per_second_per_stream:g} tokens/s each, {tp.requests_per_second:g} requests/s"
                )
            )
        at_min = " at replicas.min" if self.cost_at_max is not None else ""
        for label, estimate_ in ((at_min, self.cost), (" at replicas.max", self.cost_at_max)):
            parts += _cost_table(estimate_, label) if estimate_ is not None else []
        for warning in self.warnings:
            parts.append(Text(f"warning: {warning}", style="yellow"))
        parts.append(Text.from_markup("[bold green]plan ok[/]" if self.ok else "[bold red]plan failed[/]"))
        return Group(*parts)


def _cost_table(cost: CostEstimate, label: str = "") -> list[Any]:
    """One month's cost for people: a line per item with its unit price and source, then the total."""
    table = Table(
        "item",
        "unit price",
        "per month",
        "source",
        title=f"cost{label} ({cost.currency}, "
        f"{cost.hours_per_month} h/month, list prices as of {cost.prices_as_of}; re-check)",
        title_justify="left",
    )
    for line in cost.lines:
        table.add_row(
            line.item,
            f"{line.unit_usd:g}/{line.unit}",
            f"{line.monthly_usd:,.2f}",
            Text(f"{line.source} [{line.confidence} confidence]"),
        )
    total = "unknown" if cost.monthly_usd is None else f"{cost.monthly_usd:,.2f}"
    table.add_row(Text("total", style="bold"), "", Text(total, style="bold"), f"excludes {cost.excludes}")
    parts: list[Any] = [table]
    for item in cost.missing:
        parts.append(Text(f"no price in gpugate/prices.toml for {item}", style="yellow"))
    if cost.alternative:
        parts.append(Text(f"alternative {cost.alternative}"))
    return parts


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
ROLES.update(
    {
        "gcp:container/cluster:Cluster": "cluster",
        "aws:eks/cluster:Cluster": "cluster",
        "aws:eks/addon:Addon": "cluster",
        "gcp:container/nodePool:NodePool": "node-pool",
        "aws:eks/nodeGroup:NodeGroup": "node-pool",
        "kubernetes:helm.sh/v3:Release": "addon",
        "aws:efs/fileSystem:FileSystem": "storage",
        "aws:efs/mountTarget:MountTarget": "storage",
        "kubernetes:storage.k8s.io/v1:StorageClass": "storage",
    }
)
ROLE_ORDER = (
    "component",
    "provider",
    "network",
    "firewall",
    "identity",
    "secret",
    "cluster",
    "node-pool",
    "addon",
    "storage",
    "gpu-vm",
    "workload",
    "static-ip",
    "dns-record",
)
KUBE_PREFIX = "kubernetes:"
GKE_POOL = "gcp:container/nodePool:NodePool"
EKS_GROUP = "aws:eks/nodeGroup:NodeGroup"
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
    "gcp:container/cluster:Cluster": ("name", "location", "minMasterVersion", "datapathProvider", "masterAuthorizedNetworksConfig"),
    "aws:eks/cluster:Cluster": ("name", "version", "vpcConfig"),
    GKE_POOL: ("autoscaling",),
    EKS_GROUP: ("amiType", "instanceTypes", "scalingConfig", "taints", "labels"),
    "kubernetes:helm.sh/v3:Release": ("chart", "version", "namespace"),
}
# The Kubernetes objects' properties worth a glance; the full objects are in the bundle (kubernetes/*.yaml).
KUBE_SUMMARY = {
    "Deployment": lambda p: {"replicas": (p.get("spec") or {}).get("replicas")},
    "Service": lambda p: {
        "type": (p.get("spec") or {}).get("type"),
        "ports": [port.get("port") for port in (p.get("spec") or {}).get("ports") or []],
    },
    "ScaledObject": lambda p: {
        "replicas": "{:g}..{:g}".format((p.get("spec") or {}).get("minReplicaCount", 0), (p.get("spec") or {}).get("maxReplicaCount", 0)),
        "query": ((p.get("spec") or {}).get("triggers") or [{}])[0].get("metadata", {}).get("query"),
    },
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
        if res.type == GKE_POOL:
            config = props.get("nodeConfig") or {}
            picked = {k: config[k] for k in ("machineType", "guestAccelerators", "taints", "labels", "diskSizeGb") if k in config}
            shown = {**{k: _show(v, None) for k, v in picked.items()}, **shown}
        if res.type.startswith(KUBE_PREFIX) and res.custom and res.type not in ROLES:
            role = "secret" if res.type.endswith(":Secret") else "workload"
            kind = res.type.rsplit(":", 1)[-1]
            summary = KUBE_SUMMARY.get(kind, lambda p: {})(props)
            namespace = (props.get("metadata") or {}).get("namespace")
            shown = {"namespace": str(namespace)} if namespace else {}
            shown.update({k: _show(v, None) for k, v in summary.items() if v not in (None, "", [])})
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


# Datasheet figures per GPU: memory bandwidth (GB/s) and dense bf16 tensor throughput (TFLOPS).
# Sources: NVIDIA L4, A10G (AWS g5), A100 80GB SXM, H100 SXM datasheets.
GPU_BANDWIDTH_GBPS = {"L4": 300, "A10G": 600, "A100-80GB": 2039, "H100-80GB": 3350}
GPU_BF16_TFLOPS = {"L4": 121, "A10G": 125, "A100-80GB": 312, "H100-80GB": 989}
# Shares of those peaks vLLM reaches in practice on decode (bandwidth) and prefill (compute): planning
# assumptions, to be replaced by a measurement on the target GPU (bench/) when one is available.
BANDWIDTH_EFFICIENCY = 0.6
COMPUTE_EFFICIENCY = 0.5
PLANNING_WORKLOAD = Workload()


def replica_throughput(spec: GatewaySpec, fit: CapacityReport, workload: Workload = PLANNING_WORKLOAD) -> ReplicaThroughput:
    """One replica's streams and requests per second for `workload`.

    Decode is memory-bound: each step reads the weights and every stream's KV cache once, spread
    over tensor_parallel_size GPUs; prefill is compute-bound (2 FLOPs per parameter per prompt
    token); the GPU time prefill takes is time decode does not get.
    """
    facts = MODELS[spec.model.id]
    tp = fit.tensor_parallel_size
    blocks_per_stream = math.ceil(workload.context_tokens / fit.block_size)
    streams = max(0, min(fit.max_num_seqs, fit.kv_blocks // blocks_per_stream))
    weights_per_gpu = fit.weight_bytes_per_gpu or 0
    mean_context = workload.prompt_tokens + workload.completion_tokens / 2
    kv_read = streams * mean_context * fit.kv_bytes_per_token
    bandwidth = GPU_BANDWIDTH_GBPS[spec.gpu.type] * 1e9 * BANDWIDTH_EFFICIENCY
    step = (weights_per_gpu + kv_read) / bandwidth
    compute = GPU_BF16_TFLOPS[spec.gpu.type] * 1e12 * COMPUTE_EFFICIENCY * tp
    prefill = 2 * facts.num_params * workload.prompt_tokens / compute
    decode_only = streams / (step * workload.completion_tokens) if streams else 0.0
    requests = decode_only / (1 + prefill * decode_only)
    return ReplicaThroughput(
        workload=workload,
        streams=streams,
        step_seconds=round(step, 4),
        tokens_per_second_per_stream=round(1 / step, 1),
        decode_tokens_per_second=round(requests * workload.completion_tokens, 1),
        prefill_seconds=round(prefill, 3),
        requests_per_second=round(requests, 2),
    )


def scaling(spec: GatewaySpec, fit: CapacityReport) -> ScalingReport | None:
    """Per-replica capacity from the KV-cache plan, and the totals at the autoscaler's bounds."""
    kube = spec.kubernetes
    if kube is None:
        return None
    from gpugate.kube import gpu_node_max  # noqa: PLC0415

    low, high = kube.replicas.min, kube.replicas.max
    return ScalingReport(
        replicas_min=low,
        replicas_max=high,
        gpu_nodes_max=gpu_node_max(kube),
        kv_tokens_per_replica=fit.kv_tokens,
        max_num_seqs=fit.max_num_seqs,
        full_length_sequences_per_replica=round(fit.max_concurrency, 2),
        tokens_per_sequence_at_max_num_seqs=fit.kv_tokens // fit.max_num_seqs,
        queue_target_per_replica=kube.autoscaling.waiting_per_replica,
        throughput=replica_throughput(spec, fit),
        kv_tokens_at_min=fit.kv_tokens * low,
        kv_tokens_at_max=fit.kv_tokens * high,
        sequences_at_min=fit.max_num_seqs * low,
        sequences_at_max=fit.max_num_seqs * high,
    )


def _price(table: dict[str, Any], *keys: str) -> dict[str, Any] | None:
    node: Any = table
    for key in keys:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def kubernetes_cost(spec: GatewaySpec, resources: list[Recorded], gpu_nodes: int) -> CostEstimate | None:
    """A month of the cluster with `gpu_nodes` GPU nodes: GPU and system nodes with their disks, the
    control plane, the certificate volume, the load balancer, its addresses and the DNS zone."""
    from gpugate.prices import CostLine, price_table  # noqa: PLC0415

    pools = [r for r in resources if r.type in (GKE_POOL, EKS_GROUP)]
    if not pools or spec.region is None:
        return None
    table = price_table()
    meta = table["meta"]
    hours = int(meta["hours_per_month"])
    gke = pools[0].type == GKE_POOL
    cloud, region = ("gcp", spec.region) if gke else ("aws", spec.region)
    lines: list[CostLine] = []
    missing: list[str] = []

    def add(item: str, entry: dict[str, Any] | None, rate_key: str, quantity: float, unit: str, what: str) -> None:
        if entry is None or rate_key not in entry:
            missing.append(what)
            return
        per_month = entry[rate_key] * (hours if unit == "hour" else 1)
        lines.append(
            CostLine(
                item=item,
                quantity=quantity,
                unit=unit,
                unit_usd=entry[rate_key],
                monthly_usd=round(per_month * quantity, 2),
                source=entry["source"],
                confidence=entry.get("confidence", "low"),
            )
        )

    disk_type = "pd-balanced" if gke else "gp3"
    disk = _price(table, cloud, region, "disk", disk_type)
    for pool in pools:
        props = pool.props
        if gke:
            config = props.get("nodeConfig") or {}
            machine, disk_gib = config.get("machineType"), float(config.get("diskSizeGb") or 100)
            gpu = bool(config.get("guestAccelerators"))
            floor = (props.get("autoscaling") or {}).get("totalMinNodeCount")
            entry = _price(table, cloud, region, "machine", str(machine))
        else:
            machine, disk_gib = (props.get("instanceTypes") or ["?"])[0], float(props.get("diskSize") or 20)
            gpu = "NVIDIA" in str(props.get("amiType"))
            floor = (props.get("scalingConfig") or {}).get("minSize")
            entry = _price(table, cloud, region, "instance", str(machine))
        count = gpu_nodes if gpu else int(floor or 1)
        role = "GPU" if gpu else "system"
        add(f"{machine} x {count} ({role} nodes, on-demand)", entry, "on_demand_hour", count, "hour", f"{machine} in {region}")
        add(f"{disk_type} {disk_gib:g} GiB x {count} ({role} node disks)", disk, "gb_month", disk_gib * count, "GB-month", f"{disk_type} in {region}")

    plane = _price(table, cloud, "gke" if gke else "eks")
    add("control plane (1 cluster)", plane, "cluster_hour", 1, "hour", "control plane fee")
    claims = [r for r in resources if r.type == "kubernetes:core/v1:PersistentVolumeClaim"]
    for claim in claims:
        claim_spec = claim.props.get("spec") or {}
        size = float(str(((claim_spec.get("resources") or {}).get("requests") or {}).get("storage", "0")).removesuffix("Gi"))
        entry = _price(table, cloud, region, "filestore", "basic-hdd") if gke else _price(table, cloud, region, "efs", "standard")
        billed = max(size, float((entry or {}).get("min_gib", 0))) if gke else float((entry or {}).get("min_gib", 1))
        kind = "Filestore basic HDD" if gke else "EFS standard (data stored)"
        add(f"{kind} {billed:g} GiB (shared certificates)", entry, "gb_month", billed, "GB-month", f"{kind} in {region}")
    if gke:
        # One forwarding rule carries both ports of the LoadBalancer Service.
        add("load balancer forwarding rule (80, 443)", _price(table, cloud, region, "forwarding_rule"), "hour", 1, "hour", "forwarding rule")
    else:
        add("network load balancer", _price(table, cloud, region, "nlb"), "hour", 1, "hour", "NLB")
    ips = sum(r.type in ("gcp:compute/address:Address", "aws:ec2/eip:Eip") for r in resources)
    add(f"static public IPv4 x {ips}", _price(table, cloud, region, "static_ip"), "hour", ips, "hour", f"static IP in {region}")
    if any(r.type in ("aws:route53/record:Record", "gcp:dns/recordSet:RecordSet") for r in resources):
        zone = _price(table, cloud, "dns_zone")
        add("DNS zone x 1 (existing; shared by every stack in it)", zone, "month", 1, "zone-month", "DNS zone")
    total = None if missing else round(sum(line.monthly_usd for line in lines), 2)
    return CostEstimate(
        currency=meta["currency"],
        hours_per_month=hours,
        prices_as_of=str(meta["as_of"]),
        lines=lines,
        missing=missing,
        monthly_usd=total,
        excludes="egress, load-balancer data processing, Filestore/EFS operations, logging/monitoring beyond the free tier, taxes, discounts",
    )


# ---- sizing a fleet (docs/scaling.md) -------------------------------------------------------

# How many GPU replicas one cluster is planned for: a blast-radius and regional-capacity choice (GPU
# quota and L4 stock per region run out long before GKE's 15,000-node limit), not a Kubernetes limit.
MAX_REPLICAS_PER_CLUSTER = 500
SIZING_CLIENTS = (100, 10_000, 1_000_000)
# Catalog models on the smallest GPU set each fits on with a 16k context (prod's own first).
SIZING_MODELS = (
    ("Qwen/Qwen2.5-7B-Instruct", "L4", 1),
    ("mistralai/Mistral-7B-Instruct-v0.3", "L4", 1),
    ("meta-llama/Llama-3.1-8B-Instruct", "L4", 1),
    ("Qwen/Qwen2.5-14B-Instruct", "A100-80GB", 1),
    ("meta-llama/Llama-3.1-70B-Instruct", "H100-80GB", 4),
)


class FleetSize(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    clients: int = Field(description="concurrent clients, each holding one stream")
    replicas: int
    clusters: int
    requests_per_second: float
    monthly_usd: float


def fleet(clients: int, spec: GatewaySpec, throughput: ReplicaThroughput, replica_month: float, cluster_month: float) -> FleetSize:
    """Replicas and clusters for `clients` concurrent streams, and what a month of them costs."""
    assert spec.kubernetes is not None
    replicas = max(spec.kubernetes.replicas.min, math.ceil(clients / throughput.streams))
    clusters = math.ceil(replicas / MAX_REPLICAS_PER_CLUSTER)
    return FleetSize(
        clients=clients,
        replicas=replicas,
        clusters=clusters,
        requests_per_second=round(replicas * throughput.requests_per_second, 1),
        monthly_usd=round(replicas * replica_month + clusters * cluster_month, 2),
    )


def _variant(spec: GatewaySpec, model: str, gpu: str, count: int) -> GatewaySpec:
    data = spec.model_dump(mode="json", exclude_none=True)
    data["model"]["id"] = model
    data["gpu"] = {"type": gpu, "count": count}
    return GatewaySpec.model_validate(data)


def sizing_markdown(stack_name: str = "prod") -> str:
    """The planner's figures for docs/scaling.md: per replica for each catalog model, then the stack's
    fleet for 100, 10,000 and 1,000,000 concurrent clients. `python -c "from gpugate.plan import
    sizing_markdown; print(sizing_markdown())"` prints it; a test keeps the page equal to it."""
    report = plan_stack(stack_name)
    spec = load_stack(stack_name).spec
    assert report.scaling is not None and report.cost is not None and report.cost_at_max is not None
    assert report.cost.monthly_usd is not None and report.cost_at_max.monthly_usd is not None
    kube = spec.kubernetes
    assert kube is not None
    workload = report.scaling.throughput.workload
    lines = [
        f"Workload: {workload.prompt_tokens:,}-token prompts, {workload.completion_tokens:,}-token completions, "
        f"one stream per client; max_model_len {spec.model.max_model_len:,}, max_num_seqs {spec.vllm.max_num_seqs}, "
        f"gpu_memory_utilization {spec.vllm.gpu_memory_utilization:g}.",
        "",
        "| model | GPUs per replica | KV tokens | streams | tokens/s per stream | requests/s |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for model, gpu, count in SIZING_MODELS:
        variant = _variant(spec, model, gpu, count)
        fit = capacity(variant)
        tp = replica_throughput(variant, fit, workload)
        lines.append(
            f"| {model} | {count} x {gpu} | {fit.kv_tokens:,} | {tp.streams} | {tp.tokens_per_second_per_stream:g} "
            f"| {tp.requests_per_second:g} |"
        )
    span = kube.replicas.max - kube.replicas.min
    replica_month = (report.cost_at_max.monthly_usd - report.cost.monthly_usd) / span
    cluster_month = report.cost.monthly_usd - kube.replicas.min * replica_month
    lines += [
        "",
        f"Fleet for `{stack_name}` ({spec.model.id} on {spec.gpu.count} x {spec.gpu.type}, {kube.provider.upper()} "
        f"{spec.region}): {replica_month:,.2f} USD a month per replica (GPU node and its disk), "
        f"{cluster_month:,.2f} USD per cluster (control plane, system nodes, certificate volume, load balancer, "
        f"address, DNS); at most {MAX_REPLICAS_PER_CLUSTER} replicas per cluster.",
        "",
        "| concurrent clients | replicas | clusters | requests/s | USD per month |",
        "|---:|---:|---:|---:|---:|",
    ]
    for clients in SIZING_CLIENTS:
        size = fleet(clients, spec, report.scaling.throughput, replica_month, cluster_month)
        lines.append(
            f"| {size.clients:,} | {size.replicas:,} | {size.clusters:,} | {size.requests_per_second:,g} | {size.monthly_usd:,.0f} |"
        )
    return "\n".join(lines) + "\n"


# ---- entry points ---------------------------------------------------------------------------


def plan(stack: Stack, build: Any = None) -> PlanReport:
    """Plan a loaded stack. `build(stack)` may replace the program's component (tests use it to inject a change)."""
    spec = stack.spec
    warnings: list[str] = []
    fit = capacity(spec)
    if spec.target not in (Target.AWS, Target.GCP, Target.KUBERNETES):
        note = "local target: runs on this machine with `gpugate up`; Pulumi provisions nothing"
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
    kube = spec.kubernetes
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
        scaling=scaling(spec, fit),
        cost=kubernetes_cost(spec, run.resources, kube.replicas.min) if kube else cost(spec, run.resources),
        cost_at_max=kubernetes_cost(spec, run.resources, kube.replicas.max) if kube else None,
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

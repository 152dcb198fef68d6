"""Fleet sizes for docs/scaling.md: replicas, clusters and monthly cost for a number of concurrent clients."""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict, Field

from gpugate.plan.capacity import ReplicaThroughput, capacity, replica_throughput
from gpugate.plan.report import PlanReport
from gpugate.spec import GatewaySpec

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


def sizing_markdown(stack_name: str, spec: GatewaySpec, report: PlanReport) -> str:
    """The planner's figures for docs/scaling.md: per replica for each catalog model, then the stack's
    fleet for 100, 10,000 and 1,000,000 concurrent clients, from the stack's plan `report`.
    `python -c "from gpugate.cli.plan import sizing_page; print(sizing_page())"` prints it for prod; a test
    keeps the page equal to it."""
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
        f"{cluster_month:,.2f} USD per cluster (control plane, system nodes, load balancer, "
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

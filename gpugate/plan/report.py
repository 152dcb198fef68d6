"""A plan's report: what `pulumi up` would create for a stack, the policy verdicts, capacity and cost, and whether it may go ahead."""

from __future__ import annotations

from typing import Any

from gpugate_runtime.capacity import CapacityReport
from pydantic import BaseModel, ConfigDict, Field, computed_field
from rich.console import Group
from rich.table import Table
from rich.text import Text

from gpugate.kubernetes.allocatable import PodFit
from gpugate.plan.capacity import ScalingReport
from gpugate.plan.cost import CostEstimate
from gpugate.plan.inventory import ResourceRow
from gpugate.plan.tiers import ProviderPrice
from gpugate.vm.userdata import USER_DATA_LIMIT_BYTES


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
    tiers: dict[str, CapacityReport] = Field({}, description="each extra local tier's own vLLM (gpugate:tiers)")
    providers: list[ProviderPrice] = Field([], description="each external provider's price for the planning workload")
    scaling: ScalingReport | None = None
    node_fits: list[PodFit] = Field([], description="Kubernetes: each Deployment's pod against one node of its pool")
    cost: CostEstimate | None = None
    cost_at_max: CostEstimate | None = Field(None, description="Kubernetes: the month at replicas.max (cost is at replicas.min)")
    user_data_bytes: int | None = None
    user_data_limit_bytes: int = USER_DATA_LIMIT_BYTES
    outputs: dict[str, str] = {}
    warnings: list[str] = []
    errors: list[str] = Field([], description="what would keep the gateway from serving, beyond the policies")

    @computed_field  # type: ignore[prop-decorator]
    @property
    def violations(self) -> list[Violation]:
        return [v for verdict in self.policies for v in verdict.violations]

    @computed_field  # type: ignore[prop-decorator]
    @property
    def ok(self) -> bool:
        fits = (self.capacity is None or self.capacity.fits) and all(t.fits for t in self.tiers.values())
        size = self.user_data_bytes is None or self.user_data_bytes <= self.user_data_limit_bytes
        return not self.violations and not self.errors and fits and size and all(f.fits for f in self.node_fits)

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
                    f"user-data {self.user_data_bytes:,} of {self.user_data_limit_bytes:,} bytes (gzipped, as the cloud receives it; no secret in it) {mark}"
                )
            )
        if self.capacity is not None:
            parts.append(Text("capacity: ") + Text(self.capacity.message, style=None if self.capacity.fits else "bold red"))
        for name, tier in self.tiers.items():
            parts.append(Text(f"capacity (tier {name}): ") + Text(tier.message, style=None if tier.fits else "bold red"))
        for price in self.providers:
            w = price.workload
            parts.append(
                Text(
                    f"provider {price.provider}: {price.input_usd_per_mtok:g} / {price.output_usd_per_mtok:g} USD "
                    f"per million input / output tokens; {price.usd_per_request:g} USD per "
                    f"{w.prompt_tokens:,}+{w.completion_tokens:,}-token request, "
                    f"{price.usd_per_1000_requests:g} per 1,000 (billed per use, not in the monthly total)"
                )
            )
        for fit in self.node_fits:
            # One line each, unwrapped, so that logs and grep find it whole.
            parts.append(Text(("nodes: " if fit.fits else "FAIL nodes: ") + fit.message, style=None if fit.fits else "bold red"))
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
        for error in self.errors:
            parts.append(Text(f"FAIL {error}", style="bold red"))
        parts.append(Text.from_markup("[bold green]plan ok[/]" if self.ok else "[bold red]plan failed[/]"))
        return Group(*parts)


def _cost_table(cost: CostEstimate, label: str = "") -> list[Any]:
    """One month's cost for people: a line per item with its unit price and source, then the total."""
    table = Table(
        "item",
        "unit price",
        "per month",
        "source",
        title=f"cost{label} ({cost.currency}, {cost.hours_per_month} h/month, list prices as of {cost.prices_as_of}; re-check)",
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
        parts.append(Text(f"no price in gpugate/plan/prices.toml for {item}", style="yellow"))
    if cost.alternative:
        parts.append(Text(f"alternative {cost.alternative}"))
    return parts

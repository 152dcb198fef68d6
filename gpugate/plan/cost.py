"""What a month of a stack costs: the VM or the cluster a recorded plan creates, priced from the dated list-price
table in prices.toml (730 hours a month). The one place gpugate costs anything."""

from __future__ import annotations

import tomllib
from functools import cache
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from gpugate.plan.inventory import AWS_INSTANCE, EKS_GROUP, GKE_POOL, Resource, vm_of
from gpugate.spec import GatewaySpec

PRICES_FILE = Path(__file__).with_name("prices.toml")
Cloud = Literal["aws", "gcp"]


class CostLine(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    item: str
    quantity: float
    unit: str
    unit_usd: float
    monthly_usd: float
    source: str
    confidence: str


class CostEstimate(BaseModel):
    """One month of the resources a plan creates; `monthly_usd` is None when a price is missing."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    currency: str = "USD"
    hours_per_month: int
    prices_as_of: str
    lines: list[CostLine]
    missing: list[str] = Field(default_factory=list, description="resources with no price in the table")
    monthly_usd: float | None
    alternative: str | None = Field(None, description="the same month on the other capacity model (spot vs on-demand)")
    excludes: str = "egress traffic, DNS queries, logging/monitoring beyond the free tier, taxes, discounts"


@cache
def price_table(path: Path = PRICES_FILE) -> dict[str, Any]:
    with path.open("rb") as handle:
        return tomllib.load(handle)


def _entry(table: dict[str, Any], *keys: str) -> dict[str, Any] | None:
    node: Any = table
    for key in keys:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def estimate(
    cloud: Cloud,
    region: str,
    machine: str,
    *,
    spot: bool,
    disk_type: str,
    disk_gib: float,
    static_ips: int = 1,
    dns_zones: int = 1,
    table: dict[str, Any] | None = None,
) -> CostEstimate:
    """Price one VM gateway: the machine (on-demand or spot), its disk, static IPs and the DNS zone."""
    table = table or price_table()
    meta = table["meta"]
    hours = int(meta["hours_per_month"])
    lines: list[CostLine] = []
    missing: list[str] = []
    kind = "instance" if cloud == "aws" else "machine"

    vm = _entry(table, cloud, region, kind, machine)
    capacity = "spot" if spot else "on-demand"
    rate_key = "spot_hour" if spot else "on_demand_hour"
    alternative = None
    if vm is None or rate_key not in vm:
        missing.append(f"{machine} {capacity} in {region}")
    else:
        lines.append(
            CostLine(
                item=f"{machine} ({capacity})",
                quantity=hours,
                unit="hour",
                unit_usd=vm[rate_key],
                monthly_usd=round(vm[rate_key] * hours, 2),
                source=vm["spot_source" if spot else "source"],
                confidence=vm.get("spot_confidence" if spot else "confidence", "low"),
            )
        )
        other = "on_demand_hour" if spot else "spot_hour"
        if other in vm:
            alternative = (
                f"{'on-demand' if spot else 'spot'}: {machine} {vm[other] * hours:,.2f} USD/month for the machine"
            )

    disk = _entry(table, cloud, region, "disk", disk_type)
    if disk is None:
        missing.append(f"{disk_type} disk in {region}")
    else:
        lines.append(
            CostLine(
                item=f"{disk_type} disk {disk_gib:g} GiB",
                quantity=disk_gib,
                unit="GB-month",
                unit_usd=disk["gb_month"],
                monthly_usd=round(disk["gb_month"] * disk_gib, 2),
                source=disk["source"],
                confidence=disk["confidence"],
            )
        )

    ip = _entry(table, cloud, region, "static_ip")
    if static_ips and ip is None:
        missing.append(f"static IP in {region}")
    elif static_ips:
        rate = ip.get("spot_hour", ip["hour"]) if spot else ip["hour"]
        lines.append(
            CostLine(
                item=f"static public IPv4 x {static_ips}",
                quantity=hours * static_ips,
                unit="hour",
                unit_usd=rate,
                monthly_usd=round(rate * hours * static_ips, 2),
                source=ip["source"],
                confidence=ip["confidence"],
            )
        )

    zone = _entry(table, cloud, "dns_zone")
    if dns_zones and zone is None:
        missing.append("DNS zone")
    elif dns_zones:
        lines.append(
            CostLine(
                item=f"DNS zone x {dns_zones} (existing; shared by every stack in it)",
                quantity=dns_zones,
                unit="zone-month",
                unit_usd=zone["month"],
                monthly_usd=round(zone["month"] * dns_zones, 2),
                source=zone["source"],
                confidence=zone["confidence"],
            )
        )

    total = None if missing else round(sum(line.monthly_usd for line in lines), 2)
    return CostEstimate(
        currency=meta["currency"],
        hours_per_month=hours,
        prices_as_of=str(meta["as_of"]),
        lines=lines,
        missing=missing,
        monthly_usd=total,
        alternative=alternative,
    )


def cost(spec: GatewaySpec, resources: list[Resource]) -> CostEstimate | None:
    """Price what the recording creates: the VM, its boot disk, static IPs, the DNS zone."""
    vm = vm_of(resources)
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


def kubernetes_cost(spec: GatewaySpec, resources: list[Resource], gpu_nodes: int) -> CostEstimate | None:
    """A month of the cluster with `gpu_nodes` GPU nodes: GPU and system nodes with their disks, the
    control plane, the load balancer, its addresses and the DNS zone (certificates come from cert-manager into a
    Secret: nothing to pay for)."""
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
    disk = _entry(table, cloud, region, "disk", disk_type)
    for pool in pools:
        props = pool.props
        if gke:
            config = props.get("nodeConfig") or {}
            machine, disk_gib = config.get("machineType"), float(config.get("diskSizeGb") or 100)
            gpu = bool(config.get("guestAccelerators"))
            floor = (props.get("autoscaling") or {}).get("totalMinNodeCount")
            entry = _entry(table, cloud, region, "machine", str(machine))
        else:
            machine, disk_gib = (props.get("instanceTypes") or ["?"])[0], float(props.get("diskSize") or 20)
            gpu = "NVIDIA" in str(props.get("amiType"))
            floor = (props.get("scalingConfig") or {}).get("minSize")
            entry = _entry(table, cloud, region, "instance", str(machine))
        count = gpu_nodes if gpu else int(floor or 1)
        role = "GPU" if gpu else "system"
        add(f"{machine} x {count} ({role} nodes, on-demand)", entry, "on_demand_hour", count, "hour", f"{machine} in {region}")
        add(f"{disk_type} {disk_gib:g} GiB x {count} ({role} node disks)", disk, "gb_month", disk_gib * count, "GB-month", f"{disk_type} in {region}")

    plane = _entry(table, cloud, "gke" if gke else "eks")
    add("control plane (1 cluster)", plane, "cluster_hour", 1, "hour", "control plane fee")
    claims = [r for r in resources if r.type == "kubernetes:core/v1:PersistentVolumeClaim"]
    for claim in claims:
        claim_spec = claim.props.get("spec") or {}
        size = float(str(((claim_spec.get("resources") or {}).get("requests") or {}).get("storage", "0")).removesuffix("Gi"))
        # One pod's volume (the shared limits store): a block disk of the cluster's default class.
        add(f"{disk_type} {size:g} GiB (limits store volume)", disk, "gb_month", size, "GB-month", f"{disk_type} in {region}")
    if gke:
        # One forwarding rule carries both ports of the LoadBalancer Service.
        add("load balancer forwarding rule (80, 443)", _entry(table, cloud, region, "forwarding_rule"), "hour", 1, "hour", "forwarding rule")
    else:
        add("network load balancer", _entry(table, cloud, region, "nlb"), "hour", 1, "hour", "NLB")
    ips = sum(r.type in ("gcp:compute/address:Address", "aws:ec2/eip:Eip") for r in resources)
    add(f"static public IPv4 x {ips}", _entry(table, cloud, region, "static_ip"), "hour", ips, "hour", f"static IP in {region}")
    if any(r.type in ("aws:route53/record:Record", "gcp:dns/recordSet:RecordSet") for r in resources):
        zone = _entry(table, cloud, "dns_zone")
        add("DNS zone x 1 (existing; shared by every stack in it)", zone, "month", 1, "zone-month", "DNS zone")
    total = None if missing else round(sum(line.monthly_usd for line in lines), 2)
    return CostEstimate(
        currency=meta["currency"],
        hours_per_month=hours,
        prices_as_of=str(meta["as_of"]),
        lines=lines,
        missing=missing,
        monthly_usd=total,
        excludes="egress, load-balancer data processing, DNS queries, logging/monitoring beyond the free tier, taxes, discounts",
    )

"""Monthly cost of a VM gateway from the dated list-price table in prices.toml (730 hours a month)."""

from __future__ import annotations

import tomllib
from functools import cache
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

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

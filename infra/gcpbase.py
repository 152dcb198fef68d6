"""What both GCP programs (a VM gateway, a GKE cluster) create alike: a service account holding project
roles, and the regional static address with the domain's A record in the stack's Cloud DNS zone."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pulumi
import pulumi_gcp as gcp

from gpugate.spec import GatewaySpec

NETWORK_TIER = "PREMIUM"
DNS_TTL_SECONDS = 300


def service_account(
    name: str, *, account_id: str, display_name: str, project: str, roles: Sequence[str], opts: pulumi.ResourceOptions
) -> tuple[gcp.serviceaccount.Account, pulumi.Output[str]]:
    """The account (its id cut to GCP's 30 characters) with each role granted in the project, and its IAM member."""
    account = gcp.serviceaccount.Account(name, account_id=account_id[:30], display_name=display_name, opts=opts)
    member = account.email.apply(lambda email: f"serviceAccount:{email}")
    for role in roles:
        gcp.projects.IAMMember(f"{name}-{role.split('/')[-1]}", project=project, role=role, member=member, opts=opts)
    return account, member


def public_address(
    name: str, spec: GatewaySpec, labels: Mapping[str, str], opts: pulumi.ResourceOptions, invoke: pulumi.InvokeOptions
) -> gcp.compute.Address:
    """The gateway's external address, and `spec.domain` pointing at it in the zone `spec.dns_zone`."""
    address = gcp.compute.Address(
        f"{name}-ip", region=spec.region, address_type="EXTERNAL", network_tier=NETWORK_TIER, labels=dict(labels), opts=opts
    )
    zone = gcp.dns.get_managed_zone(name=spec.dns_zone, opts=invoke)
    gcp.dns.RecordSet(
        f"{name}-dns",
        managed_zone=zone.name,
        name=f"{spec.domain}.",
        type="A",
        ttl=DNS_TTL_SECONDS,
        rrdatas=[address.address],
        opts=opts,
    )
    return address

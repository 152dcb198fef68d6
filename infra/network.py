"""The gateway's public face, shared by every VM target: its URL, the web ports to the world, SSH to admins only."""

from __future__ import annotations

from dataclasses import dataclass

from gpugate.spec import GatewaySpec

WORLD_IPV4 = "0.0.0.0/0"
WORLD_IPV6 = "::/0"
SSH_PORT = 22
# Google's Identity-Aware Proxy connects from this range only (documented by Google as the
# source of IAP TCP forwarding); it is Google's proxy, not the internet, and each tunnel is
# authorised per user by IAM (roles/iap.tunnelResourceAccessor).
GCP_IAP_RANGE = "35.235.240.0/20"
# The dedicated network's address plan: one /16 per gateway network, the host subnet in it.
NETWORK_CIDR = "10.80.0.0/16"
SUBNET_CIDR = "10.80.0.0/24"


@dataclass(frozen=True)
class IngressRule:
    """One allowed inbound flow: a TCP port from a set of source CIDRs."""

    name: str
    port: int
    sources: tuple[str, ...]
    description: str
    protocol: str = "tcp"


def ingress_rules(spec: GatewaySpec, ssh_fallback: tuple[str, ...] = ()) -> tuple[IngressRule, ...]:
    """HTTP and HTTPS from anywhere (ACME and clients); SSH from `admin_cidrs`, else from
    `ssh_fallback` (GCP: the IAP range), else no SSH rule at all (AWS: SSM Session Manager)."""
    rules = [
        IngressRule("http", spec.ports.http, (WORLD_IPV4,), "HTTP: ACME challenges and the redirect to HTTPS"),
        IngressRule("https", spec.ports.https, (WORLD_IPV4,), "HTTPS: the OpenAI-compatible API"),
    ]
    admins = tuple(str(cidr) for cidr in spec.admin_cidrs)
    if admins:
        rules.append(IngressRule("ssh", SSH_PORT, admins, "SSH from the stack's admin networks"))
    elif ssh_fallback:
        rules.append(IngressRule("ssh", SSH_PORT, ssh_fallback, "SSH through Identity-Aware Proxy only"))
    return tuple(rules)


def public_url(spec: GatewaySpec) -> str:
    port = "" if spec.ports.https == 443 else f":{spec.ports.https}"
    return f"https://{spec.domain}{port}"

"""How operators reach a created cluster's API server: from the stack's admin networks, or from inside its network."""

from __future__ import annotations

from gpugate.spec import GatewaySpec
from gpugate.stackfile import NAMESPACE

DOC = "docs/kubernetes-cluster.md"


def private_api_note(spec: GatewaySpec, stack: str) -> str | None:
    """What to do when an EKS cluster's API endpoint is private (no admin networks), or None when it is public to them.

    infra/eks.py opens the public endpoint to `admin_cidrs` only; with none it is private, and `pulumi up` run from
    outside the VPC creates the cluster but then cannot reach it to create the gateway's objects."""
    kube = spec.kubernetes
    if kube is None or kube.provider != "eks" or spec.admin_cidrs:
        return None
    return (
        f"{NAMESPACE}:admin_cidrs is empty, so the EKS API endpoint is private (reachable from inside the VPC only): "
        "`pulumi up` from outside creates the cluster but cannot create its Kubernetes objects. Either list the "
        f"networks you run pulumi and kubectl from in {NAMESPACE}:admin_cidrs, or run `pulumi up -s {stack}` and kubectl "
        f"from a machine inside the VPC (see {DOC}, API access)"
    )

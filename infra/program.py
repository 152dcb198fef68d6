"""The Pulumi program as a function: a stack in, its gateway component and stack outputs out.

`infra/__main__.py` calls it under `pulumi up`; `gpugate plan` and the tests call it under mocks.
"""

from __future__ import annotations

from typing import Any

import pulumi

from gpugate.spec import Target
from gpugate.stackfile import Stack
from gpugate.targets import render_bundle
from infra.vm import OUTPUT_NAMES


class TargetNotProvisioned(Exception):
    """The stack's target is not provisioned by this program (yet)."""


def gateway(stack: Stack) -> pulumi.ComponentResource:
    """Build the stack's gateway component from its spec and its rendered bundle."""
    target = stack.spec.target
    name = f"gpugate-{stack.name}"
    if target is Target.AWS:
        from infra.aws import AwsGateway, args_from_bundle

        return AwsGateway(name, args_from_bundle(stack, render_bundle(stack)))
    if target is Target.GCP:
        from infra.gcp import GcpGateway, args_from_bundle

        return GcpGateway(name, args_from_bundle(stack, render_bundle(stack)))
    if target is Target.KUBERNETES:
        from infra.kubernetes import KubernetesGateway, KubernetesGatewayArgs

        return KubernetesGateway(name, KubernetesGatewayArgs.from_bundle(stack, render_bundle(stack)))
    raise TargetNotProvisioned(f"the {target} target runs on this machine (`gpugate up`); Pulumi provisions nothing for it")


def stack_outputs(component: pulumi.ComponentResource) -> dict[str, Any]:
    """The component's outputs: the VM set, or the set its class names (Kubernetes: cluster, namespace, kubeconfig)."""
    return {name: getattr(component, name) for name in getattr(component, "OUTPUTS", OUTPUT_NAMES)}

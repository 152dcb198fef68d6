"""What the namespace holds before any component: namespaces, Secrets, default-deny, service accounts."""

from __future__ import annotations

from typing import Any

from gpugate.kubernetes.build import Build
from gpugate.kubernetes.objects import (
    GATEWAY,
    SECRET_KEYS,
    VLLM,
    labels,
    meta,
    network_policy,
)


def _namespaces(b: Build) -> list[dict[str, Any]]:
    def namespace(name: str, level: str) -> dict[str, Any]:
        tags = {
            **labels(name, b.stack),
            "pod-security.kubernetes.io/enforce": level,
            "pod-security.kubernetes.io/enforce-version": "latest",
        }
        return {"apiVersion": "v1", "kind": "Namespace", "metadata": meta(name, None, tags)}

    # The GPU daemons read the node's devices and driver: they need a privileged namespace of their own.
    return [namespace(b.ns, "restricted"), namespace(b.gpu_ns, "privileged")]


def _secrets(b: Build) -> list[dict[str, Any]]:
    out = []
    for name, items in sorted(b.secrets.items()):
        annotations = {}
        if name == SECRET_KEYS:
            annotations["gpugate.dev/owner"] = "operators: created once with the prober's key, then edited by the keys runbook"
        metadata = meta(name, b.ns, labels(name, b.stack), **({"annotations": annotations} if annotations else {}))
        out.append({"apiVersion": "v1", "kind": "Secret", "metadata": metadata, "type": "Opaque", "stringData": dict(items)})
    return out


def _service_accounts(b: Build) -> list[dict[str, Any]]:
    # No workload talks to the Kubernetes API: no token is mounted.
    return [
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": meta(name, b.ns, labels(name, b.stack)),
            "automountServiceAccountToken": False,
        }
        for name in (VLLM, GATEWAY)
    ]



def objects(b: Build) -> list[dict[str, Any]]:
    """The namespaces, the Secrets, the service accounts, and the default that nothing reaches a pod."""
    return [
        *_namespaces(b),
        *_secrets(b),
        *_service_accounts(b),
        # Nothing reaches a pod of the namespace unless a component's policy lets it.
        network_policy("default-deny-ingress", b.ns, b.stack, {}, []),
    ]

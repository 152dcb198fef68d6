"""Every Kubernetes object of a stack's gateway, built as data from the spec: Pulumi creates them,
`gpugate render` writes them, one file per object. One module per component, each emitting all of
its objects: cluster (namespaces, Secrets, default-deny), the certificate (cert-manager), proxy, the shared limits
store, vLLM, GPU daemons, monitoring, the node autoscaler (EKS)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gpugate.kubernetes import autoscaler, certificates, cluster, gpu, limitstore, monitoring, proxy, vllm
from gpugate.kubernetes.build import (
    Build,
    ClusterFacts,
    placeholder_facts,
    placeholder_secrets,
)
from gpugate.kubernetes.objects import HF_TOKEN_SECRET, LAYOUT, object_path
from gpugate.render.bundle import Bundle, dump_yaml, header, seal
from gpugate.spec import Target
from gpugate.stackfile import Stack

COMPONENTS = (cluster, certificates, proxy, limitstore, vllm, gpu, monitoring, autoscaler)


def objects(build: Build) -> list[dict[str, Any]]:
    """Every object, namespaces first: what `pulumi up` applies and `gpugate render` writes."""
    return [obj for component in COMPONENTS for obj in component.objects(build)]


def pod_build(
    stack: Stack, facts: ClusterFacts | None = None, secrets: Mapping[str, Mapping[str, Any]] | None = None
) -> Build:
    """The build of a stack's objects: its spec, and the cluster's facts and secret values (placeholders unless given)."""
    spec = stack.spec
    if spec.target is not Target.KUBERNETES or spec.kubernetes is None:
        raise ValueError(f"stack {stack.name} targets {spec.target}, not kubernetes")
    return Build(
        stack=stack.name,
        spec=spec,
        header=header(stack),
        facts=facts or placeholder_facts(spec.kubernetes, stack.name),
        secrets=secrets if secrets is not None else placeholder_secrets(spec, hf_token=HF_TOKEN_SECRET in stack.secrets),
    )


def manifest_files(stack: Stack) -> dict[str, bytes]:
    """Every object as the program would create it, one YAML file each, for review and diffs. Secret
    values and the addresses only the cloud knows are placeholders."""
    build = pod_build(stack)
    assert stack.spec.kubernetes is not None
    text = f"{build.header} (Kubernetes {stack.spec.kubernetes.version})"
    out: dict[str, bytes] = {}
    for obj in objects(build):
        path = object_path(obj)
        if path in out:
            raise ValueError(f"two Kubernetes objects would be written to {path}")
        out[path] = dump_yaml(obj, text)
    return out


def render_kubernetes(stack: Stack) -> Bundle:
    """The Kubernetes target's bundle: the objects the program applies (the pods use the VM's layout)."""
    bundle = Bundle(stack=stack.name, target=stack.spec.target, spec_sha256=stack.spec_sha256, files=manifest_files(stack))
    return seal(bundle, LAYOUT)

"""The inputs of one build of a stack's Kubernetes objects: the spec, the cluster's facts, the secrets."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from gpugate_runtime.contract.host import Ports

from gpugate.kubernetes.objects import (
    ALERT_ITEM,
    HF_TOKEN_ITEM,
    KEY_STORE_FILE,
    LIMITS_CONF_ITEM,
    LIMITS_PASSWORD_ITEM,
    PLACEHOLDER,
    PROBER_KEY_ITEM,
    SECRET_ALERT,
    SECRET_HF,
    SECRET_INTERNAL,
    SECRET_KEYS,
    SECRET_LIMITS,
    VLLM_KEY_ITEM,
)
from gpugate.spec import GatewaySpec, KubernetesSpec


@dataclass(frozen=True)
class ClusterFacts:
    """What the cluster component tells the workloads: the LoadBalancer's fixed address and any
    provider-specific Service annotations. Values may be Pulumi Outputs, or placeholders when rendering."""

    provider: str
    load_balancer_ip: Any = None
    service_annotations: Mapping[str, Any] = field(default_factory=dict)
    cluster_name: str | None = None
    # EKS: the IAM role the Cluster Autoscaler's service account assumes (IRSA).
    autoscaler_role_arn: Any = None
    # EKS: the Route53 hosted zone cert-manager answers DNS-01 challenges in.
    dns_zone_id: Any = None
    # Annotations of cert-manager's service account: the cloud identity it solves DNS-01 with.
    cert_manager_annotations: Mapping[str, Any] = field(default_factory=dict)


def cluster_name(kube: KubernetesSpec, stack: str) -> str:
    """The name of the cluster the program creates (or of the existing one)."""
    return kube.cluster_name or f"gpugate-{stack}"


def placeholder_facts(kube: KubernetesSpec, stack: str) -> ClusterFacts:
    """The facts as a render shows them: the address the program reserves is only known at `pulumi up`."""
    if kube.provider == "gke":
        return ClusterFacts("gke", load_balancer_ip="0.0.0.0", cluster_name=cluster_name(kube, stack))  # the reserved address
    if kube.provider == "eks":
        return ClusterFacts(
            "eks",
            service_annotations=eks_service_annotations("(elastic IP allocations)"),
            cluster_name=cluster_name(kube, stack),
            autoscaler_role_arn="(IAM role ARN, known at pulumi up)",
            dns_zone_id="(Route53 hosted zone id, looked up at pulumi up)",
        )
    return ClusterFacts("existing", cluster_name=kube.cluster_name)


def eks_service_annotations(eip_allocations: Any) -> dict[str, Any]:
    """The in-tree AWS cloud provider's NLB, on the program's Elastic IPs (one per subnet)."""
    return {
        "service.beta.kubernetes.io/aws-load-balancer-type": "nlb",
        "service.beta.kubernetes.io/aws-load-balancer-eip-allocations": eip_allocations,
        "service.beta.kubernetes.io/aws-load-balancer-cross-zone-load-balancing-enabled": "true",
    }


@dataclass(frozen=True)
class Build:
    """Inputs of one build of the objects."""

    stack: str
    spec: GatewaySpec
    header: str
    facts: ClusterFacts
    secrets: Mapping[str, Mapping[str, Any]]  # Secret name -> item -> value (Outputs, or placeholders)

    @property
    def kube(self) -> KubernetesSpec:
        assert self.spec.kubernetes is not None
        return self.spec.kubernetes

    @property
    def ports(self) -> Ports:
        return Ports(self.spec.ports.internal_base)

    @property
    def ns(self) -> str:
        return self.kube.namespace

    @property
    def gpu_ns(self) -> str:
        return f"{self.kube.namespace}-gpu"


def secret_names(spec: GatewaySpec, hf_token: bool = False) -> dict[str, tuple[str, ...]]:
    """Secret name -> its items, for this stack (`hf_token`: the stack holds a Hugging Face token)."""
    names = {
        SECRET_INTERNAL: (VLLM_KEY_ITEM, PROBER_KEY_ITEM),
        SECRET_KEYS: (KEY_STORE_FILE,),
        SECRET_LIMITS: (LIMITS_PASSWORD_ITEM, LIMITS_CONF_ITEM),
    }
    if spec.alerts.needs_credential:
        names[SECRET_ALERT] = (ALERT_ITEM,)
    if hf_token:
        names[SECRET_HF] = (HF_TOKEN_ITEM,)
    return names


def placeholder_secrets(spec: GatewaySpec, hf_token: bool = False) -> dict[str, dict[str, str]]:
    return {name: {item: PLACEHOLDER for item in items} for name, items in secret_names(spec, hf_token).items()}


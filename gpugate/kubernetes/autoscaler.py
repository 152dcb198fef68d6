"""The node autoscaler component (EKS): Cluster Autoscaler, which adds a GPU node when KEDA adds a vLLM replica
that no node can hold, and removes a node once its replica is gone. GKE autoscales its node pools itself.

Cluster Autoscaler rather than Karpenter: the GPU pool is one managed node group of one machine type whose
bounds the spec states (replicas.min .. replicas.max + 1), which is the case Cluster Autoscaler serves with
no controller-owned launch templates, node classes or interruption queues; the same bounds then hold on
EKS and GKE. The objects follow the AWS provider's auto-discovery example
(kubernetes/autoscaler: cluster-autoscaler/cloudprovider/aws/examples/cluster-autoscaler-autodiscover.yaml).
"""

from __future__ import annotations

from typing import Any

from gpugate.kubernetes.build import Build
from gpugate.kubernetes.objects import POOL_LABEL, SYSTEM_POOL, labels, meta, resources, restricted, selector

AUTOSCALER = "cluster-autoscaler"
KUBE_SYSTEM = "kube-system"
# IRSA: the service account's annotation names the IAM role its pods assume.
IRSA_ANNOTATION = "eks.amazonaws.com/role-arn"
# The node groups' tags Cluster Autoscaler discovers them by (EKS tags a managed group's Auto Scaling group
# with both; the program also sets them on the node groups).
DISCOVERY_TAGS = ("k8s.io/cluster-autoscaler/enabled", "k8s.io/cluster-autoscaler/{cluster}")
METRICS_PORT = 8085
UID_NOBODY = 65534


def discovery_tags(cluster: str) -> dict[str, str]:
    """The tags a node group carries for Cluster Autoscaler to manage it, as EKS sets them on its Auto Scaling group."""
    enabled, owned = DISCOVERY_TAGS
    return {enabled: "true", owned.format(cluster=cluster): "owned"}


def autoscaler_args(b: Build) -> list[str]:
    cluster = b.facts.cluster_name
    assert cluster is not None
    return [
        "./cluster-autoscaler",
        "--cloud-provider=aws",
        "--node-group-auto-discovery=asg:tag=" + ",".join(t.format(cluster=cluster) for t in DISCOVERY_TAGS),
        # One machine type per pool: least-waste only matters if a pool is added; similar groups stay balanced.
        "--expander=least-waste",
        "--balance-similar-node-groups",
        # vLLM's pods keep caches in emptyDirs; they must not pin a node forever.
        "--skip-nodes-with-local-storage=false",
        # A GPU node leaves only after its vLLM pod drained its streams (the pod's own grace period).
        f"--max-graceful-termination-sec={b.kube.autoscaling.drain_seconds + 30}",
        "--stderrthreshold=info",
        "--v=2",
    ]


def _rbac(b: Build) -> list[dict[str, Any]]:
    tags = labels(AUTOSCALER, b.stack)
    read = ["watch", "list", "get"]
    cluster_rules = [
        {"apiGroups": [""], "resources": ["events", "endpoints"], "verbs": ["create", "patch"]},
        {"apiGroups": [""], "resources": ["pods/eviction"], "verbs": ["create"]},
        {"apiGroups": [""], "resources": ["pods/status"], "verbs": ["update"]},
        {"apiGroups": [""], "resources": ["endpoints"], "resourceNames": [AUTOSCALER], "verbs": ["get", "update"]},
        {"apiGroups": [""], "resources": ["nodes"], "verbs": ["watch", "list", "get", "update"]},
        {
            "apiGroups": [""],
            "resources": ["namespaces", "pods", "services", "replicationcontrollers", "persistentvolumeclaims", "persistentvolumes"],
            "verbs": read,
        },
        {"apiGroups": ["policy"], "resources": ["poddisruptionbudgets"], "verbs": ["watch", "list"]},
        {"apiGroups": ["apps"], "resources": ["statefulsets", "replicasets", "daemonsets"], "verbs": read},
        {"apiGroups": ["storage.k8s.io"], "resources": ["storageclasses", "csinodes", "csidrivers", "csistoragecapacities"], "verbs": read},
        {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["get", "list", "watch", "patch"]},
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "resourceNames": [AUTOSCALER], "verbs": ["get", "update"]},
    ]
    role_rules = [
        {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["create", "list", "watch"]},
        {
            "apiGroups": [""],
            "resources": ["configmaps"],
            "resourceNames": ["cluster-autoscaler-status", "cluster-autoscaler-priority-expander"],
            "verbs": ["delete", "get", "update", "watch"],
        },
    ]
    subject = [{"kind": "ServiceAccount", "name": AUTOSCALER, "namespace": KUBE_SYSTEM}]
    rbac = "rbac.authorization.k8s.io"
    return [
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": meta(AUTOSCALER, KUBE_SYSTEM, tags, annotations={IRSA_ANNOTATION: b.facts.autoscaler_role_arn}),
        },
        {"apiVersion": f"{rbac}/v1", "kind": "ClusterRole", "metadata": meta(AUTOSCALER, None, tags), "rules": cluster_rules},
        {"apiVersion": f"{rbac}/v1", "kind": "Role", "metadata": meta(AUTOSCALER, KUBE_SYSTEM, tags), "rules": role_rules},
        {
            "apiVersion": f"{rbac}/v1",
            "kind": "ClusterRoleBinding",
            "metadata": meta(AUTOSCALER, None, tags),
            "roleRef": {"apiGroup": rbac, "kind": "ClusterRole", "name": AUTOSCALER},
            "subjects": subject,
        },
        {
            "apiVersion": f"{rbac}/v1",
            "kind": "RoleBinding",
            "metadata": meta(AUTOSCALER, KUBE_SYSTEM, tags),
            "roleRef": {"apiGroup": rbac, "kind": "Role", "name": AUTOSCALER},
            "subjects": subject,
        },
    ]


def _deployment(b: Build) -> dict[str, Any]:
    tags = labels(AUTOSCALER, b.stack)
    assert b.kube.images.cluster_autoscaler is not None and b.spec.region is not None
    container = {
        "name": AUTOSCALER,
        "image": b.kube.images.cluster_autoscaler,
        "command": autoscaler_args(b),
        "env": [{"name": "AWS_REGION", "value": b.spec.region}],
        "ports": [{"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"}],
        "resources": resources("100m", "600Mi", "1", "600Mi"),
        "livenessProbe": {"httpGet": {"path": "/health-check", "port": "metrics"}, "periodSeconds": 30},
        "securityContext": restricted(),
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": meta(AUTOSCALER, KUBE_SYSTEM, tags),
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": selector(AUTOSCALER)},
            "template": {
                # It must not evict itself while draining the node it runs on.
                "metadata": {"labels": tags, "annotations": {"cluster-autoscaler.kubernetes.io/safe-to-evict": "false"}},
                "spec": {
                    "serviceAccountName": AUTOSCALER,
                    "priorityClassName": "system-cluster-critical",
                    # On the system pool: a GPU node is never kept up by the autoscaler itself.
                    "nodeSelector": {POOL_LABEL: SYSTEM_POOL},
                    # fsGroup: the projected IRSA web identity token is readable by the non-root user.
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": UID_NOBODY,
                        "fsGroup": UID_NOBODY,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "containers": [container],
                },
            },
        },
    }


def objects(b: Build) -> list[dict[str, Any]]:
    """Cluster Autoscaler's service account (with its IAM role), RBAC and Deployment; none off EKS."""
    if b.facts.provider != "eks":
        return []
    return [*_rbac(b), _deployment(b)]

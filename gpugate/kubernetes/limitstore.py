"""The shared limits store: one Redis that every proxy replica's authz uses for rpm, concurrency, tpm and spend.

Without it each replica held its own limits (two replicas gave a key twice its rpm), and a pod has nowhere
durable to keep spend (its key store is a read-only Secret). It runs `redis-server` from the runtime image
(Debian's package, installed by runtime/containers/runtime.Containerfile), so no third-party image or
digest enters the stack; it answers only the proxy pods (NetworkPolicy) and only with the password from
a Secret the program generates; its append-only file on a small volume keeps spend across restarts.
"""

from __future__ import annotations

from typing import Any

from gpugate_runtime.contract.services import GID_GATEWAY, UIDS, USER_GATEWAY

from gpugate.kubernetes.build import Build
from gpugate.kubernetes.objects import (
    GATEWAY,
    LIMITS,
    LIMITS_AUTH_DIR,
    LIMITS_CONF_ITEM,
    LIMITS_PORT,
    POOL_LABEL,
    SECRET_LIMITS,
    SYSTEM_POOL,
    labels,
    meta,
    network_policy,
    resources,
    restricted,
    selector,
    tcp,
)
from gpugate.spec import KubernetesSpec

DATA_PVC = f"{LIMITS}-data"
DATA_DIR = "/var/lib/gpugate/limits"
DATA_GIB = 1
# Counters of a few thousand key families take a few MiB; past this Redis drops the soonest-expiring keys.
MAX_MEMORY = "200mb"


def limits_url(kube: KubernetesSpec) -> str:
    """What authz's redis_url is in a proxy pod: the store's Service, database 0 (no credentials: a file)."""
    return f"redis://{LIMITS}.{kube.namespace}.svc.cluster.local:{LIMITS_PORT}/0"


def _deployment(b: Build) -> dict[str, Any]:
    tags = labels(LIMITS, b.stack)
    port = {"tcpSocket": {"port": "redis"}}
    command = [
        "redis-server", str(LIMITS_AUTH_DIR / LIMITS_CONF_ITEM),  # requirepass, from the Secret
        "--port", str(LIMITS_PORT), "--bind", "0.0.0.0", "--protected-mode", "yes",
        "--dir", DATA_DIR, "--appendonly", "yes", "--appendfsync", "everysec", "--save", "",
        "--maxmemory", MAX_MEMORY, "--maxmemory-policy", "volatile-ttl",
    ]  # fmt: skip
    container = {
        "name": "redis",
        "image": b.kube.images.runtime,
        "command": command,
        "ports": [{"name": "redis", "containerPort": LIMITS_PORT, "protocol": "TCP"}],
        "resources": resources("100m", "128Mi", "500m", "320Mi"),
        "readinessProbe": {**port, "periodSeconds": 5},
        "livenessProbe": {**port, "periodSeconds": 15, "failureThreshold": 4},
        "securityContext": {**restricted(), "runAsUser": UIDS[USER_GATEWAY], "runAsGroup": GID_GATEWAY},
        "volumeMounts": [
            {"name": "auth", "mountPath": str(LIMITS_AUTH_DIR), "readOnly": True},
            {"name": "data", "mountPath": DATA_DIR},
        ],
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": meta(LIMITS, b.ns, tags),
        "spec": {
            # One writer on a ReadWriteOnce volume: the old pod stops before the new one starts. While
            # it is away authz answers 503 (limits fail closed); the key check does not need it.
            "replicas": 1,
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": selector(LIMITS)},
            "template": {
                "metadata": {"labels": tags},
                "spec": {
                    "automountServiceAccountToken": False,
                    "nodeSelector": {POOL_LABEL: SYSTEM_POOL},
                    "securityContext": {
                        "runAsNonRoot": True,
                        "fsGroup": GID_GATEWAY,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "containers": [container],
                    "volumes": [
                        {
                            "name": "auth",
                            "secret": {
                                "secretName": SECRET_LIMITS,
                                "items": [{"key": LIMITS_CONF_ITEM, "path": LIMITS_CONF_ITEM}],
                                "defaultMode": 0o440,
                            },
                        },
                        {"name": "data", "persistentVolumeClaim": {"claimName": DATA_PVC}},
                    ],
                },
            },
        },
    }


def objects(b: Build) -> list[dict[str, Any]]:
    """The store's volume, Deployment, Service, and the policy that only proxy pods reach it."""
    return [
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": meta(DATA_PVC, b.ns, labels(LIMITS, b.stack)),
            # The cluster's default storage class: a few MiB of append-only file.
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": f"{DATA_GIB}Gi"}}},
        },
        _deployment(b),
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": meta(LIMITS, b.ns, labels(LIMITS, b.stack)),
            "spec": {
                "type": "ClusterIP",
                "selector": selector(LIMITS),
                "ports": [{"name": "redis", "port": LIMITS_PORT, "targetPort": "redis", "protocol": "TCP"}],
            },
        },
        network_policy(LIMITS, b.ns, b.stack, {"matchLabels": selector(LIMITS)}, [
            {"from": [{"podSelector": {"matchLabels": selector(GATEWAY)}}], "ports": [tcp(LIMITS_PORT)]},
        ]),  # fmt: skip
    ]

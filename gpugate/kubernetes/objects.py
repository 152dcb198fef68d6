"""What every Kubernetes component shares: names, labels, metadata, resources and security contexts."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gpugate_runtime.contract.host import VM_LAYOUT, VM_RUNTIME_PYTHON

# The pods use the VM's directory layout, so the bundle's Caddyfile and settings mean the same paths.
LAYOUT = VM_LAYOUT
MANIFEST_DIR = "kubernetes"
PART_OF = "gpugate"

# GPU nodes carry this taint and label; only vLLM (and the GPU daemons) tolerate and select them.
GPU_TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}
GPU_RESOURCE = "nvidia.com/gpu"
POOL_LABEL = "gpugate.dev/pool"
GPU_POOL = "gpu"
SYSTEM_POOL = "system"
# kube-prometheus-stack, KEDA: where the addons run (installed there by the program, or already).
MONITORING_NAMESPACE = "monitoring"
KEDA_NAMESPACE = "keda"
# cert-manager issues the public certificate into TLS_SECRET; Reloader rolls the proxy pods when it is renewed.
CERT_MANAGER_NAMESPACE = "cert-manager"
CERT_MANAGER_ACCOUNT = "cert-manager"  # the controller's service account, which solves DNS-01 with the cloud's DNS
RELOADER_NAMESPACE = "reloader"
RELOAD_ANNOTATION = "secret.reloader.stakater.com/reload"
PROMETHEUS_URL = f"http://kube-prometheus-stack-prometheus.{MONITORING_NAMESPACE}.svc:9090"
# The Prometheus pods, and only they, of the monitoring namespace: prometheus-operator gives every pod of a
# Prometheus these selector labels (pkg/prometheus/statefulset.go); Alertmanager, Grafana, the operator and
# the exporters run there carry other names. Namespace and pod selectors in one peer: both must match.
PROMETHEUS_POD_LABELS = {"app.kubernetes.io/name": "prometheus", "app.kubernetes.io/managed-by": "prometheus-operator"}
PROMETHEUS_PEER = {
    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": MONITORING_NAMESPACE}},
    "podSelector": {"matchLabels": PROMETHEUS_POD_LABELS},
}
# kube-prometheus-stack's node exporter runs on every node, GPU nodes included (its chart tolerates every
# NoSchedule taint); the program gives it these requests so that the pools' sizing can count them.
NODE_EXPORTER_RESOURCES = {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "128Mi"}}
JOB_LABEL = "gpugate.dev/job"
DCGM_PORT = 9400

# Object names inside the namespace.
VLLM = "vllm"
GATEWAY = "gateway"
GATEWAY_METRICS = "gateway-metrics"
DCGM = "dcgm-exporter"
DEVICE_PLUGIN = "nvidia-device-plugin"
CADDY_CONFIG = "gpugate-caddy"
RUNTIME_ENV = "gpugate-runtime-env"
TLS_SECRET = "gpugate-tls"  # written by cert-manager (kubernetes.io/tls: tls.crt, tls.key), never by the program
SECRET_INTERNAL = "gpugate-internal"  # vLLM's internal key and the prober's client key
SECRET_KEYS = "gpugate-keys"  # the client key store; operators own its contents after creation
SECRET_ALERT = "gpugate-alert-credential"
SECRET_HF = "gpugate-hf-token"  # only when the stack holds gpugate:hf_token
SECRET_LIMITS = "gpugate-limits-auth"  # the shared limits store's password: authz's file and Redis's requirepass
LIMITS = "gpugate-limits"  # the Redis every proxy replica's authz shares for limits and spend (limitstore.py)
LIMITS_PORT = 6379
LIMITS_PASSWORD_ITEM = "password"
LIMITS_CONF_ITEM = "redis.conf"
LIMITS_AUTH_DIR = Path("/etc/gpugate/limits")
KEY_STORE_FILE = "keys.json"
VLLM_KEY_ITEM = "vllm_api_key"
PROBER_KEY_ITEM = "prober_api_key"
ALERT_ITEM = "credential"
HF_TOKEN_ITEM = "token"
HF_TOKEN_SECRET = "hf_token"  # the stack's Pulumi config secret (gpugate:hf_token)

# Where the pods find what the VM gets from user-data.
KEYS_DIR = Path("/etc/gpugate/keys")
CADDYFILE_PATH = Path(str(LAYOUT.etc)) / "caddy" / "Caddyfile"
ENV_FILE_PATH = Path(str(LAYOUT.runtime_env))
# Where Caddy reads the certificate cert-manager issued (tls mode acme): `tls <cert> <key>`.
TLS_DIR = Path("/etc/gpugate/tls")
TLS_FILES = (TLS_DIR / "tls.crt", TLS_DIR / "tls.key")
# Caddy's dynamic upstreams re-resolve vLLM's pods this often: a new replica takes traffic this soon.
UPSTREAM_REFRESH = "5s"
# After a pod is marked for deletion, Services and Caddy's DNS view drop it within this time.
ENDPOINT_PROPAGATION_SECONDS = 15
# Startup budget: a cold start downloads the weights, loads them and captures CUDA graphs.
STARTUP_BASE_SECONDS = 300
DOWNLOAD_SECONDS_PER_GIB = 20  # ~50 MiB/s from the model hub, a cautious figure
PROBE_PERIOD_SECONDS = 10
GIB = 1 << 30

PLACEHOLDER = "(secret: set by pulumi up, never rendered)"


def labels(component: str, stack: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": component,
        "app.kubernetes.io/part-of": PART_OF,
        "gpugate.dev/stack": stack,
    }


def selector(component: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": component, "app.kubernetes.io/part-of": PART_OF}


def meta(name: str, namespace: str | None, labels: dict[str, str], **extra: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "labels": labels}
    if namespace is not None:
        meta["namespace"] = namespace
    meta.update(extra)
    return meta


def restricted(read_only: bool = True) -> dict[str, Any]:
    """A container's security context under the `restricted` Pod Security Standard."""
    return {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "readOnlyRootFilesystem": read_only,
        "runAsNonRoot": True,
    }


def resources(cpu: str, memory: str, cpu_limit: str, memory_limit: str, **extra_limits: Any) -> dict[str, Any]:
    return {
        "requests": {"cpu": cpu, "memory": memory, **extra_limits},
        "limits": {"cpu": cpu_limit, "memory": memory_limit, **extra_limits},
    }


def exec_http_probe(url: str) -> list[str]:
    """A probe for a service that listens on loopback only (the kubelet probes the pod address)."""
    return [str(VM_RUNTIME_PYTHON), "-c", f"import urllib.request; urllib.request.urlopen({url!r}, timeout=3)"]


def object_path(obj: Mapping[str, Any]) -> str:
    """`kubernetes/<namespace>/<kind>-<name>.yaml`; cluster-wide objects under `kubernetes/cluster/`."""
    meta = obj["metadata"]
    return f"{MANIFEST_DIR}/{meta.get('namespace', 'cluster')}/{obj['kind'].lower()}-{meta['name']}.yaml"



def tcp(port: int) -> dict[str, Any]:
    return {"port": port, "protocol": "TCP"}


def network_policy(name: str, namespace: str, stack: str, pods: dict[str, Any], ingress: list[dict[str, Any]]) -> dict[str, Any]:
    """Who may reach `pods` (a pod selector), and on which ports; anything else is dropped by default-deny."""
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": meta(name, namespace, labels(name, stack)),
        "spec": {"podSelector": pods, "policyTypes": ["Ingress"], "ingress": ingress},
    }


def disruption_budget(name: str, namespace: str, stack: str) -> dict[str, Any]:
    """A node drain or upgrade takes one pod of `name` at a time, each after its own drain."""
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": meta(name, namespace, labels(name, stack)),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector(name)}},
    }

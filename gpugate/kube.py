"""Every Kubernetes object of a stack's gateway, built as data from the spec and its bundle: Pulumi creates them, `gpugate render` writes them."""

from __future__ import annotations

import hashlib
import math
import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpugate_runtime.contract import metrics as m
from gpugate_runtime.contract.host import CADDY_GO_ENV, ENV_VLLM_KEY, VM_LAYOUT, HostLayout, Ports
from gpugate_runtime.launcher import VLLM_API_KEY_ENV, vllm_args

from gpugate.alerts import rule_groups
from gpugate.catalog import DTYPE_BYTES, MODELS, QUANT_WEIGHT_BYTES
from gpugate.spec import GatewaySpec, KubernetesSpec, Target
from gpugate.stackfile import Stack

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
PROMETHEUS_URL = f"http://kube-prometheus-stack-prometheus.{MONITORING_NAMESPACE}.svc:9090"
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
CERTS_PVC = "gpugate-caddy-certs"
SECRET_INTERNAL = "gpugate-internal"  # vLLM's internal key and the prober's client key
SECRET_KEYS = "gpugate-keys"  # the client key store; operators own its contents after creation
SECRET_ALERT = "gpugate-alert-credential"
KEY_STORE_FILE = "keys.json"
VLLM_KEY_ITEM = "vllm_api_key"
PROBER_KEY_ITEM = "prober_api_key"
ALERT_ITEM = "credential"

# Where the pods find what the VM gets from user-data.
KEYS_DIR = Path("/etc/gpugate/keys")
CADDYFILE_PATH = Path(str(LAYOUT.etc)) / "caddy" / "Caddyfile"
ENV_FILE_PATH = Path(str(LAYOUT.runtime_env))
# certmagic's file storage: these directories are shared by every proxy replica (issuance locks,
# challenge tokens, certificates); the storage root itself stays per pod (Caddy's admin socket).
SHARED_CERT_DIRS = ("acme", "certificates", "locks", "ocsp")
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


@dataclass(frozen=True)
class ClusterFacts:
    """What the cluster component tells the workloads: the LoadBalancer's fixed address and any
    provider-specific Service annotations. Values may be Pulumi Outputs, or placeholders when rendering."""

    provider: str
    load_balancer_ip: Any = None
    service_annotations: Mapping[str, Any] = field(default_factory=dict)


def placeholder_facts(kube: KubernetesSpec) -> ClusterFacts:
    """The facts as a render shows them: the address the program reserves is only known at `pulumi up`."""
    if kube.provider == "gke":
        return ClusterFacts("gke", load_balancer_ip="0.0.0.0")  # replaced by the reserved regional address
    if kube.provider == "eks":
        return ClusterFacts("eks", service_annotations=eks_service_annotations("(elastic IP allocations)"))
    return ClusterFacts("existing")


def eks_service_annotations(eip_allocations: Any) -> dict[str, Any]:
    """The in-tree AWS cloud provider's NLB, on the program's Elastic IPs (one per subnet)."""
    return {
        "service.beta.kubernetes.io/aws-load-balancer-type": "nlb",
        "service.beta.kubernetes.io/aws-load-balancer-eip-allocations": eip_allocations,
        "service.beta.kubernetes.io/aws-load-balancer-cross-zone-load-balancing-enabled": "true",
    }


# ---- sizes derived from the spec ------------------------------------------------------------


def weight_gib(spec: GatewaySpec) -> float:
    facts = MODELS[spec.model.id]
    per_param = QUANT_WEIGHT_BYTES.get(spec.model.quantization) or DTYPE_BYTES.get(spec.model.dtype, 2)
    return facts.num_params * per_param / GIB


def model_cache_gib(spec: GatewaySpec) -> int:
    """The model cache volume: the weights as downloaded, plus room for the tokenizer and a partial re-download."""
    return math.ceil(weight_gib(spec) * 1.2) + 5


def gpu_node_disk_gib(spec: GatewaySpec) -> int:
    """Boot disk of a GPU node: the image layers (vLLM's is ~10 GiB compressed) and the model cache."""
    return max(100, model_cache_gib(spec) + 80)


def startup_budget_seconds(spec: GatewaySpec) -> int:
    """How long a vLLM pod may take to answer /health after it starts: download, load, warm-up."""
    budget = STARTUP_BASE_SECONDS + DOWNLOAD_SECONDS_PER_GIB * math.ceil(weight_gib(spec))
    return min(3600, math.ceil(budget / PROBE_PERIOD_SECONDS) * PROBE_PERIOD_SECONDS)


def shm_gib(spec: GatewaySpec) -> int:
    """/dev/shm for vLLM: PyTorch's data path, and NCCL between tensor-parallel ranks."""
    return 2 if spec.tensor_parallel_size == 1 else 4 * spec.tensor_parallel_size


def vllm_memory_gib(spec: GatewaySpec) -> int:
    """Host memory vLLM needs: the weights pass through it on load, plus Python, CUDA and /dev/shm."""
    return math.ceil(weight_gib(spec)) + 6 + shm_gib(spec)


def gpu_node_max(kube: KubernetesSpec) -> int:
    """The GPU pool's ceiling: one node per replica at most, plus one for a rolling update's surge pod."""
    return kube.replicas.max + 1


# ---- the Caddyfile in a pod -----------------------------------------------------------------


class CaddyfileMismatch(ValueError):
    """The bundle's Caddyfile no longer has the lines the pod adaptation rewrites."""


def _replace_exact(text: str, old: str, new: str, count: int) -> str:
    found = text.count(old)
    if found != count:
        raise CaddyfileMismatch(
            f"the Caddyfile has {found} occurrence(s) of {old!r}, the Kubernetes adaptation expects {count}; "
            "update gpugate/kube.py pod_caddyfile with the template"
        )
    return text.replace(old, new)


def vllm_host(kube: KubernetesSpec) -> str:
    """vLLM's headless Service: its DNS name resolves to every ready vLLM pod."""
    return f"{VLLM}.{kube.namespace}.svc.cluster.local"


def pod_caddyfile(caddyfile: str, spec: GatewaySpec, ports: Ports) -> str:
    """The bundle's Caddyfile as the proxy pods run it. Two things differ from a VM, both rewritten
    here from exact lines of the template (a template change that moves them fails loudly):

    - vLLM is not on loopback but behind a headless Service: Caddy resolves its pods every
      UPSTREAM_REFRESH and sends each request to the least busy one, so a new replica takes
      traffic at once (a ClusterIP would keep reusing old connections), and retries a pod that
      just left for up to 5 s.
    - the metrics site listens on the pod address, not loopback, so Prometheus can scrape it, and
      it also serves authz's and the prober's loopback /metrics under /authz and /prober.
    """
    assert spec.kubernetes is not None
    upstream = (
        "reverse_proxy {\n"
        f"\t\t\tdynamic a {vllm_host(spec.kubernetes)} {ports.vllm} {{\n"
        f"\t\t\t\trefresh {UPSTREAM_REFRESH}\n"
        "\t\t\t}\n"
        "\t\t\tlb_policy least_conn\n"
        "\t\t\tlb_try_duration 5s"
    )
    text = _replace_exact(caddyfile, f"reverse_proxy 127.0.0.1:{ports.vllm} {{", upstream, 2)
    metrics = (
        f"http://:{ports.caddy_metrics} {{\n"
        "\thandle /authz/metrics {\n"
        "\t\trewrite * /metrics\n"
        f"\t\treverse_proxy 127.0.0.1:{ports.authz}\n"
        "\t}\n"
        "\thandle /prober/metrics {\n"
        "\t\trewrite * /metrics\n"
        f"\t\treverse_proxy 127.0.0.1:{ports.prober}\n"
        "\t}"
    )
    return _replace_exact(text, f"http://127.0.0.1:{ports.caddy_metrics} {{\n\tbind 127.0.0.1", metrics, 1)


def pod_settings(spec: GatewaySpec, ports: Ports) -> dict[str, str]:
    """The runtime services' environment in the proxy pod, built and checked with their own settings models."""
    from gpugate.render import runtime_services, settings_env  # noqa: PLC0415 - render imports this module

    assert spec.kubernetes is not None
    services = runtime_services(
        spec,
        ports,
        key_store=KEYS_DIR / KEY_STORE_FILE,
        # Decisions go to the container log (rotated by the kubelet); Caddy's access log is a file authz tails.
        authz_log="/dev/stdout",
        access_log=LAYOUT.logs / "access.log",
        vllm_health_url=f"http://{vllm_host(spec.kubernetes)}:{ports.vllm}/health",
        prober_key_file=LAYOUT.secrets / PROBER_KEY_ITEM,
        ca_file=None,
        expect_gpu=False,  # the prober runs beside the proxy; GPU metrics come from the DCGM exporter
        alert_log=LAYOUT.alert_log,
    )
    return settings_env(services)


def env_file(settings: Mapping[str, str], header: str) -> str:
    lines = [f"# {header}", "# Settings of the runtime services in the proxy pod. No secrets: those are mounted files."]
    lines += [f"{name}={settings[name]}" for name in sorted(settings)]
    return "\n".join(lines) + "\n"


# ---- objects --------------------------------------------------------------------------------


def _labels(component: str, stack: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": component,
        "app.kubernetes.io/part-of": PART_OF,
        "gpugate.dev/stack": stack,
    }


def _selector(component: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": component, "app.kubernetes.io/part-of": PART_OF}


def _meta(name: str, namespace: str | None, labels: dict[str, str], **extra: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "labels": labels}
    if namespace is not None:
        meta["namespace"] = namespace
    meta.update(extra)
    return meta


def _restricted(read_only: bool = True) -> dict[str, Any]:
    """A container's security context under the `restricted` Pod Security Standard."""
    return {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "readOnlyRootFilesystem": read_only,
        "runAsNonRoot": True,
    }


def _resources(cpu: str, memory: str, cpu_limit: str, memory_limit: str, **extra_limits: Any) -> dict[str, Any]:
    return {
        "requests": {"cpu": cpu, "memory": memory, **extra_limits},
        "limits": {"cpu": cpu_limit, "memory": memory_limit, **extra_limits},
    }


def _exec_http_probe(url: str) -> list[str]:
    """A probe for a service that listens on loopback only (the kubelet probes the pod address)."""
    return ["python", "-c", f"import urllib.request; urllib.request.urlopen({url!r}, timeout=3)"]


def drain_script(port: int, drain_seconds: int, settle_seconds: int = ENDPOINT_PROPAGATION_SECONDS) -> str:
    """vLLM's preStop (Python, run by the image's python3): wait until its endpoint is gone
    everywhere, then until it runs and queues nothing (or the drain budget is spent), so the
    SIGTERM that follows never cuts a stream."""
    busy = (m.VLLM_RUNNING, m.VLLM_WAITING)
    return (
        "import time, urllib.request\n"
        f"time.sleep({settle_seconds})\n"
        f"deadline = time.monotonic() + {drain_seconds - settle_seconds}\n"
        "while time.monotonic() < deadline:\n"
        "    try:\n"
        f"        text = urllib.request.urlopen('http://127.0.0.1:{port}/metrics', timeout=3).read().decode()\n"
        "    except OSError:\n"
        "        break\n"
        f"    busy = sum(float(l.rsplit(' ', 1)[1]) for l in text.splitlines() if l.startswith({busy!r}))\n"
        "    if busy == 0:\n"
        "        break\n"
        "    time.sleep(2)\n"
    )


@dataclass(frozen=True)
class Build:
    """Inputs of one build of the objects."""

    stack: str
    spec: GatewaySpec
    caddyfile: str  # the bundle's Caddyfile, before the pod adaptation
    header: str
    facts: ClusterFacts
    secrets: Mapping[str, Mapping[str, Any]]  # Secret name -> item -> value (Outputs, or placeholders)
    dashboards: Mapping[str, bytes] = field(default_factory=dict)

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


def secret_names(spec: GatewaySpec) -> dict[str, tuple[str, ...]]:
    """Secret name -> its items, for this stack."""
    names = {SECRET_INTERNAL: (VLLM_KEY_ITEM, PROBER_KEY_ITEM), SECRET_KEYS: (KEY_STORE_FILE,)}
    if spec.alerts.needs_credential:
        names[SECRET_ALERT] = (ALERT_ITEM,)
    return names


def placeholder_secrets(spec: GatewaySpec) -> dict[str, dict[str, str]]:
    return {name: {item: PLACEHOLDER for item in items} for name, items in secret_names(spec).items()}


def objects(build: Build) -> list[dict[str, Any]]:
    """Every object, namespaces first: what `pulumi up` applies and `gpugate render` writes."""
    b = build
    out: list[dict[str, Any]] = [*_namespaces(b), *_secrets(b), *_config(b), _certs_pvc(b)]
    out += [*_service_accounts(b), _vllm_deployment(b), _gateway_deployment(b), *_services(b)]
    out += [*_pdbs(b), *_network_policies(b), _scaled_object(b)]
    out += [*_gpu_daemons(b), *_monitoring(b)]
    return out


def _namespaces(b: Build) -> list[dict[str, Any]]:
    def namespace(name: str, level: str) -> dict[str, Any]:
        labels = {
            **_labels(name, b.stack),
            "pod-security.kubernetes.io/enforce": level,
            "pod-security.kubernetes.io/enforce-version": "latest",
        }
        return {"apiVersion": "v1", "kind": "Namespace", "metadata": _meta(name, None, labels)}

    # The GPU daemons read the node's devices and driver: they need a privileged namespace of their own.
    return [namespace(b.ns, "restricted"), namespace(b.gpu_ns, "privileged")]


def _secrets(b: Build) -> list[dict[str, Any]]:
    out = []
    for name, items in sorted(b.secrets.items()):
        annotations = {}
        if name == SECRET_KEYS:
            annotations["gpugate.dev/owner"] = "operators: created once with the prober's key, then edited by the keys runbook"
        meta = _meta(name, b.ns, _labels(name, b.stack), **({"annotations": annotations} if annotations else {}))
        out.append({"apiVersion": "v1", "kind": "Secret", "metadata": meta, "type": "Opaque", "stringData": dict(items)})
    return out


def _config(b: Build) -> list[dict[str, Any]]:
    caddyfile = pod_caddyfile(b.caddyfile, b.spec, b.ports)
    out = [
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": _meta(CADDY_CONFIG, b.ns, _labels(GATEWAY, b.stack)),
            "data": {"Caddyfile": caddyfile},
        },
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": _meta(RUNTIME_ENV, b.ns, _labels(GATEWAY, b.stack)),
            "data": {"gpugate.env": env_file(pod_settings(b.spec, b.ports), b.header)},
        },
    ]
    for path, data in sorted(b.dashboards.items()):
        name = "gpugate-dashboard-" + Path(path).stem.lower().replace("_", "-")
        labels = {**_labels("grafana-dashboard", b.stack), "grafana_dashboard": "1"}
        out.append(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                # kube-prometheus-stack's Grafana sidecar loads ConfigMaps with this label from every namespace.
                "metadata": _meta(name[:63], MONITORING_NAMESPACE, labels),
                "data": {Path(path).name: data.decode()},
            }
        )
    return out


def cert_storage_class(kube: KubernetesSpec) -> str:
    if kube.cert_storage_class:
        return kube.cert_storage_class
    return {"gke": "standard-rwx", "eks": "efs-sc"}[kube.provider]


def _certs_pvc(b: Build) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": _meta(CERTS_PVC, b.ns, _labels(GATEWAY, b.stack)),
        "spec": {
            # Every proxy replica shares the ACME state, so whichever replica the CA reaches can answer
            # its challenge, and one replica's certificate serves them all (Caddy's clustering model).
            "accessModes": ["ReadWriteMany"],
            "storageClassName": cert_storage_class(b.kube),
            "resources": {"requests": {"storage": f"{b.kube.cert_storage_gib}Gi"}},
        },
    }


def _service_accounts(b: Build) -> list[dict[str, Any]]:
    # No workload talks to the Kubernetes API: no token is mounted.
    return [
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": _meta(name, b.ns, _labels(name, b.stack)),
            "automountServiceAccountToken": False,
        }
        for name in (VLLM, GATEWAY)
    ]


def vllm_container_args(spec: GatewaySpec, ports: Ports) -> list[str]:
    """vLLM's arguments in the pod: the launcher's own, listening on the pod address."""
    from gpugate.render import launch_spec  # noqa: PLC0415 - render imports this module

    launch = launch_spec(spec, ports, LAYOUT).model_copy(update={"host": "0.0.0.0", "model_cache_dir": None})
    return vllm_args(launch)


def _vllm_deployment(b: Build) -> dict[str, Any]:
    spec, kube, ports = b.spec, b.kube, b.ports
    labels = _labels(VLLM, b.stack)
    drain = kube.autoscaling.drain_seconds
    startup = startup_budget_seconds(spec)
    memory = vllm_memory_gib(spec)
    health = {"path": "/health", "port": "http"}
    container = {
        "name": VLLM,
        "image": spec.vllm.image,
        "args": vllm_container_args(spec, ports),
        "ports": [{"name": "http", "containerPort": ports.vllm, "protocol": "TCP"}],
        "env": [
            {"name": VLLM_API_KEY_ENV, "valueFrom": {"secretKeyRef": {"name": SECRET_INTERNAL, "key": VLLM_KEY_ITEM}}},
            {"name": "VLLM_NO_USAGE_STATS", "value": "1"},
            {"name": "HOME", "value": "/home/vllm"},
            {"name": "HF_HOME", "value": "/models/hf"},
            {"name": "PYTHONDONTWRITEBYTECODE", "value": "1"},
        ],
        "resources": _resources(
            "4", f"{memory}Gi", "7", f"{memory}Gi", **{GPU_RESOURCE: str(spec.gpu.count)}
        ),
        "startupProbe": {
            "httpGet": health,
            "periodSeconds": PROBE_PERIOD_SECONDS,
            "timeoutSeconds": 5,
            "failureThreshold": startup // PROBE_PERIOD_SECONDS,
        },
        "readinessProbe": {"httpGet": health, "periodSeconds": 5, "timeoutSeconds": 3, "failureThreshold": 3},
        "livenessProbe": {"httpGet": health, "periodSeconds": 15, "timeoutSeconds": 5, "failureThreshold": 4},
        "lifecycle": {"preStop": {"exec": {"command": ["python3", "-c", drain_script(ports.vllm, drain)]}}},
        "securityContext": {**_restricted(), "runAsUser": 1000, "runAsGroup": 1000},
        "volumeMounts": [
            {"name": "model-cache", "mountPath": "/models"},
            {"name": "shm", "mountPath": "/dev/shm"},
            {"name": "home", "mountPath": "/home/vllm"},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(VLLM, b.ns, labels),
        "spec": {
            # KEDA owns the count after creation; the program ignores it on later updates.
            "replicas": kube.replicas.min,
            "selector": {"matchLabels": _selector(VLLM)},
            # A new replica comes up before an old one goes: no capacity is lost in a rollout (the GPU
            # pool keeps one node of headroom above replicas.max for it).
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "serviceAccountName": VLLM,
                    "automountServiceAccountToken": False,
                    "nodeSelector": {POOL_LABEL: GPU_POOL},
                    "tolerations": [{**GPU_TAINT, "operator": "Equal"}],
                    # One replica per GPU node.
                    "affinity": {
                        "podAntiAffinity": {
                            "requiredDuringSchedulingIgnoredDuringExecution": [
                                {"labelSelector": {"matchLabels": _selector(VLLM)}, "topologyKey": "kubernetes.io/hostname"}
                            ]
                        }
                    },
                    "terminationGracePeriodSeconds": drain + 30,
                    "securityContext": {
                        "runAsNonRoot": True,
                        "fsGroup": 1000,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "containers": [container],
                    "volumes": [
                        # The weights survive container restarts (crash, liveness kill) without a re-download.
                        {"name": "model-cache", "emptyDir": {"sizeLimit": f"{model_cache_gib(spec)}Gi"}},
                        {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": f"{shm_gib(spec)}Gi"}},
                        {"name": "home", "emptyDir": {"sizeLimit": "5Gi"}},
                        {"name": "tmp", "emptyDir": {"sizeLimit": "5Gi"}},
                    ],
                },
            },
        },
    }


def _gateway_deployment(b: Build) -> dict[str, Any]:
    spec, kube, ports = b.spec, b.kube, b.ports
    labels = _labels(GATEWAY, b.stack)
    caddyfile = pod_caddyfile(b.caddyfile, spec, ports)
    env_text = env_file(pod_settings(spec, ports), b.header)
    checksum = hashlib.sha256((caddyfile + env_text).encode()).hexdigest()
    storage = str(LAYOUT.caddy_storage)
    env_mount = {"name": "runtime-env", "mountPath": str(ENV_FILE_PATH.parent), "readOnly": True}
    logs_mount = {"name": "logs", "mountPath": str(LAYOUT.logs)}
    runtime_env = [{"name": "GPUGATE_ENV_FILE", "value": str(ENV_FILE_PATH)}]
    caddy = {
        "name": "caddy",
        "image": kube.images.caddy,
        "command": ["caddy", "run", "--config", str(CADDYFILE_PATH), "--adapter", "caddyfile"],
        "ports": [
            {"name": "http", "containerPort": spec.ports.http, "protocol": "TCP"},
            {"name": "https", "containerPort": spec.ports.https, "protocol": "TCP"},
            {"name": "metrics", "containerPort": ports.caddy_metrics, "protocol": "TCP"},
        ],
        "env": [
            {"name": ENV_VLLM_KEY, "valueFrom": {"secretKeyRef": {"name": SECRET_INTERNAL, "key": VLLM_KEY_ITEM}}},
            {"name": "XDG_CONFIG_HOME", "value": "/config"},
            {"name": "XDG_DATA_HOME", "value": "/data"},
            # Go runtime settings (see CADDY_GO_ENV): also keeps Go from sizing itself to the node's cores.
            *({"name": name, "value": value} for name, value in CADDY_GO_ENV.items()),
        ],
        "resources": _resources("500m", "256Mi", "2", "512Mi"),
        "readinessProbe": {"httpGet": {"path": "/metrics", "port": "metrics"}, "periodSeconds": 5},
        "livenessProbe": {"httpGet": {"path": "/metrics", "port": "metrics"}, "periodSeconds": 15, "failureThreshold": 4},
        # Let the load balancer and kube-proxy stop sending new connections before Caddy stops
        # accepting; Caddy then waits for its open streams, within the grace period.
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", str(ENDPOINT_PROPAGATION_SECONDS)]}}},
        "securityContext": {**_restricted(), "runAsUser": 1000, "runAsGroup": 1000},
        "volumeMounts": [
            {"name": "caddyfile", "mountPath": str(CADDYFILE_PATH.parent), "readOnly": True},
            {"name": "caddy-state", "mountPath": storage},
            *[
                {"name": "certs", "mountPath": f"{storage}/{sub}", "subPath": sub}
                for sub in SHARED_CERT_DIRS
            ],
            {"name": "caddy-home", "mountPath": "/config", "subPath": "config"},
            {"name": "caddy-home", "mountPath": "/data", "subPath": "data"},
            logs_mount,
        ],
    }
    authz = {
        "name": "authz",
        "image": kube.images.runtime,
        "command": ["python", "-m", "gpugate_runtime", "authz", "serve"],
        "env": runtime_env,
        "resources": _resources("250m", "128Mi", "1", "256Mi"),
        "readinessProbe": {"exec": {"command": _exec_http_probe(f"http://127.0.0.1:{ports.authz}/metrics")}, "periodSeconds": 10},
        "livenessProbe": {
            "exec": {"command": _exec_http_probe(f"http://127.0.0.1:{ports.authz}/metrics")},
            "periodSeconds": 20,
            "failureThreshold": 3,
        },
        # Caddy's user: Caddy creates its access log 0600 and authz must read it. Nothing else is
        # shared: authz mounts neither the certificates nor the Caddyfile.
        "securityContext": {**_restricted(), "runAsUser": 1000, "runAsGroup": 1000},
        "volumeMounts": [
            env_mount,
            # A projected Secret updates by swapping a symlink: authz's reload sees a new inode.
            {"name": "keys", "mountPath": str(KEYS_DIR), "readOnly": True},
            logs_mount,
        ],
    }
    prober = {
        "name": "prober",
        "image": kube.images.runtime,
        "command": ["python", "-m", "gpugate_runtime", "prober", "serve"],
        "env": runtime_env,
        "resources": _resources("100m", "96Mi", "500m", "192Mi"),
        "livenessProbe": {
            "exec": {"command": _exec_http_probe(f"http://127.0.0.1:{ports.prober}/metrics")},
            "periodSeconds": 30,
            "failureThreshold": 3,
        },
        "securityContext": {**_restricted(), "runAsUser": 1002, "runAsGroup": 1000},
        "volumeMounts": [env_mount, {"name": "internal", "mountPath": str(LAYOUT.secrets), "readOnly": True}],
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(GATEWAY, b.ns, labels),
        "spec": {
            "replicas": kube.proxy_replicas,
            "selector": {"matchLabels": _selector(GATEWAY)},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {
                # A new Caddyfile or env file rolls the pods.
                "metadata": {"labels": labels, "annotations": {"gpugate.dev/config-sha256": checksum}},
                "spec": {
                    "serviceAccountName": GATEWAY,
                    "automountServiceAccountToken": False,
                    "nodeSelector": {POOL_LABEL: SYSTEM_POOL},
                    "topologySpreadConstraints": [
                        {
                            "maxSkew": 1,
                            "topologyKey": "kubernetes.io/hostname",
                            "whenUnsatisfiable": "ScheduleAnyway",
                            "labelSelector": {"matchLabels": _selector(GATEWAY)},
                        }
                    ],
                    # Streams pass through Caddy: it may take as long to drain as vLLM.
                    "terminationGracePeriodSeconds": kube.autoscaling.drain_seconds + 30,
                    "securityContext": {
                        "runAsNonRoot": True,
                        "fsGroup": 1000,
                        "seccompProfile": {"type": "RuntimeDefault"},
                        # Caddy binds 80 and 443 without root or capabilities.
                        "sysctls": [{"name": "net.ipv4.ip_unprivileged_port_start", "value": "0"}],
                    },
                    "containers": [caddy, authz, prober],
                    "volumes": [
                        {"name": "caddyfile", "configMap": {"name": CADDY_CONFIG}},
                        {"name": "runtime-env", "configMap": {"name": RUNTIME_ENV}},
                        {"name": "keys", "secret": {"secretName": SECRET_KEYS, "defaultMode": 0o440}},
                        {
                            "name": "internal",
                            "secret": {"secretName": SECRET_INTERNAL, "items": [{"key": PROBER_KEY_ITEM, "path": PROBER_KEY_ITEM}], "defaultMode": 0o440},
                        },
                        {"name": "certs", "persistentVolumeClaim": {"claimName": CERTS_PVC}},
                        {"name": "caddy-state", "emptyDir": {"sizeLimit": "64Mi"}},
                        {"name": "caddy-home", "emptyDir": {"sizeLimit": "64Mi"}},
                        # Caddy's access log rolls at 100 MiB and keeps 10; authz follows it.
                        {"name": "logs", "emptyDir": {"sizeLimit": "2Gi"}},
                    ],
                },
            },
        },
    }


def _services(b: Build) -> list[dict[str, Any]]:
    ports = b.ports
    public_spec: dict[str, Any] = {
        "type": "LoadBalancer",
        # Client addresses reach Caddy's logs and the per-key limits; only nodes with a proxy pod serve.
        "externalTrafficPolicy": "Local",
        # One client address keeps to one proxy replica, so its per-key limits hold as on a VM.
        "sessionAffinity": "ClientIP",
        "selector": _selector(GATEWAY),
        "ports": [
            {"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"},
            {"name": "https", "port": 443, "targetPort": "https", "protocol": "TCP"},
        ],
    }
    if b.facts.load_balancer_ip is not None:
        public_spec["loadBalancerIP"] = b.facts.load_balancer_ip
    public_meta = _meta(GATEWAY, b.ns, _labels(GATEWAY, b.stack))
    if b.facts.service_annotations:
        public_meta["annotations"] = dict(b.facts.service_annotations)
    return [
        {"apiVersion": "v1", "kind": "Service", "metadata": public_meta, "spec": public_spec},
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": _meta(GATEWAY_METRICS, b.ns, {**_labels(GATEWAY, b.stack), JOB_LABEL: "caddy"}),
            "spec": {
                "type": "ClusterIP",
                "selector": _selector(GATEWAY),
                "ports": [{"name": "metrics", "port": ports.caddy_metrics, "targetPort": "metrics", "protocol": "TCP"}],
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            # Headless: its DNS name lists every ready vLLM pod, for Caddy's dynamic upstreams.
            "metadata": _meta(VLLM, b.ns, {**_labels(VLLM, b.stack), JOB_LABEL: "vllm"}),
            "spec": {
                "clusterIP": "None",
                "selector": _selector(VLLM),
                "ports": [{"name": "http", "port": ports.vllm, "targetPort": "http", "protocol": "TCP"}],
            },
        },
    ]


def _pdbs(b: Build) -> list[dict[str, Any]]:
    return [
        {
            "apiVersion": "policy/v1",
            "kind": "PodDisruptionBudget",
            "metadata": _meta(name, b.ns, _labels(name, b.stack)),
            # A node drain or upgrade takes one pod at a time, each after its own drain.
            "spec": {"maxUnavailable": 1, "selector": {"matchLabels": _selector(name)}},
        }
        for name in (VLLM, GATEWAY)
    ]


def _network_policies(b: Build) -> list[dict[str, Any]]:
    ports = b.ports
    monitoring = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": MONITORING_NAMESPACE}}}

    def policy(name: str, pod: dict[str, Any], ingress: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": _meta(name, b.ns, _labels(name, b.stack)),
            "spec": {"podSelector": pod, "policyTypes": ["Ingress"], "ingress": ingress},
        }

    tcp = lambda port: {"port": port, "protocol": "TCP"}  # noqa: E731
    return [
        # Nothing reaches a pod of the namespace unless a policy below lets it.
        policy("default-deny-ingress", {}, []),
        policy(
            "gateway-public",
            {"matchLabels": _selector(GATEWAY)},
            [
                {"ports": [tcp(b.spec.ports.http), tcp(b.spec.ports.https)]},
                {"from": [monitoring], "ports": [tcp(ports.caddy_metrics)]},
            ],
        ),
        # Only the proxy (and Prometheus, for /metrics) reaches vLLM; authz and the prober listen on
        # the proxy pod's loopback, out of any other pod's reach.
        policy(
            "vllm-from-gateway",
            {"matchLabels": _selector(VLLM)},
            [{"from": [{"podSelector": {"matchLabels": _selector(GATEWAY)}}, monitoring], "ports": [tcp(ports.vllm)]}],
        ),
    ]


def queue_query(b: Build) -> str:
    """Requests waiting in all of this stack's vLLM replicas; KEDA divides it by the replica count."""
    return f'sum({m.VLLM_WAITING}{{namespace="{b.ns}", job="vllm"}})'


def _scaled_object(b: Build) -> dict[str, Any]:
    kube = b.kube
    auto = kube.autoscaling
    return {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": _meta(VLLM, b.ns, _labels(VLLM, b.stack)),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": VLLM},
            "minReplicaCount": kube.replicas.min,
            "maxReplicaCount": kube.replicas.max,
            "pollingInterval": 15,
            "cooldownPeriod": auto.scale_down_stabilization_seconds,
            # Prometheus unreachable three times in a row: hold the ceiling rather than guess low.
            "fallback": {"failureThreshold": 3, "replicas": kube.replicas.max},
            "advanced": {
                "horizontalPodAutoscalerConfig": {
                    "name": VLLM,
                    "behavior": {
                        "scaleUp": {
                            "stabilizationWindowSeconds": 0,
                            "policies": [{"type": "Pods", "value": 2, "periodSeconds": 60}],
                        },
                        "scaleDown": {
                            "stabilizationWindowSeconds": auto.scale_down_stabilization_seconds,
                            "policies": [{"type": "Pods", "value": 1, "periodSeconds": 300}],
                        },
                    },
                }
            },
            "triggers": [
                {
                    "type": "prometheus",
                    "metricType": "AverageValue",
                    "metadata": {
                        "serverAddress": PROMETHEUS_URL,
                        "query": queue_query(b),
                        "threshold": str(auto.waiting_per_replica),
                        "ignoreNullValues": "false",
                    },
                }
            ],
        },
    }


def _daemonset(name: str, namespace: str, stack: str, pod_spec: dict[str, Any]) -> dict[str, Any]:
    """One pod of `name` on every GPU node, replaced node by node on a change."""
    return {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": _meta(name, namespace, _labels(name, stack)),
        "spec": {
            "selector": {"matchLabels": _selector(name)},
            "updateStrategy": {"type": "RollingUpdate"},
            "template": {"metadata": {"labels": _labels(name, stack)}, "spec": pod_spec},
        },
    }


def _gpu_daemons(b: Build) -> list[dict[str, Any]]:
    kube = b.kube
    ns = b.gpu_ns
    gpu_pod = {
        "nodeSelector": {POOL_LABEL: GPU_POOL},
        "tolerations": [{**GPU_TAINT, "operator": "Equal"}],
        "automountServiceAccountToken": False,
        "priorityClassName": "system-node-critical",
    }
    dcgm_env = [{"name": "DCGM_EXPORTER_KUBERNETES", "value": "true"}]
    dcgm_mounts: list[dict[str, Any]] = [{"name": "pod-resources", "mountPath": "/var/lib/kubelet/pod-resources", "readOnly": True}]
    dcgm_volumes: list[dict[str, Any]] = [
        {"name": "pod-resources", "hostPath": {"path": "/var/lib/kubelet/pod-resources", "type": "Directory"}}
    ]
    if kube.provider == "gke":
        # GKE installs the driver under /home/kubernetes/bin/nvidia, outside the container runtime's hooks.
        dcgm_env.append({"name": "LD_LIBRARY_PATH", "value": "/usr/local/nvidia/lib64"})
        dcgm_mounts.append({"name": "nvidia", "mountPath": "/usr/local/nvidia", "readOnly": True})
        dcgm_volumes.append({"name": "nvidia", "hostPath": {"path": "/home/kubernetes/bin/nvidia", "type": "Directory"}})
    else:
        dcgm_env.append({"name": "NVIDIA_VISIBLE_DEVICES", "value": "all"})
    dcgm_labels = {**_labels(DCGM, b.stack), JOB_LABEL: "dcgm"}
    out: list[dict[str, Any]] = [
        _daemonset(
            DCGM,
            ns,
            b.stack,
            {
                **gpu_pod,
                "containers": [
                    {
                        "name": DCGM,
                        "image": kube.images.dcgm_exporter,
                        "env": dcgm_env,
                        "ports": [{"name": "metrics", "containerPort": DCGM_PORT, "protocol": "TCP"}],
                        "resources": _resources("100m", "256Mi", "500m", "512Mi"),
                        "readinessProbe": {"httpGet": {"path": "/health", "port": DCGM_PORT}, "periodSeconds": 15},
                        "livenessProbe": {"httpGet": {"path": "/health", "port": DCGM_PORT}, "periodSeconds": 30},
                        # DCGM profiling metrics need the GPU's performance counters.
                        "securityContext": {"privileged": True, "readOnlyRootFilesystem": False},
                        "volumeMounts": dcgm_mounts,
                    }
                ],
                "volumes": dcgm_volumes,
            },
        ),
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": _meta(DCGM, ns, dcgm_labels),
            "spec": {
                "type": "ClusterIP",
                "selector": _selector(DCGM),
                "ports": [{"name": "metrics", "port": DCGM_PORT, "targetPort": "metrics", "protocol": "TCP"}],
            },
        },
    ]
    if kube.provider == "eks":
        out.append(
            _daemonset(
                DEVICE_PLUGIN,
                ns,
                b.stack,
                {
                    **gpu_pod,
                    "containers": [
                        {
                            "name": DEVICE_PLUGIN,
                            "image": kube.images.device_plugin,
                            "env": [{"name": "FAIL_ON_INIT_ERROR", "value": "false"}],
                            "resources": _resources("50m", "64Mi", "200m", "128Mi"),
                            "securityContext": {
                                "allowPrivilegeEscalation": False,
                                "capabilities": {"drop": ["ALL"]},
                                "readOnlyRootFilesystem": True,
                            },
                            "volumeMounts": [{"name": "device-plugin", "mountPath": "/var/lib/kubelet/device-plugins"}],
                        }
                    ],
                    "volumes": [
                        {"name": "device-plugin", "hostPath": {"path": "/var/lib/kubelet/device-plugins", "type": "Directory"}}
                    ],
                },
            )
        )
    return out


def _monitoring(b: Build) -> list[dict[str, Any]]:
    release = {"release": b.kube.prometheus_release}

    def job(name: str) -> list[dict[str, Any]]:
        # The alert rules select by job, as on a VM (`up{job="vllm"}`).
        return [{"targetLabel": "job", "replacement": name, "action": "replace"}]

    def monitor(name: str, namespace: str, selector: dict[str, str], endpoints: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "apiVersion": "monitoring.coreos.com/v1",
            "kind": "ServiceMonitor",
            "metadata": _meta(name, namespace, {**_labels(name, b.stack), **release}),
            "spec": {"selector": {"matchLabels": selector}, "endpoints": endpoints},
        }

    metrics_port = "metrics"
    # A vLLM pod spends minutes starting (weights, warm-up) with no /metrics yet: scraping it then
    # would page VllmDown on every scale-up. Only ready pods are scraped; a replica that stops
    # answering leaves the endpoints and Caddy's rotation, and what clients feel is caught by the
    # prober and the error-budget alerts.
    ready_only = [{"sourceLabels": ["__meta_kubernetes_endpoint_ready"], "regex": "true", "action": "keep"}]
    out = [
        monitor(
            VLLM,
            b.ns,
            {JOB_LABEL: "vllm"},
            [{"port": "http", "path": "/metrics", "interval": "15s", "relabelings": ready_only + job("vllm")}],
        ),
        monitor(
            GATEWAY,
            b.ns,
            {JOB_LABEL: "caddy"},
            [
                {"port": metrics_port, "path": "/metrics", "interval": "15s", "relabelings": job("caddy")},
                {"port": metrics_port, "path": "/authz/metrics", "interval": "15s", "relabelings": job("authz")},
                {"port": metrics_port, "path": "/prober/metrics", "interval": "15s", "relabelings": job("prober")},
            ],
        ),
        monitor(DCGM, b.gpu_ns, {JOB_LABEL: "dcgm"}, [{"port": metrics_port, "path": "/metrics", "interval": "15s", "relabelings": job("dcgm")}]),
        {
            "apiVersion": "monitoring.coreos.com/v1",
            "kind": "PrometheusRule",
            "metadata": _meta("gpugate", b.ns, {**_labels("gpugate", b.stack), **release}),
            "spec": rule_groups(b.spec),
        },
    ]
    receiver = _alert_receiver(b)
    if receiver is not None:
        out.append(
            {
                "apiVersion": "monitoring.coreos.com/v1alpha1",
                "kind": "AlertmanagerConfig",
                "metadata": _meta("gpugate", b.ns, {**_labels("gpugate", b.stack), **release}),
                "spec": {
                    "route": {
                        "receiver": "gateway",
                        "groupBy": ["alertname", "severity"],
                        "groupWait": "30s",
                        "groupInterval": "5m",
                        "repeatInterval": b.spec.alerts.repeat_interval,
                    },
                    "receivers": [receiver],
                },
            }
        )
    return out


def _alert_receiver(b: Build) -> dict[str, Any] | None:
    """The stack's alert channel as an AlertmanagerConfig receiver; its credential stays in a Secret."""
    channel = b.spec.alerts.channel
    ref = {"name": SECRET_ALERT, "key": ALERT_ITEM}
    if channel.kind == "slack":
        return {"name": "gateway", "slackConfigs": [{"apiURL": ref, "channel": channel.channel, "sendResolved": True}]}
    if channel.kind == "pagerduty":
        return {
            "name": "gateway",
            "pagerdutyConfigs": [
                {
                    "routingKey": ref,
                    "sendResolved": True,
                    "severity": '{{ if eq .CommonLabels.severity "page" }}critical{{ else }}warning{{ end }}',
                }
            ],
        }
    if channel.kind == "email":
        return {
            "name": "gateway",
            "emailConfigs": [
                {
                    "to": channel.to,
                    "from": channel.sender,
                    "smarthost": channel.smarthost,
                    "authUsername": channel.sender,
                    "authPassword": ref,
                    "sendResolved": True,
                }
            ],
        }
    if channel.kind == "webhook":
        config: dict[str, Any] = {"url": str(channel.url), "sendResolved": True}
        if channel.bearer_token:
            config["httpConfig"] = {"authorization": {"type": "Bearer", "credentials": ref}}
        return {"name": "gateway", "webhookConfigs": [config]}
    return None


# ---- rendering ------------------------------------------------------------------------------


def object_path(obj: Mapping[str, Any]) -> str:
    """`kubernetes/<namespace>/<kind>-<name>.yaml`; cluster-wide objects under `kubernetes/cluster/`."""
    meta = obj["metadata"]
    return f"{MANIFEST_DIR}/{meta.get('namespace', 'cluster')}/{obj['kind'].lower()}-{meta['name']}.yaml"


def pod_build(stack: Stack, facts: ClusterFacts | None = None, secrets: Mapping[str, Mapping[str, Any]] | None = None) -> Build:
    """The build of a stack's objects: its bundle rendered for the pods' layout, and the cluster's
    facts and secret values (placeholders unless given)."""
    from gpugate.render import render_bundle  # noqa: PLC0415 - render imports this module

    return _build(stack, render_bundle(stack, layout=LAYOUT).files, facts, secrets)


def _build(
    stack: Stack,
    files: Mapping[str, bytes],
    facts: ClusterFacts | None,
    secrets: Mapping[str, Mapping[str, Any]] | None,
) -> Build:
    spec = stack.spec
    if spec.target is not Target.KUBERNETES or spec.kubernetes is None:
        raise ValueError(f"stack {stack.name} targets {spec.target}, not kubernetes")
    return Build(
        stack=stack.name,
        spec=spec,
        caddyfile=files["caddy/Caddyfile"].decode(),
        header=_header(files["caddy/Caddyfile"]),
        facts=facts or placeholder_facts(spec.kubernetes),
        secrets=secrets if secrets is not None else placeholder_secrets(spec),
        dashboards=dashboards(spec, stack.name),
    )


def _header(caddyfile: bytes) -> str:
    return caddyfile.decode().splitlines()[0].removeprefix("# ")


def manifest_files(stack: Stack, layout: HostLayout, files: Mapping[str, bytes]) -> dict[str, bytes]:
    """Every object as the program would create it, one YAML file each, for review and diffs; {} for
    other targets. Secret values and the addresses only the cloud knows are placeholders. The pods
    always use the VM layout: a bundle rendered under another root (validation) renders it again."""
    from gpugate.render import dump_yaml  # noqa: PLC0415 - render imports this module

    spec = stack.spec
    if spec.target is not Target.KUBERNETES or spec.kubernetes is None:
        return {}
    build = _build(stack, files, None, None) if layout == LAYOUT else pod_build(stack)
    header = f"{build.header} (Kubernetes {spec.kubernetes.version})"
    out: dict[str, bytes] = {}
    for obj in objects(build):
        path = object_path(obj)
        if path in out:
            raise ValueError(f"two Kubernetes objects would be written to {path}")
        out[path] = dump_yaml(obj, header)
    return out


# ---- validation -----------------------------------------------------------------------------

_VERSION_IN_HEADER = re.compile(r"\(Kubernetes (1\.[0-9]+)\)")


def _custom_models() -> dict[tuple[str, str], Any]:
    """Models generated from the CRDs of KEDA and prometheus-operator (cloudcoil), by (apiVersion, kind)."""
    from cloudcoil.models.keda.v1alpha1 import ScaledObject  # noqa: PLC0415 - slow import, validation only
    from cloudcoil.models.prometheus_operator.v1 import PrometheusRule, ServiceMonitor  # noqa: PLC0415
    from cloudcoil.models.prometheus_operator.v1alpha1 import AlertmanagerConfig  # noqa: PLC0415

    return {
        ("keda.sh/v1alpha1", "ScaledObject"): ScaledObject,
        ("monitoring.coreos.com/v1", "PrometheusRule"): PrometheusRule,
        ("monitoring.coreos.com/v1", "ServiceMonitor"): ServiceMonitor,
        ("monitoring.coreos.com/v1alpha1", "AlertmanagerConfig"): AlertmanagerConfig,
    }


def _unknown_fields(given: Any, kept: Any, path: str = "") -> list[str]:
    """Paths in `given` that a model dropped (a field its schema does not have)."""
    if isinstance(given, Mapping) and isinstance(kept, Mapping):
        return [p for key, value in given.items() for p in (
            [f"{path}.{key}"] if key not in kept else _unknown_fields(value, kept[key], f"{path}.{key}")
        )]
    if isinstance(given, list) and isinstance(kept, list):
        return [p for i, (a, b) in enumerate(zip(given, kept, strict=False)) for p in _unknown_fields(a, b, f"{path}[{i}]")]
    return []


def check_object(obj: Mapping[str, Any], version: str) -> list[str]:
    """Problems of one object against the API schemas of Kubernetes `version` (kubernetes-validate,
    strict: unknown fields are errors), or for KEDA's and prometheus-operator's kinds their CRDs' models."""
    import kubernetes_validate  # noqa: PLC0415 - validation only

    key = (obj.get("apiVersion"), obj.get("kind"))
    model = _custom_models().get(key)  # type: ignore[arg-type]
    if model is not None:
        from pydantic import ValidationError  # noqa: PLC0415

        try:
            kept = model.model_validate(obj).model_dump(by_alias=True, exclude_unset=True, mode="json")
        except ValidationError as err:
            return [f"{key[1]}: {e['loc']}: {e['msg']}" for e in err.errors()]
        return [f"{key[1]}: unknown field {p}" for p in _unknown_fields(obj, kept)]
    try:
        kubernetes_validate.validate(dict(obj), version, strict=True)
    except kubernetes_validate.SchemaNotFoundError:
        return [f"no Kubernetes {version} schema for {key[0]} {key[1]}"]
    except kubernetes_validate.ValidationError as err:
        where = "/".join(str(p) for p in err.path)
        return [f"{key[1]} {where}: {err.message}"]
    return []


def check_manifest(path: Path, root: Path) -> tuple[bool, str]:
    """A rendered `kubernetes/*.yaml`: one object, checked for the cluster version its header names."""
    from ruamel.yaml import YAML  # noqa: PLC0415

    text = path.read_text()
    found = _VERSION_IN_HEADER.search(text.split("\n", 1)[0])
    if found is None:
        return False, "the header does not name the Kubernetes version the object is for"
    obj = YAML(typ="safe", pure=True).load(text)
    problems = check_object(obj, found.group(1))
    caddyfile = (obj.get("data") or {}).get("Caddyfile") if obj.get("kind") == "ConfigMap" else None
    if caddyfile is not None:
        problems += check_pod_caddyfile(caddyfile, root)
    return not problems, "\n".join(problems)


def check_pod_caddyfile(caddyfile: str, root: Path) -> list[str]:
    """The proxy pods' Caddyfile, as Caddy itself reads it."""
    if shutil.which("caddy") is None:
        return ["caddy is not installed (run ./scripts/test: it installs the validators)"]
    path = root / "pod.Caddyfile"
    path.write_text(caddyfile)
    proc = subprocess.run(
        ["caddy", "validate", "--config", str(path), "--adapter", "caddyfile"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, ENV_VLLM_KEY: "validation-placeholder"},
        cwd=root,
    )
    return [] if proc.returncode == 0 else ["caddy validate: " + "\n".join((proc.stdout + proc.stderr).splitlines()[-6:])]


def dashboards(spec: GatewaySpec, stack_name: str) -> dict[str, bytes]:
    """The on-call dashboards (gpugate/dashboards.py), provisioned as labelled ConfigMaps."""
    try:
        from gpugate.dashboards import dashboard_files  # noqa: PLC0415 - optional until it lands
    except ModuleNotFoundError as err:
        if err.name != "gpugate.dashboards":
            raise  # the module is there but cannot load: say so, never render without it
        return {}
    return dashboard_files(spec, stack_name)

"""The vLLM component: its Deployment, headless Service, disruption budget, NetworkPolicy and KEDA ScaledObject."""

from __future__ import annotations

from typing import Any

from gpugate_runtime.contract import metrics as m
from gpugate_runtime.contract.host import LOOPBACK, Ports
from gpugate_runtime.launcher import VLLM_API_KEY_ENV, vllm_args

from gpugate.catalog import MODELS
from gpugate.kubernetes import objects as k8s
from gpugate.kubernetes.build import Build
from gpugate.kubernetes.objects import (
    ENDPOINT_PROPAGATION_SECONDS,
    GATEWAY,
    GPU_POOL,
    GPU_RESOURCE,
    GPU_TAINT,
    HF_TOKEN_ITEM,
    HF_TOKEN_SECRET,
    JOB_LABEL,
    LAYOUT,
    POOL_LABEL,
    PROBE_PERIOD_SECONDS,
    PROMETHEUS_PEER,
    PROMETHEUS_URL,
    SECRET_HF,
    SECRET_INTERNAL,
    VLLM,
    VLLM_KEY_ITEM,
)
from gpugate.kubernetes.sizing import (
    model_cache_gib,
    shm_gib,
    startup_budget_seconds,
    vllm_memory_gib,
)
from gpugate.render.launch import launch_spec
from gpugate.spec import GatewaySpec

# The vLLM image has no passwd entry for the uid it runs as here: anything that asks getpwuid() (getpass,
# PyTorch's inductor cache default, `~` without HOME) fails. HOME is a writable volume, the user name
# comes from the environment (getpass reads LOGNAME and USER first), and every cache vLLM, PyTorch,
# Triton and CUDA write is placed under HOME explicitly.
VLLM_UID = 1000
VLLM_HOME = "/home/vllm"
VLLM_CACHE = f"{VLLM_HOME}/.cache"
VLLM_ENV = {
    "HOME": VLLM_HOME,
    "USER": "vllm",
    "LOGNAME": "vllm",
    "XDG_CACHE_HOME": VLLM_CACHE,  # vLLM's cache root (torch.compile artefacts), FlashInfer, outlines
    "XDG_CONFIG_HOME": f"{VLLM_HOME}/.config",
    "TORCHINDUCTOR_CACHE_DIR": f"{VLLM_CACHE}/torchinductor",  # else /tmp/torchinductor_<getpass.getuser()>
    "TRITON_CACHE_DIR": f"{VLLM_CACHE}/triton",
    "CUDA_CACHE_PATH": f"{VLLM_CACHE}/nv",  # the driver's JIT cache, else ~/.nv/ComputeCache
}


def vllm_container_args(spec: GatewaySpec, ports: Ports) -> list[str]:
    """vLLM's arguments in the pod: the launcher's own, listening on the pod address."""
    launch = launch_spec(spec, ports, LAYOUT).model_copy(update={"host": "0.0.0.0", "model_cache_dir": None})
    return vllm_args(launch)


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
        f"        text = urllib.request.urlopen('http://{LOOPBACK}:{port}/metrics', timeout=3).read().decode()\n"
        "    except OSError:\n"
        "        break\n"
        f"    busy = sum(float(l.rsplit(' ', 1)[1]) for l in text.splitlines() if l.startswith({busy!r}))\n"
        "    if busy == 0:\n"
        "        break\n"
        "    time.sleep(2)\n"
    )


def hf_token_problem(spec: GatewaySpec, stack: str, secrets: tuple[str, ...]) -> str | None:
    """Why the pods could not download the stack's model: a gated model and no `hf_token` in the stack."""
    if spec.model.source != "huggingface" or not MODELS[spec.model.id].gated or HF_TOKEN_SECRET in secrets:
        return None
    return (
        f"model.id: {spec.model.id} is gated on Hugging Face and the stack holds no {HF_TOKEN_SECRET}: vLLM could not "
        f"download it; run `pulumi config set --secret gpugate:{HF_TOKEN_SECRET} <token> -s {stack}` with a token of an "
        "account that accepted the model's terms"
    )


def _vllm_deployment(b: Build) -> dict[str, Any]:
    spec, kube, ports = b.spec, b.kube, b.ports
    tags = k8s.labels(VLLM, b.stack)
    drain = kube.autoscaling.drain_seconds
    startup = startup_budget_seconds(spec)
    memory = vllm_memory_gib(spec)
    health = {"path": "/health", "port": "http"}
    # The stack's Hugging Face token, when it holds one (gated models; `gpugate plan` refuses one without it).
    hf_token = (
        [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": SECRET_HF, "key": HF_TOKEN_ITEM}}}]
        if SECRET_HF in b.secrets
        else []
    )
    container = {
        "name": VLLM,
        "image": spec.vllm.image,
        "args": vllm_container_args(spec, ports),
        "ports": [{"name": "http", "containerPort": ports.vllm, "protocol": "TCP"}],
        "env": [
            {"name": VLLM_API_KEY_ENV, "valueFrom": {"secretKeyRef": {"name": SECRET_INTERNAL, "key": VLLM_KEY_ITEM}}},
            *hf_token,
            {"name": "VLLM_NO_USAGE_STATS", "value": "1"},
            *({"name": key, "value": value} for key, value in VLLM_ENV.items()),
            {"name": "HF_HOME", "value": "/models/hf"},
            {"name": "PYTHONDONTWRITEBYTECODE", "value": "1"},
        ],
        "resources": k8s.resources(
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
        "securityContext": {**k8s.restricted(), "runAsUser": VLLM_UID, "runAsGroup": VLLM_UID},
        "volumeMounts": [
            {"name": "model-cache", "mountPath": "/models"},
            {"name": "shm", "mountPath": "/dev/shm"},
            {"name": "home", "mountPath": VLLM_HOME},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": k8s.meta(VLLM, b.ns, tags),
        "spec": {
            # KEDA owns the count after creation; the program ignores it on later updates.
            "replicas": kube.replicas.min,
            "selector": {"matchLabels": k8s.selector(VLLM)},
            # A new replica comes up before an old one goes: no capacity is lost in a rollout (the GPU
            # pool keeps one node of headroom above replicas.max for it).
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {
                "metadata": {"labels": tags},
                "spec": {
                    "serviceAccountName": VLLM,
                    "automountServiceAccountToken": False,
                    "nodeSelector": {POOL_LABEL: GPU_POOL},
                    "tolerations": [{**GPU_TAINT, "operator": "Equal"}],
                    # One replica per GPU node.
                    "affinity": {
                        "podAntiAffinity": {
                            "requiredDuringSchedulingIgnoredDuringExecution": [
                                {"labelSelector": {"matchLabels": k8s.selector(VLLM)}, "topologyKey": "kubernetes.io/hostname"}
                            ]
                        }
                    },
                    "terminationGracePeriodSeconds": drain + 30,
                    "securityContext": {
                        "runAsNonRoot": True,
                        "fsGroup": VLLM_UID,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "containers": [container],
                    "volumes": [
                        # The weights survive container restarts (crash, liveness kill) without a re-download.
                        {"name": "model-cache", "emptyDir": {"sizeLimit": f"{model_cache_gib(spec)}Gi"}},
                        {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": f"{shm_gib(spec)}Gi"}},
                        # HOME and the compile caches (inductor, Triton, CUDA JIT, vLLM's torch.compile).
                        {"name": "home", "emptyDir": {"sizeLimit": "10Gi"}},
                        {"name": "tmp", "emptyDir": {"sizeLimit": "5Gi"}},
                    ],
                },
            },
        },
    }


def queue_query(b: Build) -> str:
    """Requests waiting in all of this stack's vLLM replicas; KEDA divides it by the replica count."""
    return f'sum({m.VLLM_WAITING}{{namespace="{b.ns}", job="vllm"}})'


def _scaled_object(b: Build) -> dict[str, Any]:
    kube = b.kube
    auto = kube.autoscaling
    return {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": k8s.meta(VLLM, b.ns, k8s.labels(VLLM, b.stack)),
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



def objects(b: Build) -> list[dict[str, Any]]:
    """Every object of the vLLM component."""
    return [
        _vllm_deployment(b),
        {
            "apiVersion": "v1",
            "kind": "Service",
            # Headless: its DNS name lists every ready vLLM pod, for Caddy's dynamic upstreams.
            "metadata": k8s.meta(VLLM, b.ns, {**k8s.labels(VLLM, b.stack), JOB_LABEL: "vllm"}),
            "spec": {
                "clusterIP": "None",
                "selector": k8s.selector(VLLM),
                "ports": [{"name": "http", "port": b.ports.vllm, "targetPort": "http", "protocol": "TCP"}],
            },
        },
        k8s.disruption_budget(VLLM, b.ns, b.stack),
        # Only the proxy and the Prometheus pods reach vLLM. vLLM checks its key under /v1 only, so
        # /invocations, /tokenize, /score, /pooling and /metrics answer whoever this lets in: not the
        # rest of the monitoring namespace (Grafana, Alertmanager, the operator, anything installed
        # there later). authz and the prober listen on the proxy pod's loopback, out of any other pod's reach.
        k8s.network_policy(
            "vllm-from-gateway",
            b.ns,
            b.stack,
            {"matchLabels": k8s.selector(VLLM)},
            [{"from": [{"podSelector": {"matchLabels": k8s.selector(GATEWAY)}}, PROMETHEUS_PEER], "ports": [k8s.tcp(b.ports.vllm)]}],
        ),
        _scaled_object(b),
    ]

"""The GPU node daemons: NVIDIA's DCGM exporter (GPU metrics) and, on EKS, the device plugin."""

from __future__ import annotations

from typing import Any

from gpugate.kubernetes.build import Build
from gpugate.kubernetes.objects import (
    DCGM,
    DCGM_PORT,
    DEVICE_PLUGIN,
    GPU_POOL,
    GPU_TAINT,
    JOB_LABEL,
    POOL_LABEL,
    labels,
    meta,
    resources,
    selector,
)


def _daemonset(name: str, namespace: str, stack: str, pod_spec: dict[str, Any]) -> dict[str, Any]:
    """One pod of `name` on every GPU node, replaced node by node on a change."""
    return {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": meta(name, namespace, labels(name, stack)),
        "spec": {
            "selector": {"matchLabels": selector(name)},
            "updateStrategy": {"type": "RollingUpdate"},
            "template": {"metadata": {"labels": labels(name, stack)}, "spec": pod_spec},
        },
    }


def objects(b: Build) -> list[dict[str, Any]]:
    """Every object of the GPU node daemons."""
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
    dcgm_labels = {**labels(DCGM, b.stack), JOB_LABEL: "dcgm"}
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
                        "resources": resources("100m", "256Mi", "500m", "512Mi"),
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
            "metadata": meta(DCGM, ns, dcgm_labels),
            "spec": {
                "type": "ClusterIP",
                "selector": selector(DCGM),
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
                            "resources": resources("50m", "64Mi", "200m", "128Mi"),
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


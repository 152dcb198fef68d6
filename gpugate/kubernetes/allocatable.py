"""Whether each pod fits its node pool: a node's allocatable (capacity less the provider's kubelet and system
reservations and eviction threshold) less the DaemonSets that run on every node of the pool."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, computed_field

from gpugate.catalog import MACHINES, MachineFacts, machine, same_gpus
from gpugate.kubernetes.objects import GPU_POOL, NODE_EXPORTER_RESOURCES, POOL_LABEL, SYSTEM_POOL
from gpugate.spec import GatewaySpec

# The system pools' machines (infra/eks.py and infra/gke.py create them).
SYSTEM_MACHINES = {"eks": "m6i.large", "gke": "e2-standard-4"}
CLOUD = {"eks": "aws", "gke": "gcp"}
GIB_MIB = 1024
# Both providers evict below 100 MiB of free memory (kubelet `evictionHard: memory.available<100Mi`).
EVICTION_MIB = 100
# The provider's own DaemonSets on every node, which gpugate's objects do not create: EKS's aws-node
# (VPC CNI with its network policy agent), kube-proxy and the EFS CSI node plugin; GKE's anetd
# (Dataplane V2), fluentbit, gke-metadata-server, netd, the GPU device plugin and the CSI node
# plugins. Their requests change with add-on versions: this is a margin, not a measurement; compare
# it with `kubectl describe node` (Non-terminated Pods) on a live node.
PROVIDER_DAEMONS = {"eks": (300, 512), "gke": (500, 768)}  # (millicores, MiB)
# With install_addons, kube-prometheus-stack's node exporter runs on every node too (objects.NODE_EXPORTER_RESOURCES).


def reserved_cpu_m(vcpus: int) -> int:
    """The kubelet's CPU reservation, the same on EKS and GKE: 6% of the first core, 1% of the second,
    0.5% of the third and fourth, 0.25% of every core above four."""
    tiers = ((1, 60), (1, 10), (2, 5), (max(vcpus - 4, 0), 2.5))
    left, total = vcpus, 0.0
    for cores, per_core in tiers:
        used = min(left, cores)
        total += used * per_core
        left -= used
    return round(total)


def eks_reserved_memory_mib(m: MachineFacts) -> int:
    """EKS (AL2023's nodeadm, as the AL2 bootstrap before it): 11 MiB per pod the node may run, plus 255 MiB.
    amazon-eks-ami, nodeadm/internal/kubelet/config.go (getMemoryMebibytesToReserve); max pods from its
    eni-max-pods.txt (the VPC CNI's limit without prefix delegation)."""
    return 11 * m.max_pods + 255


def gke_reserved_memory_mib(m: MachineFacts) -> int:
    """GKE: 25% of the first 4 GiB, 20% of the next 4, 10% of the next 8, 6% of the next 112, 2% above 128 GiB
    (255 MiB on machines under 1 GiB). https://cloud.google.com/kubernetes-engine/docs/concepts/plan-node-sizes
    (Memory and CPU reservations)."""
    if m.memory_gib < 1:
        return 255
    left, total = m.memory_gib, 0.0
    for size, share in ((4, 0.25), (4, 0.20), (8, 0.10), (112, 0.06), (float("inf"), 0.02)):
        used = min(left, size)
        total += used * share
        left -= used
    return round(total * GIB_MIB)


class Shape(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    cpu_m: int
    memory_mib: int

    def __add__(self, other: Shape) -> Shape:
        return Shape(cpu_m=self.cpu_m + other.cpu_m, memory_mib=self.memory_mib + other.memory_mib)

    def covers(self, other: Shape) -> bool:
        return self.cpu_m >= other.cpu_m and self.memory_mib >= other.memory_mib

    def __str__(self) -> str:
        return f"{self.cpu_m / 1000:g} CPU / {self.memory_mib / GIB_MIB:.2f} GiB"


def allocatable(machine_type: str) -> Shape:
    """What pods may request on one node of `machine_type`: capacity less the kubelet's reservations and the
    eviction threshold, by the formula of the machine's cloud (EKS for AWS, GKE for GCP)."""
    m = MACHINES[machine_type]
    reserved = eks_reserved_memory_mib(m) if m.cloud == "aws" else gke_reserved_memory_mib(m)
    return Shape(
        cpu_m=m.vcpus * 1000 - reserved_cpu_m(m.vcpus),
        memory_mib=round(m.memory_gib * GIB_MIB) - reserved - EVICTION_MIB,
    )


_QUANTITY = re.compile(r"^([0-9.]+)(m|Ki|Mi|Gi|Ti|k|M|G)?$")
_MIB_PER = {
    None: 1 / (1 << 20), "Ki": 1 / 1024, "Mi": 1, "Gi": 1024, "Ti": 1 << 20,
    "k": 1e3 / (1 << 20), "M": 1e6 / (1 << 20), "G": 1e9 / (1 << 20),
}  # fmt: skip


def cpu_millicores(quantity: Any) -> int:
    number, unit = _QUANTITY.match(str(quantity)).groups()  # type: ignore[union-attr]
    return round(float(number) * (1 if unit == "m" else 1000))


def memory_mebibytes(quantity: Any) -> int:
    number, unit = _QUANTITY.match(str(quantity)).groups()  # type: ignore[union-attr]
    return round(float(number) * _MIB_PER[unit])


def pod_requests(pod: Mapping[str, Any]) -> Shape:
    """A pod's requests as the scheduler counts them: its containers' sum, or its largest init container if more."""

    def one(container: Mapping[str, Any]) -> Shape:
        req = (container.get("resources") or {}).get("requests") or {}
        return Shape(cpu_m=cpu_millicores(req.get("cpu", "0")), memory_mib=memory_mebibytes(req.get("memory", "0")))

    total = sum((one(c) for c in pod.get("containers") or []), Shape(cpu_m=0, memory_mib=0))
    for init in pod.get("initContainers") or []:
        first = one(init)
        total = Shape(cpu_m=max(total.cpu_m, first.cpu_m), memory_mib=max(total.memory_mib, first.memory_mib))
    return total


class PodFit(BaseModel):
    """One workload's pod on one node of its pool, next to the pool's DaemonSets."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    pod: str
    pool: str
    machine_type: str
    request: Shape
    daemons: Shape
    allocatable: Shape
    fitting: list[str]

    @computed_field  # type: ignore[prop-decorator]
    @property
    def fits(self) -> bool:
        return self.allocatable.covers(self.request + self.daemons)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def message(self) -> str:
        head = (
            f"the {self.pod} pod requests {self.request} and the {self.pool} pool's DaemonSets {self.daemons}; "
            f"one {self.machine_type} node has {self.allocatable} allocatable"
        )
        if self.fits:
            return head + ": fits"
        return head + f": it cannot be scheduled; machine types that fit: {', '.join(self.fitting) or 'none in the catalog'}"


def gpu_machine(spec: GatewaySpec) -> str | None:
    """The GPU node pool's machine type: the stack's choice, or the catalog's for its GPUs (eks/gke); None for an
    existing cluster that does not name its GPU nodes' type."""
    kube = spec.kubernetes
    assert kube is not None
    if kube.gpu_machine_type is not None:
        return kube.gpu_machine_type
    if kube.provider == "existing":
        return None
    return machine(CLOUD[kube.provider], spec.gpu.type, spec.gpu.count)


def _pool_machines(spec: GatewaySpec) -> dict[str, tuple[str, list[str]]]:
    """pool -> (its machine type, the machine types it could use instead)."""
    kube = spec.kubernetes
    assert kube is not None
    out: dict[str, tuple[str, list[str]]] = {}
    gpu = gpu_machine(spec)
    if gpu is not None:
        out[GPU_POOL] = (gpu, same_gpus(MACHINES[gpu].cloud, spec.gpu.type, spec.gpu.count))
    if kube.provider in SYSTEM_MACHINES:
        system = SYSTEM_MACHINES[kube.provider]
        out[SYSTEM_POOL] = (system, same_gpus(MACHINES[system].cloud, "cpu", 0))
    return out


def _pods(objects: Iterable[Mapping[str, Any]], kind: str) -> list[tuple[str, str, Mapping[str, Any]]]:
    """(name, pool, pod spec) of every `kind` whose pods select a node pool."""
    out = []
    for obj in objects:
        if obj.get("kind") != kind:
            continue
        pod = obj["spec"]["template"]["spec"]
        pool = (pod.get("nodeSelector") or {}).get(POOL_LABEL)
        if pool is not None:
            out.append((obj["metadata"]["name"], pool, pod))
    return out


def node_fits(spec: GatewaySpec, objects: Iterable[Mapping[str, Any]]) -> list[PodFit]:
    """Every Deployment's pod against one node of its pool's machine type, after the pool's DaemonSets
    (gpugate's and the provider's). Pools whose machine type is unknown (an existing cluster that does not
    name it) are not checked."""
    kube = spec.kubernetes
    assert kube is not None
    objects = list(objects)
    machines = _pool_machines(spec)
    if not machines:
        return []
    # An existing cluster's own DaemonSets: those of the provider whose cloud its GPU machine type is of.
    named = kube.provider if kube.provider in CLOUD else {"aws": "eks", "gcp": "gke"}[MACHINES[machines[GPU_POOL][0]].cloud]
    provider = Shape(cpu_m=PROVIDER_DAEMONS[named][0], memory_mib=PROVIDER_DAEMONS[named][1])
    if kube.install_addons:
        provider = provider + pod_requests({"containers": [{"resources": NODE_EXPORTER_RESOURCES}]})
    out = []
    for name, pool, pod in _pods(objects, "Deployment"):
        if pool not in machines:
            continue
        chosen, alternatives = machines[pool]
        daemons = sum(
            (pod_requests(d) for _, p, d in _pods(objects, "DaemonSet") if p == pool),
            provider,
        )
        request = pod_requests(pod)
        fitting = [m for m in alternatives if allocatable(m).covers(request + daemons)]
        out.append(
            PodFit(
                pod=name,
                pool=pool,
                machine_type=chosen,
                request=request,
                daemons=daemons,
                allocatable=allocatable(chosen),
                fitting=fitting,
            )
        )
    return out

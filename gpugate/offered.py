"""Whether the catalog's clouds offer the stack's machine where it asks (region, zone, GPU set): the spec's checks."""

from __future__ import annotations

from typing import Any

from gpugate.catalog import AWS_OFFERINGS, GCP_OFFERINGS, GCP_ZONES, GPUS, MACHINES, same_gpus

# The functions take the GatewaySpec being validated (and its KubernetesSpec); typed as Any because spec.py
# imports this module, and imports run one way.
GatewaySpec = KubernetesSpec = Any


def machine_fits_the_gpus(spec: GatewaySpec, kube: KubernetesSpec) -> None:
    """kubernetes.gpu_machine_type, when chosen, has the stack's GPUs on its provider's cloud."""
    chosen = kube.gpu_machine_type
    if chosen is None:
        return
    clouds = {"eks": ("aws",), "gke": ("gcp",), "existing": ("aws", "gcp")}[kube.provider]
    allowed = [m for cloud in clouds for m in same_gpus(cloud, spec.gpu.type, spec.gpu.count)]
    if chosen not in allowed:
        known = "unknown to gpugate's catalog" if chosen not in MACHINES else "another cloud or GPU set"
        raise ValueError(
            f"kubernetes.gpu_machine_type: {chosen} ({known}) is not a {kube.provider} machine with "
            f"{spec.gpu.count} x {spec.gpu.type}; allowed: {', '.join(allowed) or 'none'}"
        )


def machine_words(spec: GatewaySpec, machine: str) -> str:
    return f"{machine} ({spec.gpu.count} x {spec.gpu.type})" if spec.gpu.count else f"{machine} (no GPU)"


def on_aws(spec: GatewaySpec, machine: str) -> None:
    """The stack's region (and zone) offers the machine on AWS."""
    regions = AWS_OFFERINGS.get(machine, ())
    if spec.region not in regions:
        raise ValueError(
            f"region: {spec.region} does not offer {machine_words(spec, machine)} in gpugate's catalog; allowed: {', '.join(regions)}"
        )
    if spec.zone is not None and not (spec.zone.startswith(spec.region) and len(spec.zone) == len(spec.region) + 1):
        raise ValueError(
            f"zone: {spec.zone} is not an availability zone of {spec.region}; allowed: {spec.region}a, {spec.region}b, ..."
        )


def on_gcp(spec: GatewaySpec, machine: str) -> None:
    """The stack's zone offers the machine on GCP."""
    if spec.region not in GCP_ZONES:
        raise ValueError(f"region: {spec.region} is not a GCP region in gpugate's catalog; allowed: {', '.join(GCP_ZONES)}")
    zones = GCP_ZONES[spec.region]
    if spec.zone not in zones:
        raise ValueError(f"zone: {spec.zone} is not a zone of {spec.region}; allowed: {', '.join(zones)}")
    offered = GCP_OFFERINGS.get(machine, ())
    if spec.zone not in offered:
        here = [z for z in offered if z in zones]
        allowed = ", ".join(here) if here else "none in this region; elsewhere: " + ", ".join(offered)
        raise ValueError(f"zone: {spec.zone} does not offer {machine_words(spec, machine)}; allowed: {allowed}")


def no_machine(spec: GatewaySpec, cloud: str, table: dict[int, str]) -> str:
    """The error for a GPU type or count the cloud has no machine for."""
    if not table:
        return f"gpu.type: {cloud} offers no {spec.gpu.type} machines; allowed on {cloud}: " + ", ".join(
            t for t, f in GPUS.items() if (f.aws_instance_types if cloud == "AWS" else f.gcp_machine_types)
        )
    counts = ", ".join(f"{n} ({t})" for n, t in sorted(table.items()))
    return f"gpu.count: {cloud} has no machine with {spec.gpu.count} x {spec.gpu.type}; allowed: {counts}"

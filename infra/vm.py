"""What both VM gateways (AWS, GCP) are built from: the machine, the user data, and the bundle and secrets the host fetches."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from pathlib import Path

import pulumi
from gpugate_runtime.contract.host import VM_LAYOUT

from gpugate.cache import default_cache_dir
from gpugate.render.bundle import Bundle, sha256
from gpugate.spec import GatewaySpec, Target
from gpugate.stackfile import Stack
from gpugate.vm.bundle import ARCHIVE
from gpugate.vm.delivery import SecretRef, bucket_name, object_key, secrets
from gpugate.vm.userdata import USER_DATA, delivered
from infra.network import IngressRule, public_url
from infra.secrets import host_secrets, missing_provider_keys


# What `pulumi stack output` shows for a VM target; none of it is secret.
OUTPUT_NAMES = ("url", "public_ip", "ssh_host", "ssh_proxy_command", "bundle_sha256")


@dataclass(frozen=True)
class VmGatewayArgs:
    """A VM gateway's inputs, from the stack's rendered bundle: no secret among them."""

    spec: GatewaySpec
    stack: str
    user_data: bytes  # what the cloud receives: the gzipped cloud-config
    bundle_sha256: str
    archive: Path  # the bundle archive the host fetches (a file, so the state keeps only its hash)
    bucket: str
    object_key: str
    secrets: tuple[SecretRef, ...]
    ingress: tuple[IngressRule, ...]

    @classmethod
    def from_bundle(cls, stack: Stack, bundle: Bundle, target: Target, ingress: tuple[IngressRule, ...]) -> VmGatewayArgs:
        if stack.spec.target is not target:
            raise ValueError(f"stack {stack.name} targets {stack.spec.target}, not {target}")
        missing = missing_provider_keys(stack.spec, stack.secrets, stack.name)
        if missing:
            raise ValueError(f"stack {stack.name}: " + "; ".join(missing))
        packed = bundle.files[ARCHIVE]
        digest = sha256(packed)
        path = default_cache_dir() / "bundles" / f"{digest}.tar.gz"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(packed)
            tmp.replace(path)
        return cls(
            spec=stack.spec,
            stack=stack.name,
            user_data=delivered(bundle.files[USER_DATA]),
            bundle_sha256=bundle.bundle_sha256,
            archive=path,
            bucket=bucket_name(stack.spec, stack.name),
            object_key=object_key(digest),
            secrets=secrets(stack.spec, stack.name, VM_LAYOUT),
            ingress=ingress,
        )

    @property
    def user_data_base64(self) -> str:
        return base64.b64encode(self.user_data).decode()


class VmGateway(pulumi.ComponentResource):
    """What every cloud's VM gateway exports (OUTPUT_NAMES; infra/program.py makes them stack outputs)."""

    url: pulumi.Output[str]
    public_ip: pulumi.Output[str]
    ssh_host: pulumi.Output[str]
    ssh_proxy_command: pulumi.Output[str]
    bundle_sha256: pulumi.Output[str]
    vllm_api_key: pulumi.Output[str]  # secret


def register_vm_outputs(
    gateway: VmGateway,
    args: VmGatewayArgs,
    public_ip: pulumi.Output[str],
    instance_ref: pulumi.Output[str],
    tunnel_command: str,
) -> None:
    """A VM gateway's outputs (OUTPUT_NAMES): SSH goes to the public address when the stack
    names admin networks, else through the cloud's tunnel to the instance (`tunnel_command`, with %h for it)."""
    gateway.url = pulumi.Output.from_input(public_url(args.spec))
    gateway.public_ip = public_ip
    gateway.bundle_sha256 = pulumi.Output.from_input(args.bundle_sha256)
    if args.spec.admin_cidrs:
        gateway.ssh_host, gateway.ssh_proxy_command = public_ip, pulumi.Output.from_input("")
    else:
        gateway.ssh_host, gateway.ssh_proxy_command = instance_ref, pulumi.Output.from_input(tunnel_command)
    gateway.register_outputs({name: getattr(gateway, name) for name in OUTPUT_NAMES})


def secret_values(args: VmGatewayArgs, name: str, parent: pulumi.Resource) -> dict[str, pulumi.Output[str]]:
    """Each secret the host fetches, by name, as a Pulumi secret (infra/secrets.py says where each comes from)."""
    values = {s.name: s.value for s in host_secrets(args.spec, name, parent)}
    missing = sorted({ref.name for ref in args.secrets} - set(values))
    if missing:
        raise ValueError(f"no value for the host secret(s) {', '.join(missing)}")
    return values

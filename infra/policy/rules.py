"""The rules that must never break, as pulumi-policy resource validations.

The same policies serve `pulumi up --policy-pack infra/policy` and the offline plan
(`gpugate plan`), which calls each `validate` on the inputs its mocks recorded. Inputs
arrive as the engine sends them to an analyzer: camelCase keys, numbers as floats.

Secretness: under `pulumi up` a validation policy receives secret values already
unwrapped, so it cannot tell a secret user-data from a plain one. The offline plan
hands the policies pulumi-policy's secrets-preserving proxy instead, through which
`secret-user-data` can see whether the user-data is a secret (see README.md).
"""

from __future__ import annotations

import base64
import gzip
import ipaddress
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from gpugate_runtime.contract.host import VM_LAYOUT
from pulumi_policy import (
    EnforcementLevel,
    ReportViolation,
    ResourceValidationArgs,
    ResourceValidationPolicy,
    Secret,
)
from pulumi_policy.secret import secrets_preserving_proxy
from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from gpugate.catalog import GPUS, MACHINES
from gpugate.images import ALLOWED as IMAGE_ALLOWED
from gpugate.images import image_problem

WEB_PORTS = frozenset({80, 443})
SSH_PORT = 22
# "The world", for web-only-from-world: sources that admit more addresses than one IPv4 /8 (16.7M
# addresses, the largest private range, 10.0.0.0/8) or one IPv6 /32 (a whole ISP's allocation).
# Counted over the union of a rule's sources, so 0.0.0.0/1 + 128.0.0.0/1, or 256 /8s, is the world.
WORLD_PREFIX_V4 = 8
WORLD_PREFIX_V6 = 32
# SSH may come from networks of at most this many addresses (a /16), again over the union of a
# rule's sources; wider is the internet in all but name.
MIN_SSH_PREFIX_V4 = 16
MIN_SSH_PREFIX_V6 = 48
SECRET_DIR = f"{VM_LAYOUT.secrets}/"
# How the engine marks a value it does not know yet (during a preview).
UNKNOWN = "04da6b54-80e4-46f7-96ec-b56ff0331ba9"

AWS_INSTANCE = "aws:ec2/instance:Instance"
AWS_LAUNCH_TEMPLATE = "aws:ec2/launchTemplate:LaunchTemplate"
AWS_VOLUME = "aws:ebs/volume:Volume"
AWS_SG = "aws:ec2/securityGroup:SecurityGroup"
AWS_SG_RULE = "aws:ec2/securityGroupRule:SecurityGroupRule"
AWS_SG_INGRESS = "aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule"
GCP_FIREWALL = "gcp:compute/firewall:Firewall"
GCP_INSTANCE = "gcp:compute/instance:Instance"
GKE_CLUSTER = "gcp:container/cluster:Cluster"
GKE_NODE_POOL = "gcp:container/nodePool:NodePool"
EKS_CLUSTER = "aws:eks/cluster:Cluster"
EKS_NODE_GROUP = "aws:eks/nodeGroup:NodeGroup"
K8S_SERVICE = "kubernetes:core/v1:Service"
K8S_SECRET = "kubernetes:core/v1:Secret"
K8S_CONFIG_MAP = "kubernetes:core/v1:ConfigMap"
K8S_WORKLOADS = (
    "kubernetes:apps/v1:Deployment",
    "kubernetes:apps/v1:DaemonSet",
    "kubernetes:apps/v1:StatefulSet",
    "kubernetes:batch/v1:Job",
    "kubernetes:core/v1:Pod",
)
# GPU node pools carry this taint, so that nothing but GPU workloads lands on (and pays for) a GPU node.
GPU_TAINT_KEY = "nvidia.com/gpu"
# Names of settings that hold a secret: they must come from a Secret, never a literal or a ConfigMap.
SECRET_NAME = re.compile(r"(KEY|TOKEN|PASSWORD|PASSWD|SECRET|CREDENTIAL)S?$", re.IGNORECASE)
# GCP machine families whose machines always carry GPUs; EKS AMI types for GPU nodes.
GPU_MACHINE_FAMILIES = ("a2-", "a3-", "a4-", "g2-", "g4-")

# What the offline plan passes as props: pulumi-policy's secrets-preserving proxy. The engine
# passes another proxy whose values come with their secrets already unwrapped.
SECRETS_VISIBLE = type(secrets_preserving_proxy({}))

# The catalog's machine per GPU count, and the larger machines with the same GPUs a node pool may name
# (kubernetes.gpu_machine_type, when a pod outgrows the default: gpugate/kubernetes/allocatable.py).
AWS_INSTANCE_TYPES = frozenset(t for gpu in GPUS.values() for t in gpu.aws_instance_types.values()) | frozenset(
    name for name, m in MACHINES.items() if m.cloud == "aws" and m.gpus
)
GCP_MACHINE_TYPES = frozenset(t for gpu in GPUS.values() for t in gpu.gcp_machine_types.values()) | frozenset(
    name for name, m in MACHINES.items() if m.cloud == "gcp" and m.gpus
)


@dataclass(frozen=True)
class Ingress:
    """One inbound permission, normalised across clouds. ports None means every port."""

    protocol: str  # "tcp", "udp", "icmp", "all", ...
    ports: tuple[int, int] | None
    sources: tuple[str, ...]

    def covers(self, port: int) -> bool:
        if self.protocol not in ("tcp", "all", "-1", "6"):
            return False
        return self.ports is None or self.ports[0] <= port <= self.ports[1]

    def only_web(self) -> bool:
        """True when every port it opens is a web port over TCP."""
        if self.protocol not in ("tcp", "6") or self.ports is None:
            return False
        low, high = self.ports
        return all(port in WEB_PORTS for port in range(low, high + 1))

    def describe(self) -> str:
        ports = (
            "all ports"
            if self.ports is None
            else (f"port {self.ports[0]}" if self.ports[0] == self.ports[1] else f"ports {self.ports[0]}-{self.ports[1]}")
        )
        return f"{self.protocol} {ports} from {', '.join(self.sources)}"


def _known(value: Any) -> bool:
    return value is not None and value != UNKNOWN


def _port_range(protocol: str, low: Any, high: Any) -> tuple[int, int] | None:
    if protocol in ("-1", "all") or not _known(low) or not _known(high):
        return None
    low, high = int(low), int(high)
    if low <= 0 and high >= 65535 or (low == -1 and high == -1):
        return None
    return (max(low, 0), high)


def ingresses(resource_type: str, props: Mapping[str, Any]) -> Iterator[Ingress]:
    """Every inbound permission a resource grants, whatever form its cloud uses."""
    if resource_type == AWS_SG_INGRESS:
        protocol = str(props.get("ipProtocol", "")).lower()
        sources = tuple(s for s in (props.get("cidrIpv4"), props.get("cidrIpv6")) if _known(s))
        if sources:
            yield Ingress(protocol, _port_range(protocol, props.get("fromPort"), props.get("toPort")), sources)
    elif resource_type == AWS_SG_RULE:
        if props.get("type") == "ingress":
            yield from _aws_block(props)
    elif resource_type == AWS_SG:
        for block in props.get("ingress") or []:
            yield from _aws_block(block)
    elif resource_type == K8S_SERVICE:
        spec = props.get("spec") or {}
        if spec.get("type") != "LoadBalancer":
            return
        # A LoadBalancer Service is open to the world unless it names source ranges.
        sources = tuple(spec.get("loadBalancerSourceRanges") or ("0.0.0.0/0",))
        for port in spec.get("ports") or []:
            protocol = str(port.get("protocol") or "TCP").lower()
            if _known(port.get("port")):
                number = int(port["port"])
                yield Ingress(protocol, (number, number), sources)
    elif resource_type == GCP_FIREWALL:
        if str(props.get("direction") or "INGRESS").upper() != "INGRESS" or props.get("disabled"):
            return
        sources = tuple(props.get("sourceRanges") or [])
        if not sources and not props.get("sourceTags") and not props.get("sourceServiceAccounts"):
            sources = ("0.0.0.0/0",)  # GCP's default source for an ingress rule without one
        for allow in props.get("allows") or []:
            protocol = str(allow.get("protocol", "")).lower()
            ports = allow.get("ports") or []
            if not ports:
                yield Ingress(protocol, None, sources)
            for spec in ports:
                low, _, high = str(spec).partition("-")
                yield Ingress(protocol, (int(low), int(high or low)), sources)


def _aws_block(block: Mapping[str, Any]) -> Iterator[Ingress]:
    protocol = str(block.get("protocol", "")).lower()
    sources = tuple(list(block.get("cidrBlocks") or []) + list(block.get("ipv6CidrBlocks") or []))
    if sources:
        yield Ingress(protocol, _port_range(protocol, block.get("fromPort"), block.get("toPort")), sources)


def wider_than(sources: tuple[str, ...], prefix_v4: int, prefix_v6: int) -> bool:
    """True when the sources together admit more addresses than one /prefix_v4 (IPv4) or one
    /prefix_v6 (IPv6) network: overlapping ranges count once, and a source that is not an address
    range (a typo, a placeholder) counts as unbounded; one not known yet (a preview) is judged at `up`."""
    networks: dict[int, list[ipaddress.IPv4Network | ipaddress.IPv6Network]] = {4: [], 6: []}
    for source in sources:
        if not _known(source):
            continue
        try:
            network = ipaddress.ip_network(str(source).strip(), strict=False)
        except ValueError:
            return True
        networks[network.version].append(network)
    bounds = {4: 2 ** (32 - prefix_v4), 6: 2 ** (128 - prefix_v6)}
    return any(
        sum(n.num_addresses for n in ipaddress.collapse_addresses(found)) > bounds[version]  # type: ignore[type-var]
        for version, found in networks.items()
        if found
    )


def is_world(sources: tuple[str, ...]) -> bool:
    """The sources admit the internet at large: more than a /8 of IPv4 or a /32 of IPv6 addresses."""
    return wider_than(sources, WORLD_PREFIX_V4, WORLD_PREFIX_V6)


# ---- the rules ------------------------------------------------------------------------------


def web_only_from_world(args: ResourceValidationArgs, report_violation: ReportViolation) -> None:
    for rule in ingresses(args.resource_type, args.props):
        if is_world(rule.sources) and not rule.only_web():
            report_violation(
                f"{args.name} opens {rule.describe()}: only TCP 80 and 443 may be open to the world "
                f"(sources wider than a /{WORLD_PREFIX_V4} of IPv4 or a /{WORLD_PREFIX_V6} of IPv6, alone or together)",
                None,
            )


def no_world_ssh(args: ResourceValidationArgs, report_violation: ReportViolation) -> None:
    for rule in ingresses(args.resource_type, args.props):
        if rule.covers(SSH_PORT) and wider_than(rule.sources, MIN_SSH_PREFIX_V4, MIN_SSH_PREFIX_V6):
            report_violation(
                f"{args.name} opens SSH to {', '.join(rule.sources)}: SSH may come only from admin networks of "
                f"/{MIN_SSH_PREFIX_V4} or narrower, together (set gpugate:admin_cidrs, or none for SSM / IAP)",
                None,
            )


def _exposed_ports(spec: Mapping[str, Any]) -> Iterator[tuple[str, Any]]:
    """(what, number) for each port a Service opens outside the cluster: a LoadBalancer's listener ports,
    a NodePort Service's node ports (None when the cluster allocates one, from 30000-32767)."""
    for port in spec.get("ports") or []:
        if spec.get("type") == "LoadBalancer":
            yield "port", port.get("port")
        else:
            yield "nodePort", port.get("nodePort")


def kubernetes_web_only_exposed(args: ResourceValidationArgs, report_violation: ReportViolation) -> None:
    """A NodePort or LoadBalancer Service opens ports on every node or on a cloud load balancer, outside
    the NetworkPolicies' reach: only 80 and 443 may be opened that way, whatever its source ranges."""
    if args.resource_type != K8S_SERVICE:
        return
    spec = args.props.get("spec") or {}
    if spec.get("type") not in ("NodePort", "LoadBalancer"):
        return
    for what, number in _exposed_ports(spec):
        if not _known(number) or int(number) not in WEB_PORTS:
            shown = int(number) if _known(number) else "allocated from 30000-32767"
            report_violation(
                f"{args.name}: a {spec['type']} Service exposes {what} {shown}; only 80 and 443 may leave the "
                "cluster (use a ClusterIP Service and kubectl port-forward for anything else)",
                None,
            )


def encrypted_disks(args: ResourceValidationArgs, report_violation: ReportViolation) -> None:
    props = args.props
    if args.resource_type == AWS_INSTANCE:
        root = props.get("rootBlockDevice") or {}
        if root.get("encrypted") is not True:
            report_violation(f"{args.name}: the root volume must set encrypted: true", None)
        for device in props.get("ebsBlockDevices") or []:
            if device.get("encrypted") is not True:
                report_violation(f"{args.name}: EBS volume {device.get('deviceName', '?')} must be encrypted", None)
    elif args.resource_type == AWS_VOLUME and props.get("encrypted") is not True:
        report_violation(f"{args.name}: the EBS volume must set encrypted: true", None)
    # GCP encrypts every persistent disk at rest with Google-managed keys; nothing to set or check.


def imdsv2_required(args: ResourceValidationArgs, report_violation: ReportViolation) -> None:
    if args.resource_type not in (AWS_INSTANCE, AWS_LAUNCH_TEMPLATE):
        return
    options = args.props.get("metadataOptions") or {}
    if options.get("httpEndpoint") == "disabled":
        return  # no metadata service at all is stricter still
    if options.get("httpTokens") != "required":
        report_violation(f'{args.name}: metadataOptions.httpTokens must be "required" (IMDSv2 only)', None)
    hops = options.get("httpPutResponseHopLimit")
    if hops is None or int(hops) != 1:
        report_violation(
            f"{args.name}: metadataOptions.httpPutResponseHopLimit must be 1 (containers must not reach IMDS), got {hops}",
            None,
        )


def mapped_gpu_machines(args: ResourceValidationArgs, report_violation: ReportViolation) -> None:
    if args.resource_type == AWS_INSTANCE:
        kinds, allowed, what = [args.props.get("instanceType")], AWS_INSTANCE_TYPES, "instance type"
    elif args.resource_type == GCP_INSTANCE:
        kinds, allowed, what = [args.props.get("machineType")], GCP_MACHINE_TYPES, "machine type"
    elif gpu_node_pool(args.resource_type, args.props):
        if args.resource_type == GKE_NODE_POOL:
            kinds, allowed, what = [(args.props.get("nodeConfig") or {}).get("machineType")], GCP_MACHINE_TYPES, "machine type"
        else:
            kinds, allowed, what = list(args.props.get("instanceTypes") or []), AWS_INSTANCE_TYPES, "instance type"
    else:
        return
    for kind in kinds:
        if _known(kind) and kind not in allowed:
            report_violation(
                f"{args.name}: {what} {kind} is not one gpugate maps a GPU to; allowed: {', '.join(sorted(allowed))}",
                None,
            )


def gpu_node_pool(resource_type: str, props: Mapping[str, Any]) -> bool:
    """A GKE node pool with accelerators or of a GPU machine family, or an EKS node group on a GPU AMI."""
    if resource_type == GKE_NODE_POOL:
        config = props.get("nodeConfig") or {}
        machine = str(config.get("machineType") or "")
        return bool(config.get("guestAccelerators")) or machine.startswith(GPU_MACHINE_FAMILIES)
    if resource_type == EKS_NODE_GROUP:
        ami = str(props.get("amiType") or "")
        return "NVIDIA" in ami or "GPU" in ami
    return False


def gpu_pools_tainted(args: ResourceValidationArgs, report_violation: ReportViolation) -> None:
    if not gpu_node_pool(args.resource_type, args.props):
        return
    if args.resource_type == GKE_NODE_POOL:
        taints = (args.props.get("nodeConfig") or {}).get("taints") or []
    else:
        taints = args.props.get("taints") or []
    if not any(t.get("key") == GPU_TAINT_KEY and str(t.get("effect", "")).upper() == "NO_SCHEDULE" for t in taints):
        report_violation(
            f"{args.name}: a GPU node pool must carry the {GPU_TAINT_KEY} NoSchedule taint, so that only GPU workloads land on it",
            None,
        )


def _containers(props: Mapping[str, Any]) -> Iterator[Mapping[str, Any]]:
    spec = props.get("spec") or {}
    pod = spec if "containers" in spec else ((spec.get("template") or {}).get("spec") or {})
    if "jobTemplate" in spec:
        pod = ((spec["jobTemplate"].get("spec") or {}).get("template") or {}).get("spec") or {}
    for key in ("initContainers", "containers"):
        yield from pod.get(key) or []


def images_pinned(args: ResourceValidationArgs, report_violation: ReportViolation) -> None:
    """Pods run images pinned by a real digest: a tag can move under a running release, and a placeholder
    digest (gpugate/images.py) was never resolved against a registry, so no node could pull it."""
    if args.resource_type not in K8S_WORKLOADS:
        return
    for container in _containers(args.props):
        image = container.get("image")
        if not _known(image):
            continue
        problem = image_problem(str(image))
        if problem is not None:
            report_violation(
                f"{args.name}: container {container.get('name')} image {problem}; allowed: {IMAGE_ALLOWED} "
                "(set it in the stack's gpugate:kubernetes.images or gpugate:vllm.image)",
                None,
            )


def kubernetes_secrets(args: ResourceValidationArgs, report_violation: ReportViolation) -> None:
    """Secrets reach pods from Secrets only; in the plan, a Secret's data is also a Pulumi secret."""
    props = args.props
    if args.resource_type in K8S_WORKLOADS:
        for container in _containers(props):
            for env in container.get("env") or []:
                if SECRET_NAME.search(str(env.get("name", ""))) and env.get("value") not in (None, ""):
                    report_violation(
                        f"{args.name}: container {container.get('name')} sets {env['name']} as a literal; "
                        "take it from a Secret (valueFrom.secretKeyRef)",
                        None,
                    )
    elif args.resource_type == K8S_CONFIG_MAP:
        for key in props.get("data") or {}:
            if SECRET_NAME.search(str(key).replace(".", "_").replace("-", "_")):
                report_violation(f"{args.name}: ConfigMap key {key} names a secret; secrets go in a Secret", None)
    elif args.resource_type == K8S_SECRET and isinstance(props, SECRETS_VISIBLE):
        raw = _raw(props)
        for field in ("stringData", "data"):
            value = raw.get(field)
            if value is None or isinstance(value, Secret):
                continue
            plain = [k for k, v in (_raw(value) or {}).items() if not isinstance(v, Secret)]
            if plain:
                report_violation(
                    f"{args.name}: Secret {field} {', '.join(sorted(plain))} is not a Pulumi secret; "
                    "wrap it in pulumi.Output.secret",
                    None,
                )


def cluster_api_not_public(args: ResourceValidationArgs, report_violation: ReportViolation) -> None:
    """A cluster's API server answers only the admin networks (or only inside its network)."""
    props = args.props
    if args.resource_type == GKE_CLUSTER:
        config = props.get("masterAuthorizedNetworksConfig")
        if not config:
            report_violation(f"{args.name}: set masterAuthorizedNetworksConfig (the admin networks) on the cluster", None)
            return
        blocks = tuple(str(b.get("cidrBlock")) for b in config.get("cidrBlocks") or [])
        wide = list(blocks) if is_world(blocks) else []
    elif args.resource_type == EKS_CLUSTER:
        vpc = props.get("vpcConfig") or {}
        if vpc.get("endpointPublicAccess") is False:
            return
        # EKS opens a public endpoint to 0.0.0.0/0 unless told otherwise.
        cidrs = tuple(str(c) for c in vpc.get("publicAccessCidrs") or ["0.0.0.0/0"])
        wide = list(cidrs) if is_world(cidrs) else []
    else:
        return
    if wide:
        report_violation(
            f"{args.name}: the Kubernetes API is open to {', '.join(map(str, wide))}; allow the admin networks only", None
        )


def user_data_of(resource_type: str, props: Mapping[str, Any]) -> Any:
    """The cloud-init document an instance boots with, as cloud-init reads it (decoded from base64 and
    gzip as the clouds deliver it); None when it has none, UNKNOWN while it is not known yet."""
    if resource_type == AWS_INSTANCE:
        raw = props.get("userDataBase64") or props.get("userData")
        encoded = "userDataBase64" in props
    elif resource_type == GCP_INSTANCE:
        metadata = props.get("metadata") or {}
        raw = metadata.get("user-data")
        encoded = metadata.get("user-data-encoding") == "base64"
    else:
        return None
    if not isinstance(raw, str) or raw == UNKNOWN:
        return raw
    data = base64.b64decode(raw) if encoded else raw.encode()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    return data.decode(errors="replace")


def _raw(value: Any) -> Any:
    """The value behind pulumi-policy's secrets-preserving proxy (Secret markers intact), or None for plain values."""
    try:
        return value["__target"]
    except (KeyError, TypeError, IndexError):
        return None


def no_secrets_in_user_data(args: ResourceValidationArgs, report_violation: ReportViolation) -> None:
    """Secrets reach a VM through the cloud's secret manager: user data is readable with
    ec2:DescribeInstanceAttribute / compute.instances.get, so it writes no secret file."""
    text = user_data_of(args.resource_type, args.props)
    if not isinstance(text, str) or text == UNKNOWN:
        return
    try:
        document = YAML(typ="safe", pure=True).load(text)
    except YAMLError:
        report_violation(f"{args.name}: user-data is not a YAML cloud-config document", None)
        return
    for entry in (document or {}).get("write_files") or []:
        if isinstance(entry, Mapping) and str(entry.get("path", "")).startswith(SECRET_DIR):
            report_violation(
                f"{args.name}: user-data writes the secret file {entry['path']}; deliver it through the secret manager", None
            )


@dataclass(frozen=True)
class Rule:
    """A named rule: its description and the validate function pulumi-policy and the plan both call."""

    name: str
    description: str
    validate: Any  # (ResourceValidationArgs, ReportViolation) -> None


RULES: tuple[Rule, ...] = (
    Rule(
        "web-only-from-world",
        f"Only TCP 80 and 443 may be open to the world: sources wider than a /{WORLD_PREFIX_V4} of IPv4 or a "
        f"/{WORLD_PREFIX_V6} of IPv6, alone or together (security groups, their rules, GCP firewalls, "
        "Kubernetes LoadBalancer Services).",
        web_only_from_world,
    ),
    Rule(
        "no-world-ssh",
        f"SSH (22) only from admin networks of /{MIN_SSH_PREFIX_V4} or narrower together (or IAP), never from the internet.",
        no_world_ssh,
    ),
    Rule(
        "kubernetes-web-only-exposed",
        "Kubernetes Services of type NodePort or LoadBalancer expose TCP 80 and 443 only (a NodePort's "
        "node port from 30000-32767 never passes).",
        kubernetes_web_only_exposed,
    ),
    Rule("encrypted-disks", "EC2 root and EBS volumes must be encrypted (GCP disks always are).", encrypted_disks),
    Rule("imdsv2-required", "EC2 instances require IMDSv2 tokens with a hop limit of 1.", imdsv2_required),
    Rule(
        "mapped-gpu-machines",
        "VMs and GPU node pools only of the instance / machine types gpugate's catalog maps GPUs to.",
        mapped_gpu_machines,
    ),
    Rule(
        "gpu-pools-tainted",
        f"GPU node pools (GKE, EKS) carry the {GPU_TAINT_KEY} NoSchedule taint.",
        gpu_pools_tainted,
    ),
    Rule(
        "kubernetes-secrets",
        "Pods take secret-named settings from Secrets, never literals or ConfigMaps; in the plan, Secret data is a Pulumi secret.",
        kubernetes_secrets,
    ),
    Rule(
        "images-pinned",
        "Kubernetes pods run images pinned by a published digest: no tag without a digest, no placeholder digest "
        "(sha256 of one repeated hex digit).",
        images_pinned,
    ),
    Rule(
        "cluster-api-not-public",
        f"A GKE or EKS API server answers the admin networks only, never the world (more than a /{WORLD_PREFIX_V4}).",
        cluster_api_not_public,
    ),
    Rule(
        "no-secrets-in-user-data",
        "User data writes no file under /etc/gpugate/secrets: hosts fetch their secrets from the cloud's secret manager.",
        no_secrets_in_user_data,
    ),
)


def policies() -> list[ResourceValidationPolicy]:
    """The rules as pulumi-policy policies, every one mandatory."""
    return [
        ResourceValidationPolicy(
            name=rule.name,
            description=rule.description,
            validate=rule.validate,
            enforcement_level=EnforcementLevel.MANDATORY,
        )
        for rule in RULES
    ]

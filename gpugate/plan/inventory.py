"""What a recorded plan creates, for people: each resource's role and key properties (secrets by size only)."""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict


class ResourceRow(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    type: str
    name: str
    role: str
    properties: dict[str, str]


class Resource(Protocol):
    """One resource of a recorded plan (infra/offline.py's Recorded): type token, name, wire-form inputs."""

    type: str
    name: str
    custom: bool
    wire: dict[str, Any]

    @property
    def props(self) -> dict[str, Any]: ...


# How the engine marks a secret on the wire (pulumi's rpc.py, pulumi-policy's deserialize.py).
SECRET_SIG_KEY = "4dabf18193072939515e22adb298388d"


SECRET_SIG = "1b47061264138c4ac30d75fd1eb44270"


AWS_INSTANCE = "aws:ec2/instance:Instance"


GCP_INSTANCE = "gcp:compute/instance:Instance"


ROLES = {
    AWS_INSTANCE: "gpu-vm",
    GCP_INSTANCE: "gpu-vm",
    "aws:ec2/securityGroup:SecurityGroup": "firewall",
    "aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule": "firewall",
    "aws:vpc/securityGroupEgressRule:SecurityGroupEgressRule": "firewall",
    "gcp:compute/firewall:Firewall": "firewall",
    "aws:route53/record:Record": "dns-record",
    "gcp:dns/recordSet:RecordSet": "dns-record",
    "aws:ec2/eip:Eip": "static-ip",
    "gcp:compute/address:Address": "static-ip",
    "aws:iam/role:Role": "identity",
    "aws:iam/rolePolicyAttachment:RolePolicyAttachment": "identity",
    "aws:iam/rolePolicy:RolePolicy": "identity",
    "aws:iam/openIdConnectProvider:OpenIdConnectProvider": "identity",
    "gcp:serviceaccount/iAMMember:IAMMember": "identity",
    "aws:iam/instanceProfile:InstanceProfile": "identity",
    "gcp:serviceaccount/account:Account": "identity",
    "gcp:projects/iAMMember:IAMMember": "identity",
    "random:index/randomPassword:RandomPassword": "secret",
}


ROLES.update(
    {
        "gcp:container/cluster:Cluster": "cluster",
        "aws:eks/cluster:Cluster": "cluster",
        "aws:eks/addon:Addon": "cluster",
        "gcp:container/nodePool:NodePool": "node-pool",
        "aws:eks/nodeGroup:NodeGroup": "node-pool",
        "kubernetes:helm.sh/v3:Release": "addon",
        "kubernetes:storage.k8s.io/v1:StorageClass": "storage",
    }
)


ROLE_ORDER = (
    "component",
    "provider",
    "network",
    "firewall",
    "identity",
    "secret",
    "cluster",
    "node-pool",
    "addon",
    "storage",
    "gpu-vm",
    "workload",
    "static-ip",
    "dns-record",
)


KUBE_PREFIX = "kubernetes:"


GKE_POOL = "gcp:container/nodePool:NodePool"


EKS_GROUP = "aws:eks/nodeGroup:NodeGroup"


KEY_PROPERTIES = {
    AWS_INSTANCE: ("instanceType", "ami", "rootBlockDevice", "metadataOptions", "instanceMarketOptions", "userDataBase64"),
    GCP_INSTANCE: ("machineType", "zone", "bootDisk", "scheduling", "serviceAccount", "metadata"),
    "aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule": ("ipProtocol", "fromPort", "toPort", "cidrIpv4"),
    "aws:vpc/securityGroupEgressRule:SecurityGroupEgressRule": ("ipProtocol", "cidrIpv4"),
    "gcp:compute/firewall:Firewall": ("direction", "allows", "sourceRanges", "targetTags"),
    "aws:route53/record:Record": ("name", "type", "records"),
    "gcp:dns/recordSet:RecordSet": ("name", "type", "rrdatas"),
    "aws:ec2/eip:Eip": ("domain",),
    "gcp:compute/address:Address": ("addressType", "networkTier"),
    "aws:iam/rolePolicyAttachment:RolePolicyAttachment": ("policyArn",),
    "gcp:projects/iAMMember:IAMMember": ("role",),
    "aws:ec2/subnet:Subnet": ("cidrBlock", "availabilityZone"),
    "aws:ec2/vpc:Vpc": ("cidrBlock",),
    "gcp:compute/subnetwork:Subnetwork": ("ipCidrRange", "region"),
    "gcp:compute/network:Network": ("autoCreateSubnetworks",),
    "gcp:serviceaccount/account:Account": ("accountId",),
    "random:index/randomPassword:RandomPassword": ("length",),
    "pulumi:providers:aws": ("region",),
    "pulumi:providers:gcp": ("project", "region", "zone"),
    "gcp:container/cluster:Cluster": (
        "name",
        "location",
        "releaseChannel",
        "datapathProvider",
        "masterAuthorizedNetworksConfig",
    ),
    "aws:eks/cluster:Cluster": ("name", "version", "vpcConfig"),
    GKE_POOL: ("autoscaling",),
    EKS_GROUP: ("amiType", "instanceTypes", "scalingConfig", "taints", "labels"),
    "kubernetes:helm.sh/v3:Release": ("chart", "version", "namespace"),
}


# The Kubernetes objects' properties worth a glance; the full objects are in the bundle (kubernetes/*.yaml).
KUBE_SUMMARY = {
    "Deployment": lambda p: {"replicas": (p.get("spec") or {}).get("replicas")},
    "Service": lambda p: {
        "type": (p.get("spec") or {}).get("type"),
        "ports": [port.get("port") for port in (p.get("spec") or {}).get("ports") or []],
    },
    "ScaledObject": lambda p: {
        "replicas": "{:g}..{:g}".format(
            (p.get("spec") or {}).get("minReplicaCount", 0), (p.get("spec") or {}).get("maxReplicaCount", 0)
        ),
        "query": ((p.get("spec") or {}).get("triggers") or [{}])[0].get("metadata", {}).get("query"),
    },
}


def _show(value: Any, wire: Any) -> str:
    """A property for people: secrets as their size only, whole numbers without `.0`."""
    if isinstance(wire, Mapping) and wire.get(SECRET_SIG_KEY) == SECRET_SIG:
        return f"[secret, {len(str(value).encode()):,} bytes]"
    if isinstance(value, Mapping):
        wire = wire if isinstance(wire, Mapping) else {}
        return "{" + ", ".join(f"{k}: {_show(v, wire.get(k))}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        wires = wire if isinstance(wire, list) else [None] * len(value)
        return "[" + ", ".join(_show(v, w) for v, w in zip(value, wires, strict=True)) + "]"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def inventory(resources: list[Resource]) -> list[ResourceRow]:
    rows = []
    for res in resources:
        if res.type == "pulumi:pulumi:Stack":
            continue
        props = res.props
        role = ROLES.get(res.type) or (
            "component" if not res.custom else "provider" if res.type.startswith("pulumi:providers:") else "network"
        )
        keys = KEY_PROPERTIES.get(res.type, ())
        shown = {k: _show(props[k], res.wire.get(k)) for k in keys if k in props and props[k] not in (None, "", [], {})}
        if res.type == GKE_POOL:
            config = props.get("nodeConfig") or {}
            picked = {k: config[k] for k in ("machineType", "guestAccelerators", "taints", "labels", "diskSizeGb") if k in config}
            shown = {**{k: _show(v, None) for k, v in picked.items()}, **shown}
        if res.type.startswith(KUBE_PREFIX) and res.custom and res.type not in ROLES:
            role = "secret" if res.type.endswith(":Secret") else "workload"
            kind = res.type.rsplit(":", 1)[-1]
            summary = KUBE_SUMMARY.get(kind, lambda p: {})(props)
            namespace = (props.get("metadata") or {}).get("namespace")
            shown = {"namespace": str(namespace)} if namespace else {}
            shown.update({k: _show(v, None) for k, v in summary.items() if v not in (None, "", [])})
        rows.append(ResourceRow(type=res.type, name=res.name, role=role, properties=shown))
    # Registration order varies from run to run (it is asynchronous): show a stable one.
    return sorted(rows, key=lambda row: (ROLE_ORDER.index(row.role), row.type, row.name))


def vm_of(resources: list[Resource]) -> Resource | None:
    return next((r for r in resources if r.type in (AWS_INSTANCE, GCP_INSTANCE)), None)


def user_data_size(resources: list[Resource]) -> int | None:
    """Bytes of user data the cloud receives (gzipped, before base64): what AWS's 16 KiB limit counts."""
    vm = vm_of(resources)
    if vm is None:
        return None
    props = vm.props
    text = props.get("userDataBase64") if vm.type == AWS_INSTANCE else (props.get("metadata") or {}).get("user-data")
    return len(base64.b64decode(text)) if isinstance(text, str) else None

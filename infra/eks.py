"""EksCluster: an EKS cluster with a system node group and an autoscaled GPU node group on the NVIDIA AMI, EFS for shared certificates, Elastic IPs for the gateway and its DNS record."""

from __future__ import annotations

import json

import pulumi
import pulumi_aws as aws
import pulumi_kubernetes as k8s

from gpugate.kubernetes.allocatable import SYSTEM_MACHINES, gpu_machine
from gpugate.kubernetes.build import ClusterFacts, eks_service_annotations
from gpugate.kubernetes.objects import GPU_POOL, GPU_TAINT, POOL_LABEL, SYSTEM_POOL
from gpugate.kubernetes.sizing import gpu_node_disk_gib, gpu_node_max
from gpugate.spec import GatewaySpec
from infra.cluster import ManagedCluster, kubeconfig
from infra.awsvpc import PublicSubnet, public_network
from infra.network import NETWORK_CIDR

TYPE_TOKEN = "gpugate:eks:Cluster"
SYSTEM_INSTANCE_TYPE = SYSTEM_MACHINES["eks"]
SYSTEM_NODES = (2, 6)
# AL2023 with the NVIDIA driver and container toolkit; the device plugin comes as a DaemonSet (gpugate/kubernetes/).
GPU_AMI_TYPE = "AL2023_x86_64_NVIDIA"
SYSTEM_AMI_TYPE = "AL2023_x86_64_STANDARD"
EKS_TAINT_EFFECT = {"NoSchedule": "NO_SCHEDULE", "PreferNoSchedule": "PREFER_NO_SCHEDULE", "NoExecute": "NO_EXECUTE"}
# Two subnets in two zones (EKS requires two); the public NLB takes one Elastic IP in each.
SUBNETS = (("a", "10.80.0.0/19"), ("b", "10.80.32.0/19"))
NFS_PORT = 2049
EFS_STORAGE_CLASS = "efs-sc"
CLUSTER_POLICIES = ("arn:aws:iam::aws:policy/AmazonEKSClusterPolicy",)
NODE_POLICIES = (
    "arn:aws:iam::aws:policy/AmazonEKSWorkerNodePolicy",
    "arn:aws:iam::aws:policy/AmazonEKS_CNI_Policy",
    "arn:aws:iam::aws:policy/AmazonEC2ContainerRegistryReadOnly",
    "arn:aws:iam::aws:policy/service-role/AmazonEFSCSIDriverPolicy",
)
# The kubeconfig's user authenticates with the cloud's CLI.
AWS_EXEC = """      command: aws
      args: [eks, get-token, --cluster-name, {name}, --region, {region}]
"""


def _trust(service: str) -> pulumi.Output[str]:
    return pulumi.Output.json_dumps(
        {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Principal": {"Service": service}, "Action": "sts:AssumeRole"}],
        }
    )


class EksCluster(ManagedCluster):
    """An EKS cluster in two zones: a system and a GPU node group, EFS for the shared certificates, one
    Elastic IP per zone for the public NLB, and the DNS record."""

    def __init__(self, name: str, spec: GatewaySpec, stack: str, opts: pulumi.ResourceOptions | None = None):
        super().__init__(TYPE_TOKEN, name, None, opts)
        kube = spec.kubernetes
        assert kube is not None and spec.region is not None
        provider = aws.Provider(f"{name}-aws", region=spec.region, opts=pulumi.ResourceOptions(parent=self))
        child = pulumi.ResourceOptions(parent=self, provider=provider)
        invoke = pulumi.InvokeOptions(parent=self, provider=provider)
        cluster_name = kube.cluster_name or f"gpugate-{stack}"
        tags = {"gpugate:stack": stack}

        network = public_network(
            name,
            [PublicSubnet(suffix, f"{spec.region}{suffix}", cidr) for suffix, cidr in SUBNETS],
            tags,
            cluster_name,
            child,
            subnet_tags={"kubernetes.io/role/elb": "1", f"kubernetes.io/cluster/{cluster_name}": "shared"},
            public_ip_on_launch=True,  # nodes reach the model hub and registries directly (no NAT gateway)
        )
        vpc, subnets = network.vpc, network.subnets
        subnet_ids = [s.id for s in subnets]

        cluster_role = aws.iam.Role(f"{name}-cluster-role", assume_role_policy=_trust("eks.amazonaws.com"), tags=tags, opts=child)
        for i, arn in enumerate(CLUSTER_POLICIES):
            aws.iam.RolePolicyAttachment(f"{name}-cluster-policy-{i}", role=cluster_role.name, policy_arn=arn, opts=child)
        node_role = aws.iam.Role(f"{name}-node-role", assume_role_policy=_trust("ec2.amazonaws.com"), tags=tags, opts=child)
        attachments = [
            aws.iam.RolePolicyAttachment(f"{name}-node-policy-{i}", role=node_role.name, policy_arn=arn, opts=child)
            for i, arn in enumerate(NODE_POLICIES)
        ]

        admins = [str(cidr) for cidr in spec.admin_cidrs]
        cluster = aws.eks.Cluster(
            f"{name}-cluster",
            name=cluster_name,
            version=kube.version,
            role_arn=cluster_role.arn,
            vpc_config=aws.eks.ClusterVpcConfigArgs(
                subnet_ids=subnet_ids,
                endpoint_private_access=True,
                # The API server is public only to the admin networks; without any, private only.
                endpoint_public_access=bool(admins),
                public_access_cidrs=admins or None,
            ),
            access_config=aws.eks.ClusterAccessConfigArgs(
                authentication_mode="API", bootstrap_cluster_creator_admin_permissions=True
            ),
            enabled_cluster_log_types=["api", "audit", "authenticator"],
            tags=tags,
            opts=child,
        )
        # The VPC CNI enforces NetworkPolicies once asked to; EFS's CSI driver mounts the certificate volume.
        aws.eks.Addon(
            f"{name}-vpc-cni",
            cluster_name=cluster.name,
            addon_name="vpc-cni",
            configuration_values=json.dumps({"enableNetworkPolicy": "true"}),
            resolve_conflicts_on_update="OVERWRITE",
            opts=child,
        )
        aws.eks.Addon(f"{name}-efs-csi", cluster_name=cluster.name, addon_name="aws-efs-csi-driver", opts=child)

        def group(kind: str, **kwargs) -> aws.eks.NodeGroup:
            return aws.eks.NodeGroup(
                f"{name}-{kind}",
                cluster_name=cluster.name,
                node_role_arn=node_role.arn,
                subnet_ids=subnet_ids,
                tags=tags,
                opts=pulumi.ResourceOptions.merge(child, pulumi.ResourceOptions(depends_on=attachments)),
                **kwargs,
            )

        system = group(
            "system",
            ami_type=SYSTEM_AMI_TYPE,
            instance_types=[SYSTEM_INSTANCE_TYPE],
            scaling_config=aws.eks.NodeGroupScalingConfigArgs(
                min_size=SYSTEM_NODES[0], max_size=SYSTEM_NODES[1], desired_size=SYSTEM_NODES[0]
            ),
            labels={POOL_LABEL: SYSTEM_POOL},
        )
        gpu = group(
            "gpu",
            ami_type=GPU_AMI_TYPE,
            instance_types=[gpu_machine(spec)],
            disk_size=gpu_node_disk_gib(spec),
            scaling_config=aws.eks.NodeGroupScalingConfigArgs(
                min_size=kube.replicas.min, max_size=gpu_node_max(kube), desired_size=kube.replicas.min
            ),
            update_config=aws.eks.NodeGroupUpdateConfigArgs(max_unavailable=1),
            labels={POOL_LABEL: GPU_POOL},
            taints=[
                aws.eks.NodeGroupTaintArgs(
                    key=GPU_TAINT["key"], value=GPU_TAINT["value"], effect=EKS_TAINT_EFFECT[GPU_TAINT["effect"]]
                )
            ],
        )

        nfs = aws.ec2.SecurityGroup(
            f"{name}-efs",
            vpc_id=vpc.id,
            description=f"gpugate {stack}: NFS from the cluster's nodes to EFS",
            tags=tags,
            opts=child,
        )
        aws.vpc.SecurityGroupIngressRule(
            f"{name}-efs-nfs",
            security_group_id=nfs.id,
            ip_protocol="tcp",
            from_port=NFS_PORT,
            to_port=NFS_PORT,
            cidr_ipv4=NETWORK_CIDR,
            description="NFS from inside the VPC",
            opts=child,
        )
        filesystem = aws.efs.FileSystem(f"{name}-certs", encrypted=True, tags={**tags, "Name": f"{cluster_name}-certs"}, opts=child)
        for suffix, subnet in zip((s for s, _ in SUBNETS), subnets, strict=True):
            aws.efs.MountTarget(
                f"{name}-certs-{suffix}", file_system_id=filesystem.id, subnet_id=subnet.id, security_groups=[nfs.id], opts=child
            )

        eips = [
            aws.ec2.Eip(f"{name}-ip-{suffix}", domain="vpc", tags={**tags, "Name": f"{cluster_name}-{suffix}"}, opts=child)
            for suffix, _ in SUBNETS
        ]
        dns_zone = aws.route53.get_zone(name=spec.dns_zone, private_zone=False, opts=invoke)
        aws.route53.Record(
            f"{name}-dns",
            zone_id=dns_zone.zone_id,
            name=spec.domain,
            type="A",
            ttl=300,
            records=[eip.public_ip for eip in eips],
            opts=child,
        )

        self.publish(
            name,
            cluster_name=cluster.name,
            kubeconfig=pulumi.Output.all(cluster.name, cluster.endpoint, cluster.certificate_authority.data).apply(
                lambda v: kubeconfig(v[0], v[1], v[2], AWS_EXEC.format(name=v[0], region=spec.region))
            ),
            load_balancer_address=pulumi.Output.all(*[e.public_ip for e in eips]).apply(", ".join),
            facts=ClusterFacts(
                "eks",
                service_annotations=eks_service_annotations(pulumi.Output.all(*[e.allocation_id for e in eips]).apply(",".join)),
            ),
            pools=[system, gpu],
        )
        k8s.storage.v1.StorageClass(
            f"{name}-efs-sc",
            metadata={"name": EFS_STORAGE_CLASS},
            provisioner="efs.csi.aws.com",
            parameters={"provisioningMode": "efs-ap", "fileSystemId": filesystem.id, "directoryPerms": "700"},
            opts=pulumi.ResourceOptions(parent=self, provider=self.provider),
        )

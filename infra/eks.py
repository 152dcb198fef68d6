"""EksCluster: an EKS cluster with a system node group and a GPU node group on the NVIDIA AMI that Cluster Autoscaler
scales, in zones that offer the GPU machine, the IAM roles of Cluster Autoscaler and cert-manager, Elastic IPs for the
gateway and its DNS record."""

from __future__ import annotations

import json

import pulumi
import pulumi_aws as aws

from gpugate.kubernetes.allocatable import SYSTEM_MACHINES, gpu_machine
from gpugate.kubernetes.autoscaler import AUTOSCALER, IRSA_ANNOTATION, KUBE_SYSTEM, discovery_tags
from gpugate.kubernetes.build import ClusterFacts, cluster_name as name_of_cluster, eks_service_annotations
from gpugate.kubernetes.objects import CERT_MANAGER_ACCOUNT, CERT_MANAGER_NAMESPACE, GPU_POOL, GPU_TAINT, POOL_LABEL, SYSTEM_POOL
from gpugate.kubernetes.sizing import gpu_node_disk_gib, gpu_node_max
from gpugate.spec import GatewaySpec
from infra.cluster import ManagedCluster, kubeconfig
from infra.awsvpc import PublicSubnet, public_network, zones_offering

TYPE_TOKEN = "gpugate:eks:Cluster"
SYSTEM_INSTANCE_TYPE = SYSTEM_MACHINES["eks"]
SYSTEM_NODES = (2, 6)
# AL2023 with the NVIDIA driver and container toolkit; the device plugin comes as a DaemonSet (gpugate/kubernetes/).
GPU_AMI_TYPE = "AL2023_x86_64_NVIDIA"
SYSTEM_AMI_TYPE = "AL2023_x86_64_STANDARD"
EKS_TAINT_EFFECT = {"NoSchedule": "NO_SCHEDULE", "PreferNoSchedule": "PREFER_NO_SCHEDULE", "NoExecute": "NO_EXECUTE"}
# Two subnets in two zones (EKS requires two), the first two that offer the GPU machine; the public NLB
# takes one Elastic IP in each.
SUBNET_CIDRS = ("10.80.0.0/19", "10.80.32.0/19")
# EKS managed add-ons, (name, configuration). The VPC CNI comes before any node, so that nodes join with
# its network policy agent enabled; the others run pods (a Deployment waits for a node, and the add-on
# reports DEGRADED until one exists), so they come after the node groups.
ADDONS_BEFORE_NODES = (("vpc-cni", {"enableNetworkPolicy": "true"}),)
ADDONS_AFTER_NODES = (("kube-proxy", None), ("coredns", None))
CLUSTER_POLICIES = ("arn:aws:iam::aws:policy/AmazonEKSClusterPolicy",)
NODE_POLICIES = (
    "arn:aws:iam::aws:policy/AmazonEKSWorkerNodePolicy",
    "arn:aws:iam::aws:policy/AmazonEKS_CNI_Policy",
    "arn:aws:iam::aws:policy/AmazonEC2ContainerRegistryReadOnly",
)
# The kubeconfig's user authenticates with the cloud's CLI.
AWS_EXEC = """      command: aws
      args: [eks, get-token, --cluster-name, {name}, --region, {region}]
"""


def autoscaler_policy(cluster: str) -> dict:
    """Cluster Autoscaler's IAM policy (its AWS provider's README): read every Auto Scaling group and node group,
    resize or shrink only this cluster's."""
    enabled, owned = discovery_tags(cluster).items()
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Action": [
                    "autoscaling:DescribeAutoScalingGroups",
                    "autoscaling:DescribeAutoScalingInstances",
                    "autoscaling:DescribeLaunchConfigurations",
                    "autoscaling:DescribeScalingActivities",
                    "autoscaling:DescribeTags",
                    "ec2:DescribeImages",
                    "ec2:DescribeInstanceTypes",
                    "ec2:DescribeLaunchTemplateVersions",
                    "ec2:GetInstanceTypesFromInstanceRequirements",
                    # a managed node group's labels and taints, for scaling a group up from zero
                    "eks:DescribeNodegroup",
                ],
                "Resource": "*",
            },
            {
                "Effect": "Allow",
                "Action": ["autoscaling:SetDesiredCapacity", "autoscaling:TerminateInstanceInAutoScalingGroup"],
                "Resource": "*",
                "Condition": {"StringEquals": {f"aws:ResourceTag/{enabled[0]}": enabled[1], f"aws:ResourceTag/{owned[0]}": owned[1]}},
            },
        ],
    }


def dns01_policy(zone_id: str) -> str:
    """cert-manager's Route53 policy (its DNS-01 docs): TXT records in the gateway's zone, and the changes' status."""
    return json.dumps(
        {
            "Version": "2012-10-17",
            "Statement": [
                {"Effect": "Allow", "Action": "route53:GetChange", "Resource": "arn:aws:route53:::change/*"},
                {
                    "Effect": "Allow",
                    "Action": ["route53:ChangeResourceRecordSets", "route53:ListResourceRecordSets"],
                    "Resource": f"arn:aws:route53:::hostedzone/{zone_id}",
                    "Condition": {"ForAllValues:StringEquals": {"route53:ChangeResourceRecordSetsRecordTypes": ["TXT"]}},
                },
                {"Effect": "Allow", "Action": "route53:ListHostedZonesByName", "Resource": "*"},
            ],
        }
    )


def irsa_trust(provider_arn: str, issuer: str, namespace: str, account: str) -> str:
    """A role's trust policy for one Kubernetes service account (IRSA): its token, issued by the cluster's OIDC issuer."""
    host = issuer.removeprefix("https://")
    return json.dumps(
        {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Effect": "Allow",
                    "Principal": {"Federated": provider_arn},
                    "Action": "sts:AssumeRoleWithWebIdentity",
                    "Condition": {
                        "StringEquals": {
                            f"{host}:sub": f"system:serviceaccount:{namespace}:{account}",
                            f"{host}:aud": "sts.amazonaws.com",
                        }
                    },
                }
            ],
        }
    )


def _trust(service: str) -> pulumi.Output[str]:
    return pulumi.Output.json_dumps(
        {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Principal": {"Service": service}, "Action": "sts:AssumeRole"}],
        }
    )


class EksCluster(ManagedCluster):
    """An EKS cluster in two zones that offer the GPU machine: a system and a GPU node group that Cluster
    Autoscaler resizes, cert-manager's Route53 role, one Elastic IP per zone for the public NLB, and the DNS record."""

    def __init__(self, name: str, spec: GatewaySpec, stack: str, opts: pulumi.ResourceOptions | None = None):
        super().__init__(TYPE_TOKEN, name, None, opts)
        kube = spec.kubernetes
        assert kube is not None and spec.region is not None
        provider = aws.Provider(f"{name}-aws", region=spec.region, opts=pulumi.ResourceOptions(parent=self))
        child = pulumi.ResourceOptions(parent=self, provider=provider)
        invoke = pulumi.InvokeOptions(parent=self, provider=provider)
        cluster_name = name_of_cluster(kube, stack)
        tags = {"gpugate:stack": stack}

        machine = gpu_machine(spec)
        zones = zones_offering(machine, invoke)
        if len(zones) < 2:
            raise ValueError(
                f"EKS needs two availability zones and only {', '.join(zones)} of {spec.region} offers {machine}; "
                "pick another region or gpu"
            )
        # Suffixes as the zones name them (us-east-1c -> c): a subnet keeps its name while its zone does.
        placed = [PublicSubnet(zone.removeprefix(spec.region), zone, cidr) for zone, cidr in zip(zones, SUBNET_CIDRS)]
        network = public_network(
            name,
            placed,
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
        # The VPC CNI enforces NetworkPolicies once asked to (before the nodes join).
        before = [self._addon(name, cluster, addon, config, child) for addon, config in ADDONS_BEFORE_NODES]

        def group(kind: str, **kwargs) -> aws.eks.NodeGroup:
            return aws.eks.NodeGroup(
                f"{name}-{kind}",
                cluster_name=cluster.name,
                node_role_arn=node_role.arn,
                subnet_ids=subnet_ids,
                # EKS tags the group's Auto Scaling group with these too: Cluster Autoscaler finds it by them.
                tags={**tags, **discovery_tags(cluster_name)},
                opts=pulumi.ResourceOptions.merge(child, pulumi.ResourceOptions(depends_on=[*attachments, *before])),
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
            instance_types=[machine],
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

        # kube-proxy and CoreDNS: after the nodes.
        after_nodes = pulumi.ResourceOptions.merge(child, pulumi.ResourceOptions(depends_on=[system, gpu]))
        for addon, config in ADDONS_AFTER_NODES:
            self._addon(name, cluster, addon, config, after_nodes)

        # Cluster Autoscaler's IAM role, assumed by its service account through the cluster's OIDC issuer (IRSA).
        issuer = cluster.identities.apply(lambda ids: ids[0].oidcs[0].issuer)
        oidc = aws.iam.OpenIdConnectProvider(
            f"{name}-oidc", url=issuer, client_id_lists=["sts.amazonaws.com"], tags=tags, opts=child
        )

        def irsa_role(role: str, namespace: str, account: str, policy: pulumi.Input[str]) -> aws.iam.Role:
            made = aws.iam.Role(
                f"{name}-{role}",
                assume_role_policy=pulumi.Output.all(oidc.arn, issuer).apply(lambda v: irsa_trust(v[0], v[1], namespace, account)),
                tags=tags,
                opts=child,
            )
            aws.iam.RolePolicy(f"{name}-{role}", role=made.id, policy=policy, opts=child)
            return made

        autoscaler_role = irsa_role("autoscaler", KUBE_SYSTEM, AUTOSCALER, json.dumps(autoscaler_policy(cluster_name)))
        # cert-manager answers the CA's DNS-01 challenge with TXT records in the zone the gateway's record is in.
        dns_zone = aws.route53.get_zone(name=spec.dns_zone, private_zone=False, opts=invoke)
        certs_role = irsa_role("cert-manager", CERT_MANAGER_NAMESPACE, CERT_MANAGER_ACCOUNT, dns01_policy(dns_zone.zone_id))

        eips = [
            aws.ec2.Eip(f"{name}-ip-{where.suffix}", domain="vpc", tags={**tags, "Name": f"{cluster_name}-{where.suffix}"}, opts=child)
            for where in placed
        ]
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
                cluster_name=cluster_name,
                autoscaler_role_arn=autoscaler_role.arn,
                dns_zone_id=dns_zone.zone_id,
                cert_manager_annotations={IRSA_ANNOTATION: certs_role.arn},
            ),
            pools=[system, gpu],
        )

    @staticmethod
    def _addon(
        name: str, cluster: aws.eks.Cluster, addon: str, config: dict | None, opts: pulumi.ResourceOptions
    ) -> aws.eks.Addon:
        """One EKS managed add-on; it takes over the self-managed copy EKS installs at creation."""
        return aws.eks.Addon(
            f"{name}-{addon}",
            cluster_name=cluster.name,
            addon_name=addon,
            configuration_values=json.dumps(config) if config else None,
            resolve_conflicts_on_create="OVERWRITE",
            resolve_conflicts_on_update="OVERWRITE",
            opts=opts,
        )

"""AwsGateway: one GPU VM on AWS with its network, firewall, identity, static IP and DNS record."""

from __future__ import annotations

from dataclasses import dataclass

import pulumi
import pulumi_aws as aws

from gpugate.catalog import GPUS
from gpugate.render.bundle import Bundle
from gpugate.spec import GatewaySpec, Target
from gpugate.stackfile import Stack
from gpugate.vm.userdata import USER_DATA
from infra.network import NETWORK_CIDR, SUBNET_CIDR, WORLD_IPV4, IngressRule, ingress_rules, public_url
from infra.secrets import host_secrets, secret_user_data

TYPE_TOKEN = "gpugate:aws:Gateway"
# AWS's Deep Learning Base AMI: NVIDIA driver, CUDA, Docker and the NVIDIA container toolkit, SSM agent.
AMI_OWNER = "amazon"
AMI_NAME = "Deep Learning Base OSS Nvidia Driver GPU AMI (Ubuntu 22.04) *"
SSM_POLICY_ARN = "arn:aws:iam::aws:policy/AmazonSSMManagedInstanceCore"
ROOT_VOLUME_TYPE = "gp3"
SSH_USER = "ubuntu"
# SSH over Session Manager (AWS's documented ProxyCommand; %h is the instance id).
SSM_PROXY_COMMAND = (
    "aws ssm start-session --target %h --document-name AWS-StartSSHSession --parameters portNumber=%p --region {region}"
)


def instance_type(spec: GatewaySpec) -> str:
    """The catalog's instance type for gpu.type x gpu.count (the spec refuses others; this is the backstop)."""
    table = GPUS[spec.gpu.type].aws_instance_types
    if spec.gpu.count not in table:
        allowed = ", ".join(f"{n} ({t})" for n, t in sorted(table.items())) or "none"
        raise ValueError(f"AWS has no instance with {spec.gpu.count} x {spec.gpu.type}; allowed gpu.count: {allowed}")
    return table[spec.gpu.count]


@dataclass(frozen=True)
class AwsGatewayArgs:
    """What the AWS gateway is built from: the spec, and the bundle's user-data and hash."""

    spec: GatewaySpec
    stack: str
    user_data: bytes  # the bundle's cloud-init document; holds no secret
    bundle_sha256: str
    ingress: tuple[IngressRule, ...]  # derived from the spec by from_bundle

    @classmethod
    def from_bundle(cls, stack: Stack, bundle: Bundle) -> AwsGatewayArgs:
        if stack.spec.target is not Target.AWS:
            raise ValueError(f"stack {stack.name} targets {stack.spec.target}, not aws")
        return cls(
            spec=stack.spec,
            stack=stack.name,
            user_data=bundle.files[USER_DATA],
            bundle_sha256=bundle.bundle_sha256,
            # No SSH rule without admin networks: operators reach the host through SSM.
            ingress=ingress_rules(stack.spec),
        )


class AwsGateway(pulumi.ComponentResource):
    """A GPU VM behind a security group that opens 80/443 to the world and SSH to admins only."""

    url: pulumi.Output[str]
    public_ip: pulumi.Output[str]
    ssh_host: pulumi.Output[str]
    ssh_proxy_command: pulumi.Output[str]
    bundle_sha256: pulumi.Output[str]
    user_data: pulumi.Output[str]  # secret
    vllm_api_key: pulumi.Output[str]  # secret

    def __init__(self, name: str, args: AwsGatewayArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__(TYPE_TOKEN, name, None, opts)
        spec = args.spec
        assert spec.vm is not None  # the spec requires a vm section for aws
        itype = instance_type(spec)
        provider = aws.Provider(f"{name}-aws", region=spec.region, opts=pulumi.ResourceOptions(parent=self))
        child = pulumi.ResourceOptions(parent=self, provider=provider)
        invoke = pulumi.InvokeOptions(parent=self, provider=provider)
        tags = {"gpugate:stack": args.stack, "gpugate:bundle-sha256": args.bundle_sha256}

        zone = spec.zone or self._zone_offering(itype, invoke)
        subnet_id, vpc_id = self._network(name, spec.vm.network, zone, tags, child, invoke)

        group = aws.ec2.SecurityGroup(
            f"{name}-sg",
            vpc_id=vpc_id,
            description=f"gpugate {args.stack}: web to the world, SSH to admins only",
            tags={**tags, "Name": f"gpugate-{args.stack}"},
            opts=child,
        )
        for rule in args.ingress:
            for i, source in enumerate(rule.sources):
                aws.vpc.SecurityGroupIngressRule(
                    f"{name}-in-{rule.name}-{i}",
                    security_group_id=group.id,
                    ip_protocol=rule.protocol,
                    from_port=rule.port,
                    to_port=rule.port,
                    cidr_ipv4=source,
                    description=rule.description,
                    tags=tags,
                    opts=child,
                )
        # Out: packages, the model hub, the container registry, ACME, the alert channel.
        aws.vpc.SecurityGroupEgressRule(
            f"{name}-out-all",
            security_group_id=group.id,
            ip_protocol="-1",
            cidr_ipv4=WORLD_IPV4,
            description="all outbound",
            tags=tags,
            opts=child,
        )

        role = aws.iam.Role(
            f"{name}-role",
            assume_role_policy=pulumi.Output.json_dumps(
                {
                    "Version": "2012-10-17",
                    "Statement": [
                        {"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}
                    ],
                }
            ),
            description=f"gpugate {args.stack} host: Session Manager only",
            tags=tags,
            opts=child,
        )
        aws.iam.RolePolicyAttachment(f"{name}-ssm", role=role.name, policy_arn=SSM_POLICY_ARN, opts=child)
        profile = aws.iam.InstanceProfile(f"{name}-profile", role=role.name, tags=tags, opts=child)

        ami = aws.ec2.get_ami(
            most_recent=True,
            owners=[AMI_OWNER],
            filters=[
                aws.ec2.GetAmiFilterArgs(name="name", values=[AMI_NAME]),
                aws.ec2.GetAmiFilterArgs(name="architecture", values=["x86_64"]),
            ],
            opts=invoke,
        )

        secrets = host_secrets(spec, name, self)
        self.vllm_api_key = secrets[0].value
        self.user_data = secret_user_data(args.user_data, secrets)

        market = None
        if spec.vm.spot:
            market = aws.ec2.InstanceInstanceMarketOptionsArgs(
                market_type="spot",
                spot_options=aws.ec2.InstanceInstanceMarketOptionsSpotOptionsArgs(
                    # persistent + stop: an interrupted host comes back with its disk when capacity returns
                    spot_instance_type="persistent",
                    instance_interruption_behavior="stop",
                ),
            )
        # The host's interface and its Elastic IP exist before the host boots, so cloud-init has its
        # public address (and the internet) from the first second.
        interface = aws.ec2.NetworkInterface(
            f"{name}-nic",
            subnet_id=subnet_id,
            security_groups=[group.id],
            description=f"gpugate {args.stack} host",
            tags=tags,
            opts=child,
        )
        eip = aws.ec2.Eip(
            f"{name}-ip",
            domain="vpc",
            network_interface=interface.id,
            tags={**tags, "Name": f"gpugate-{args.stack}"},
            opts=child,
        )
        instance = aws.ec2.Instance(
            f"{name}-vm",
            ami=ami.id,
            instance_type=itype,
            network_interfaces=[
                aws.ec2.InstanceNetworkInterfaceArgs(device_index=0, network_interface_id=interface.id)
            ],
            iam_instance_profile=profile.name,
            user_data=self.user_data,
            # cloud-init runs once per instance: a new bundle means a new host (interface, IP and DNS stay).
            user_data_replace_on_change=True,
            root_block_device=aws.ec2.InstanceRootBlockDeviceArgs(
                volume_type=ROOT_VOLUME_TYPE,
                volume_size=spec.vm.disk_gib,
                encrypted=True,
                delete_on_termination=True,
            ),
            metadata_options=aws.ec2.InstanceMetadataOptionsArgs(
                http_endpoint="enabled",
                http_tokens="required",  # IMDSv2 only
                http_put_response_hop_limit=1,  # containers on the host cannot reach the metadata service
            ),
            instance_market_options=market,
            tags={**tags, "Name": f"gpugate-{args.stack}"},
            opts=pulumi.ResourceOptions.merge(
                child,
                pulumi.ResourceOptions(
                    # The interface holds one host at a time: the old host goes before the new one comes.
                    delete_before_replace=True,
                    # A newer AMI alone does not replace a running host; the next bundle change brings it.
                    ignore_changes=["ami"],
                ),
            ),
        )

        dns_zone = aws.route53.get_zone(name=spec.dns_zone, private_zone=False, opts=invoke)
        aws.route53.Record(
            f"{name}-dns",
            zone_id=dns_zone.zone_id,
            name=spec.domain,
            type="A",
            ttl=300,
            records=[eip.public_ip],
            opts=child,
        )

        self.url = pulumi.Output.from_input(public_url(spec))
        self.public_ip = eip.public_ip
        self.bundle_sha256 = pulumi.Output.from_input(args.bundle_sha256)
        if spec.admin_cidrs:
            self.ssh_host = eip.public_ip
            self.ssh_proxy_command = pulumi.Output.from_input("")
        else:
            self.ssh_host = instance.id
            self.ssh_proxy_command = pulumi.Output.from_input(SSM_PROXY_COMMAND.format(region=spec.region))
        self.register_outputs(
            {
                "url": self.url,
                "public_ip": self.public_ip,
                "ssh_host": self.ssh_host,
                "ssh_proxy_command": self.ssh_proxy_command,
                "bundle_sha256": self.bundle_sha256,
            }
        )

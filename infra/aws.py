"""AwsGateway: one VM on AWS (Debian 12) with its network, firewall, identity, bundle bucket, secrets, static IP and DNS record."""

from __future__ import annotations

import json

import pulumi
import pulumi_aws as aws

from gpugate.catalog import machine
from gpugate.render.bundle import Bundle
from gpugate.spec import Target
from gpugate.stackfile import Stack
from infra.awsvpc import PublicSubnet, public_network, zones_offering
from infra.network import SUBNET_CIDR, WORLD_IPV4, ingress_rules
from infra.vm import VmGateway, VmGatewayArgs, register_vm_outputs, secret_values

TYPE_TOKEN = "gpugate:aws:Gateway"
# Debian's official AMIs (account 136693071363 publishes them for the Debian cloud team): the release the
# user data is written for and tests/vm boots.
AMI_OWNER = "136693071363"
AMI_NAME = "debian-12-amd64-*"
ROOT_VOLUME_TYPE = "gp3"
SSH_USER = "admin"  # Debian's cloud images
# SSH without a public port 22: through the EC2 Instance Connect Endpoint of the host's subnet
# (AWS's documented ProxyCommand; %h is the instance id). Needs only sshd on the host.
EIC_PROXY_COMMAND = "aws ec2-instance-connect open-tunnel --instance-id %h --region {region}"


def args_from_bundle(stack: Stack, bundle: Bundle) -> VmGatewayArgs:
    # No SSH rule from the internet without admin networks: operators come through the Instance Connect Endpoint.
    return VmGatewayArgs.from_bundle(stack, bundle, Target.AWS, ingress_rules(stack.spec))


class AwsGateway(VmGateway):
    """A VM behind a security group that opens 80/443 to the world and SSH to admins only; it fetches its
    bundle from a private bucket and its secrets from Secrets Manager with its instance role, which may read
    exactly those and nothing else."""

    def __init__(self, name: str, args: VmGatewayArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__(TYPE_TOKEN, name, None, opts)
        spec = args.spec
        assert spec.vm is not None  # the spec requires a vm section for aws
        itype = machine("aws", spec.gpu.type, spec.gpu.count)
        provider = aws.Provider(f"{name}-aws", region=spec.region, opts=pulumi.ResourceOptions(parent=self))
        child = pulumi.ResourceOptions(parent=self, provider=provider)
        invoke = pulumi.InvokeOptions(parent=self, provider=provider)
        tags = {"gpugate:stack": args.stack, "gpugate:bundle-sha256": args.bundle_sha256}

        zone = spec.zone or zones_offering(itype, invoke)[0]
        subnet_id, vpc_id, ready = self._network(name, spec.vm.network, zone, tags, child, invoke)

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
        # Out: packages, PyPI, the model hub, the container registry, ACME, the alert channel.
        aws.vpc.SecurityGroupEgressRule(
            f"{name}-out-all",
            security_group_id=group.id,
            ip_protocol="-1",
            cidr_ipv4=WORLD_IPV4,
            description="all outbound",
            tags=tags,
            opts=child,
        )
        if not spec.admin_cidrs:
            # SSH only from AWS's Instance Connect Endpoint in the subnet, which IAM authorises per user.
            eic_group = aws.ec2.SecurityGroup(
                f"{name}-eic-sg",
                vpc_id=vpc_id,
                description=f"gpugate {args.stack}: Instance Connect Endpoint",
                tags=tags,
                opts=child,
            )
            aws.vpc.SecurityGroupEgressRule(
                f"{name}-eic-out-ssh",
                security_group_id=eic_group.id,
                ip_protocol="tcp",
                from_port=22,
                to_port=22,
                referenced_security_group_id=group.id,
                description="SSH to the gateway host",
                opts=child,
            )
            aws.vpc.SecurityGroupIngressRule(
                f"{name}-in-ssh-eic",
                security_group_id=group.id,
                ip_protocol="tcp",
                from_port=22,
                to_port=22,
                referenced_security_group_id=eic_group.id,
                description="SSH through the Instance Connect Endpoint only",
                opts=child,
            )
            aws.ec2transitgateway.InstanceConnectEndpoint(
                f"{name}-eic", subnet_id=subnet_id, security_group_ids=[eic_group.id], tags=tags, opts=child
            )

        # The bundle, in a private, encrypted bucket of its own; the host reads this one object.
        bucket = aws.s3.BucketV2(f"{name}-bundles", bucket=args.bucket, force_destroy=True, tags=tags, opts=child)
        aws.s3.BucketPublicAccessBlock(
            f"{name}-bundles-private",
            bucket=bucket.id,
            block_public_acls=True,
            block_public_policy=True,
            ignore_public_acls=True,
            restrict_public_buckets=True,
            opts=child,
        )
        aws.s3.BucketServerSideEncryptionConfigurationV2(
            f"{name}-bundles-encrypted",
            bucket=bucket.id,
            rules=[
                aws.s3.BucketServerSideEncryptionConfigurationV2RuleArgs(
                    apply_server_side_encryption_by_default=aws.s3.BucketServerSideEncryptionConfigurationV2RuleApplyServerSideEncryptionByDefaultArgs(
                        sse_algorithm="AES256"
                    )
                )
            ],
            opts=child,
        )
        bundle_object = aws.s3.BucketObjectv2(
            f"{name}-bundle",
            bucket=bucket.id,
            key=args.object_key,
            source=pulumi.FileAsset(str(args.archive)),
            content_type="application/gzip",
            tags=tags,
            opts=child,
        )

        # Each secret in Secrets Manager; its value is a Pulumi secret (encrypted in the state).
        values = secret_values(args, name, self)
        self.vllm_api_key = values["vllm_api_key"]
        stored: list[aws.secretsmanager.Secret] = []
        versions: list[pulumi.Resource] = []
        for ref in args.secrets:
            secret = aws.secretsmanager.Secret(
                f"{name}-secret-{ref.name.replace('_', '-')}",
                name=ref.id,
                description=f"gpugate {args.stack}: {ref.name}, read by the host at boot",
                recovery_window_in_days=0,  # a torn-down stack's names are free again at once
                tags=tags,
                opts=child,
            )
            versions.append(
                aws.secretsmanager.SecretVersion(
                    f"{name}-secret-{ref.name.replace('_', '-')}-value",
                    secret_id=secret.id,
                    secret_string=values[ref.name],
                    opts=child,
                )
            )
            stored.append(secret)

        role = aws.iam.Role(
            f"{name}-role",
            assume_role_policy=json.dumps(
                {
                    "Version": "2012-10-17",
                    "Statement": [{"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}],
                }
            ),
            description=f"gpugate {args.stack} host: its bundle and its secrets, nothing else",
            tags=tags,
            opts=child,
        )
        aws.iam.RolePolicy(
            f"{name}-boot",
            role=role.id,
            policy=pulumi.Output.all(bucket.arn, *[s.arn for s in stored]).apply(
                lambda arns: json.dumps(
                    {
                        "Version": "2012-10-17",
                        "Statement": [
                            {"Effect": "Allow", "Action": "s3:GetObject", "Resource": f"{arns[0]}/{args.object_key}"},
                            {"Effect": "Allow", "Action": "secretsmanager:GetSecretValue", "Resource": list(arns[1:])},
                        ],
                    },
                    sort_keys=True,
                )
            ),
            opts=child,
        )
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
        # public address (and the internet, through the gateway) from the first second.
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
            # An Elastic IP on an interface needs the VPC's internet gateway first.
            opts=pulumi.ResourceOptions.merge(child, pulumi.ResourceOptions(depends_on=ready)),
        )
        instance = aws.ec2.Instance(
            f"{name}-vm",
            ami=ami.id,
            instance_type=itype,
            primary_network_interface=aws.ec2.InstancePrimaryNetworkInterfaceArgs(network_interface_id=interface.id),
            iam_instance_profile=profile.name,
            key_name=spec.vm.ssh_key_name,
            # gzip: cloud-init unpacks it; AWS counts the 16 KiB before base64. No secret is in it.
            user_data_base64=args.user_data_base64,
            # cloud-init runs once per instance: a new bundle means a new host (interface, IP and DNS stay).
            user_data_replace_on_change=True,
            root_block_device=aws.ec2.InstanceRootBlockDeviceArgs(
                volume_type=ROOT_VOLUME_TYPE, volume_size=spec.vm.disk_gib, encrypted=True, delete_on_termination=True
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
                    # It boots into a routed subnet, with its public address, and finds its bundle and secrets.
                    depends_on=[*ready, eip, bundle_object, *versions],
                    # The interface holds one host at a time: the old host goes before the new one comes.
                    delete_before_replace=True,
                    # A newer AMI alone does not replace a running host; the next bundle change brings it.
                    ignore_changes=["ami"],
                ),
            ),
        )

        dns_zone = aws.route53.get_zone(name=spec.dns_zone, private_zone=False, opts=invoke)
        aws.route53.Record(
            f"{name}-dns", zone_id=dns_zone.zone_id, name=spec.domain, type="A", ttl=300, records=[eip.public_ip], opts=child
        )

        register_vm_outputs(self, args, eip.public_ip, instance.id, EIC_PROXY_COMMAND.format(region=spec.region))

    def _network(
        self,
        name: str,
        existing: str | None,
        zone: str,
        tags: dict[str, str],
        child: pulumi.ResourceOptions,
        invoke: pulumi.InvokeOptions,
    ) -> tuple[pulumi.Output[str], pulumi.Output[str], list[pulumi.Resource]]:
        """(subnet id, VPC id, what must exist before the host uses the internet): a dedicated public subnet,
        or one in `zone` of the named existing VPC (which already routes)."""
        if existing:
            vpc = aws.ec2.get_vpc(tags={"Name": existing}, opts=invoke)
            subnets = aws.ec2.get_subnets(
                filters=[
                    aws.ec2.GetSubnetsFilterArgs(name="vpc-id", values=[vpc.id]),
                    aws.ec2.GetSubnetsFilterArgs(name="availability-zone", values=[zone]),
                ],
                opts=invoke,
            )
            if not subnets.ids:
                raise ValueError(f"VPC {existing!r} has no subnet in {zone}, where the instance type is offered")
            return pulumi.Output.from_input(sorted(subnets.ids)[0]), pulumi.Output.from_input(vpc.id), []
        # The host's only public address is the Elastic IP.
        network = public_network(name, [PublicSubnet("", zone, SUBNET_CIDR)], tags, f"gpugate-{tags['gpugate:stack']}", child)
        return network.subnets[0].id, network.vpc.id, network.ready

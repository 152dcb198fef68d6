"""The AWS network a gateway gets when it brings its own: a VPC, an internet gateway, public subnets in
zones that offer the instance type, and their routes. Shared by the VM gateway and the EKS cluster."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pulumi
import pulumi_aws as aws

from infra.network import NETWORK_CIDR, WORLD_IPV4


@dataclass(frozen=True)
class PublicSubnet:
    """One subnet to make: a name suffix, its availability zone, its CIDR."""

    suffix: str
    zone: str
    cidr: str


@dataclass
class PublicNetwork:
    vpc: aws.ec2.Vpc
    gateway: aws.ec2.InternetGateway
    subnets: list[aws.ec2.Subnet]
    # Resources that must exist before anything uses the internet from a subnet (an Elastic IP on the
    # gateway, an instance booting with cloud-init): the gateway and each subnet's route association.
    ready: list[pulumi.Resource]


def zones_offering(instance_type: str, invoke: pulumi.InvokeOptions) -> list[str]:
    """The region's availability zones that offer `instance_type`, sorted; an error when none does."""
    offerings = aws.ec2.get_instance_type_offerings(
        filters=[aws.ec2.GetInstanceTypeOfferingsFilterArgs(name="instance-type", values=[instance_type])],
        location_type="availability-zone",
        opts=invoke,
    )
    zones = sorted(offerings.locations)
    if not zones:
        raise ValueError(f"no availability zone of this region offers {instance_type}; pick another region or gpu")
    return zones


def public_network(
    name: str,
    subnets: Sequence[PublicSubnet],
    tags: Mapping[str, str],
    vpc_name: str,
    child: pulumi.ResourceOptions,
    *,
    subnet_tags: Mapping[str, str] | None = None,
    public_ip_on_launch: bool = False,
) -> PublicNetwork:
    vpc = aws.ec2.Vpc(
        f"{name}-vpc",
        cidr_block=NETWORK_CIDR,
        enable_dns_support=True,
        enable_dns_hostnames=True,
        tags={**tags, "Name": vpc_name},
        opts=child,
    )
    gateway = aws.ec2.InternetGateway(f"{name}-igw", vpc_id=vpc.id, tags=dict(tags), opts=child)
    routes = aws.ec2.RouteTable(
        f"{name}-routes",
        vpc_id=vpc.id,
        routes=[aws.ec2.RouteTableRouteArgs(cidr_block=WORLD_IPV4, gateway_id=gateway.id)],
        tags=dict(tags),
        opts=child,
    )
    made: list[aws.ec2.Subnet] = []
    ready: list[pulumi.Resource] = [gateway]
    for spec in subnets:
        suffix = f"-{spec.suffix}" if spec.suffix else ""
        subnet = aws.ec2.Subnet(
            f"{name}-subnet{suffix}",
            vpc_id=vpc.id,
            cidr_block=spec.cidr,
            availability_zone=spec.zone,
            map_public_ip_on_launch=public_ip_on_launch,
            tags={**tags, **(subnet_tags or {})},
            opts=child,
        )
        ready.append(
            aws.ec2.RouteTableAssociation(f"{name}-routes-subnet{suffix}", subnet_id=subnet.id, route_table_id=routes.id, opts=child)
        )
        made.append(subnet)
    return PublicNetwork(vpc=vpc, gateway=gateway, subnets=made, ready=ready)

"""The AWS gateway (staging): what the Pulumi program asks AWS for, checked on the inputs the engine would get."""

from __future__ import annotations

import base64
import gzip
import json

import pulumi
import pytest

from gpugate.targets import render_bundle
from gpugate.spec import GpuSpec
from gpugate.stackfile import load_stack
from gpugate.vm.delivery import bucket_name
from infra.aws import AMI_NAME, AMI_OWNER, TYPE_TOKEN, AwsGateway, args_from_bundle
from gpugate.catalog import machine
from infra.vm import VmGatewayArgs
from infra.offline import record
from infra.program import gateway
from tests.infra.conftest import of_type, one, under_mocks

INSTANCE = "aws:ec2/instance:Instance"
INGRESS = "aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule"


def test_staging_is_one_gateway_component_whose_resources_are_all_its_children(staging):
    component = one(staging, TYPE_TOKEN)
    children = [r for r in staging.resources if r.type not in ("pulumi:pulumi:Stack", TYPE_TOKEN)]
    assert children
    assert all(f"{TYPE_TOKEN}$" in r.urn for r in children), [r.urn for r in children if TYPE_TOKEN not in r.urn]
    assert component.name == "gpugate-staging"


def test_staging_vm_is_the_catalog_type_with_an_encrypted_gp3_root_of_the_spec_size_and_imdsv2_only(staging):
    vm = one(staging, INSTANCE).props
    assert vm["instanceType"] == "g6.xlarge"
    assert vm["rootBlockDevice"] == {
        "volumeType": "gp3",
        "volumeSize": 200,
        "encrypted": True,
        "deleteOnTermination": True,
    }
    assert vm["metadataOptions"] == {"httpEndpoint": "enabled", "httpTokens": "required", "httpPutResponseHopLimit": 1}
    assert "instanceMarketOptions" not in vm  # staging is on-demand
    assert vm["userDataReplaceOnChange"] is True


def test_the_ami_is_the_newest_official_debian_12_ami(staging, monkeypatch):
    # given the planner's mocks, which record each data-source call
    from infra import offline

    calls = []
    original = offline.PlanMocks.call
    monkeypatch.setattr(offline.PlanMocks, "call", lambda self, args: calls.append(args) or original(self, args))
    # when the program runs
    run = record(load_stack("staging"))
    # then it looked the AMI up by owner and name and boots from what the lookup returned
    ami = next(c.args for c in calls if c.token == "aws:ec2/getAmi:getAmi")
    assert ami["owners"] == [AMI_OWNER] and ami["mostRecent"] is True
    assert {"name": "name", "values": [AMI_NAME]} in ami["filters"]
    assert one(run, INSTANCE).props["ami"] == "ami-0planned00000000"


def test_staging_opens_exactly_80_and_443_to_the_world_and_ssh_only_to_the_admin_network(staging):
    rules = {
        (r.props["ipProtocol"], r.props["fromPort"], r.props["toPort"], r.props["cidrIpv4"])
        for r in of_type(staging, INGRESS)
    }
    assert rules == {("tcp", 80, 80, "0.0.0.0/0"), ("tcp", 443, 443, "0.0.0.0/0"), ("tcp", 22, 22, "203.0.113.0/24")}
    assert not one(staging, "aws:ec2/securityGroup:SecurityGroup").props.get("ingress")  # no inline rules beside them


def test_without_admin_networks_ssh_comes_only_through_the_instance_connect_endpoint(stack_copy):
    # given staging with admin_cidrs emptied
    path = stack_copy("staging", lambda c: c.__setitem__("gpugate:admin_cidrs", []), name="nossh")
    # when planned
    run = record(load_stack(path))
    # then the world reaches only the web ports; 22 only from the endpoint's security group
    world = {r.props["fromPort"] for r in of_type(run, INGRESS) if r.props.get("cidrIpv4")}
    assert world == {80, 443}
    (ssh,) = [r for r in of_type(run, INGRESS) if r.props["fromPort"] == 22]
    endpoint = one(run, "aws:ec2transitgateway/instanceConnectEndpoint:InstanceConnectEndpoint")
    assert "cidrIpv4" not in ssh.props and ssh.props["referencedSecurityGroupId"] in endpoint.props["securityGroupIds"]
    assert run.outputs["ssh_host"][0].startswith("gpugate-nossh-vm")
    assert run.outputs["ssh_proxy_command"][0].startswith("aws ec2-instance-connect open-tunnel --instance-id %h")


def test_the_host_role_reads_its_bundle_object_and_its_secrets_and_nothing_else(staging):
    assert not of_type(staging, "aws:iam/rolePolicyAttachment:RolePolicyAttachment")  # no managed policy
    (policy,) = of_type(staging, "aws:iam/rolePolicy:RolePolicy")
    statements = json.loads(policy.props["policy"])["Statement"]
    assert len(statements) == 2
    s3, secrets = statements
    bundle = one(staging, "aws:s3/bucketObjectv2:BucketObjectv2").props
    assert s3 == {"Effect": "Allow", "Action": "s3:GetObject", "Resource": f"arn:aws:s3::000000000000:gpugate-staging-bundles/{bundle['key']}"}
    stored = of_type(staging, "aws:secretsmanager/secret:Secret")
    assert len(stored) == 2 and {s.props["name"] for s in stored} == {"gpugate/staging/vllm_api_key", "gpugate/staging/alert_credential"}
    assert secrets["Action"] == "secretsmanager:GetSecretValue" and len(secrets["Resource"]) == 2
    trust = json.loads(one(staging, "aws:iam/role:Role").props["assumeRolePolicy"])
    assert trust["Statement"] == [{"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}]


def test_the_bundle_is_a_private_encrypted_object_named_by_its_sha256_in_the_stack_bucket(staging):
    stack = load_stack("staging")
    bucket = one(staging, "aws:s3/bucketV2:BucketV2").props
    assert bucket["bucket"] == bucket_name(stack.spec, stack.name)
    block = one(staging, "aws:s3/bucketPublicAccessBlock:BucketPublicAccessBlock").props
    assert all(block[k] is True for k in ("blockPublicAcls", "blockPublicPolicy", "ignorePublicAcls", "restrictPublicBuckets"))
    assert one(staging, "aws:s3/bucketServerSideEncryptionConfigurationV2:BucketServerSideEncryptionConfigurationV2")
    key = one(staging, "aws:s3/bucketObjectv2:BucketObjectv2").props["key"]
    assert key.startswith("bundles/") and key.endswith(".tar.gz") and len(key) == len("bundles/") + 64 + len(".tar.gz")


def test_secret_values_are_pulumi_secrets_and_user_data_carries_none(staging):
    for version in of_type(staging, "aws:secretsmanager/secretVersion:SecretVersion"):
        assert version.wire["secretString"]["4dabf18193072939515e22adb298388d"] == "1b47061264138c4ac30d75fd1eb44270"
    user_data = gzip.decompress(base64.b64decode(one(staging, INSTANCE).props["userDataBase64"])).decode()
    assert user_data.startswith("#cloud-config")
    assert not any(canary in user_data for canary in staging.canaries)


def test_the_elastic_ip_waits_for_the_internet_gateway_and_the_host_for_routes_bundle_and_secrets(staging):
    by_urn = {r.urn: r for r in staging.resources}

    def waits_for(resource, kind: str) -> bool:
        return any(by_urn[u].type == kind for u in resource.dependencies if u in by_urn)

    eip = one(staging, "aws:ec2/eip:Eip")
    assert waits_for(eip, "aws:ec2/internetGateway:InternetGateway")
    vm = one(staging, INSTANCE)
    for kind in (
        "aws:ec2/routeTableAssociation:RouteTableAssociation",
        "aws:ec2/internetGateway:InternetGateway",
        "aws:s3/bucketObjectv2:BucketObjectv2",
        "aws:secretsmanager/secretVersion:SecretVersion",
    ):
        assert waits_for(vm, kind), kind


def test_the_domain_points_at_the_elastic_ip_which_sits_on_the_host_interface_from_boot(staging):
    eip = one(staging, "aws:ec2/eip:Eip")
    record_ = one(staging, "aws:route53/record:Record").props
    assert record_["name"] == "llm.staging.gpugate.example.com" and record_["type"] == "A"
    assert record_["records"] == [staging.outputs["public_ip"][0]]
    nic = one(staging, "aws:ec2/networkInterface:NetworkInterface")
    assert eip.props["networkInterface"].startswith(nic.name)
    assert "networkInterfaces" not in one(staging, INSTANCE).props  # deprecated in the provider
    assert one(staging, INSTANCE).props["primaryNetworkInterface"] == {"networkInterfaceId": eip.props["networkInterface"]}


def test_the_subnet_is_in_an_availability_zone_that_offers_the_instance_type(staging):
    assert one(staging, "aws:ec2/subnet:Subnet").props["availabilityZone"] == "us-east-1a"
    assert one(staging, "aws:ec2/subnet:Subnet").props["mapPublicIpOnLaunch"] is False


def test_the_vm_is_tagged_with_the_bundle_hash_it_boots(staging):
    bundle = render_bundle(load_stack("staging"))
    assert one(staging, INSTANCE).props["tags"]["gpugate:bundle-sha256"] == bundle.bundle_sha256
    assert staging.outputs["bundle_sha256"] == (bundle.bundle_sha256, False)


def test_a_spot_stack_asks_for_persistent_spot_capacity_that_stops_when_interrupted(stack_copy):
    path = stack_copy("staging", lambda c: c["gpugate:vm"].__setitem__("spot", True), name="spot")
    vm = one(record(load_stack(path)), INSTANCE).props
    assert vm["instanceMarketOptions"] == {
        "marketType": "spot",
        "spotOptions": {"spotInstanceType": "persistent", "instanceInterruptionBehavior": "stop"},
    }


def test_stack_outputs_are_plain_and_the_vllm_key_is_secret():
    stack = load_stack("staging")

    def check():
        component = gateway(stack)
        outputs = [component.url, component.public_ip, component.ssh_host, component.bundle_sha256]
        return pulumi.Output.all(component.vllm_api_key.is_secret(), *[o.is_secret() for o in outputs]).apply(
            lambda flags: _assert_secrets(flags[:1], flags[1:])
        )

    under_mocks(stack, check)


def _assert_secrets(secret: list[bool], plain: list[bool]) -> None:
    assert secret == [True]
    assert plain == [False] * len(plain)


def test_an_instance_type_the_catalog_does_not_map_is_refused_by_the_component():
    # given a spec that slipped past validation with 2 x L4 (AWS has 1, 4 or 8)
    stack = load_stack("staging")
    bad = stack.spec.model_copy(update={"gpu": GpuSpec.model_construct(type="L4", count=2)})
    # then the component's own backstop names the allowed counts
    with pytest.raises(ValueError, match=r"AWS has no machine with 2 x L4; allowed gpu.count: 1 \(g6.xlarge\), 4"):
        machine("aws", bad.gpu.type, bad.gpu.count)
    args = args_from_bundle(stack, render_bundle(stack))
    with pytest.raises(ValueError, match="AWS has no machine with 2 x L4"):
        under_mocks(stack, lambda: AwsGateway("bad", VmGatewayArgs(**{**args.__dict__, "spec": bad})).url)


def test_a_new_bundle_replaces_the_host_but_a_newer_ami_alone_does_not(staging):
    vm = one(staging, INSTANCE)
    assert vm.props["userDataReplaceOnChange"] is True
    assert vm.delete_before_replace  # the interface and its IP move to the new host
    assert vm.ignore_changes == ("ami",)


def test_a_named_existing_vpc_is_looked_up_and_no_network_is_created(stack_copy):
    path = stack_copy("staging", lambda c: c["gpugate:vm"].__setitem__("network", "shared"), name="shared")
    run = record(load_stack(path))
    for created in ("aws:ec2/vpc:Vpc", "aws:ec2/subnet:Subnet", "aws:ec2/internetGateway:InternetGateway"):
        assert not of_type(run, created)
    assert one(run, "aws:ec2/securityGroup:SecurityGroup").props["vpcId"] == "vpc-0planned"
    assert one(run, "aws:ec2/networkInterface:NetworkInterface").props["subnetId"] == "subnet-0planned"

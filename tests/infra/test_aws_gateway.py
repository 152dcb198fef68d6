"""The AWS gateway (staging): what the Pulumi program asks AWS for, checked on the inputs the engine would get."""

from __future__ import annotations

import json

import pulumi
import pytest

from gpugate.targets import render_bundle
from gpugate.spec import GpuSpec
from gpugate.stackfile import load_stack
from infra.aws import AMI_NAME, SSM_POLICY_ARN, TYPE_TOKEN, AwsGateway, AwsGatewayArgs, instance_type
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


def test_the_ami_is_the_newest_amazon_deep_learning_base_ami(staging, monkeypatch):
    # given the planner's mocks, which record each data-source call
    from infra import offline

    calls = []
    original = offline.PlanMocks.call
    monkeypatch.setattr(offline.PlanMocks, "call", lambda self, args: calls.append(args) or original(self, args))
    # when the program runs
    run = record(load_stack("staging"))
    # then it looked the AMI up by owner and name and boots from what the lookup returned
    ami = next(c.args for c in calls if c.token == "aws:ec2/getAmi:getAmi")
    assert ami["owners"] == ["amazon"] and ami["mostRecent"] is True
    assert {"name": "name", "values": [AMI_NAME]} in ami["filters"]
    assert one(run, INSTANCE).props["ami"] == "ami-0planned00000000"


def test_staging_opens_exactly_80_and_443_to_the_world_and_ssh_only_to_the_admin_network(staging):
    rules = {
        (r.props["ipProtocol"], r.props["fromPort"], r.props["toPort"], r.props["cidrIpv4"])
        for r in of_type(staging, INGRESS)
    }
    assert rules == {("tcp", 80, 80, "0.0.0.0/0"), ("tcp", 443, 443, "0.0.0.0/0"), ("tcp", 22, 22, "203.0.113.0/24")}
    assert not one(staging, "aws:ec2/securityGroup:SecurityGroup").props.get("ingress")  # no inline rules beside them


def test_without_admin_networks_there_is_no_ssh_rule_and_ssh_goes_through_session_manager(stack_copy):
    # given staging with admin_cidrs emptied
    path = stack_copy("staging", lambda c: c.__setitem__("gpugate:admin_cidrs", []), name="nossh")
    # when planned
    run = record(load_stack(path))
    # then only the web ports are open, and the SSH host is the instance, reached through SSM
    assert {r.props["fromPort"] for r in of_type(run, INGRESS)} == {80, 443}
    instance_id = run.outputs["ssh_host"][0]
    assert instance_id.startswith("gpugate-nossh-vm")
    assert run.outputs["ssh_proxy_command"][0].startswith("aws ssm start-session --target %h")


def test_the_host_role_may_only_do_session_manager(staging):
    attachments = of_type(staging, "aws:iam/rolePolicyAttachment:RolePolicyAttachment")
    assert [a.props["policyArn"] for a in attachments] == [SSM_POLICY_ARN]
    assert not of_type(staging, "aws:iam/rolePolicy:RolePolicy")  # no inline policies either
    trust = json.loads(one(staging, "aws:iam/role:Role").props["assumeRolePolicy"])
    assert trust["Statement"] == [
        {"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}
    ]


def test_the_domain_points_at_the_elastic_ip_which_sits_on_the_host_interface_from_boot(staging):
    eip = one(staging, "aws:ec2/eip:Eip")
    record_ = one(staging, "aws:route53/record:Record").props
    assert record_["name"] == "llm.staging.gpugate.example.com" and record_["type"] == "A"
    assert record_["records"] == [staging.outputs["public_ip"][0]]
    nic = one(staging, "aws:ec2/networkInterface:NetworkInterface")
    assert eip.props["networkInterface"].startswith(nic.name)
    attached = one(staging, INSTANCE).props["networkInterfaces"]
    assert attached == [{"deviceIndex": 0, "networkInterfaceId": eip.props["networkInterface"]}]


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


def test_stack_outputs_are_plain_and_the_user_data_and_vllm_key_are_secret():
    stack = load_stack("staging")

    def check():
        component = gateway(stack)
        outputs = [component.url, component.public_ip, component.ssh_host, component.bundle_sha256]
        return pulumi.Output.all(
            component.user_data.is_secret(), component.vllm_api_key.is_secret(), *[o.is_secret() for o in outputs]
        ).apply(lambda flags: _assert_secrets(flags[:2], flags[2:]))

    under_mocks(stack, check)


def _assert_secrets(secret: list[bool], plain: list[bool]) -> None:
    assert secret == [True, True]
    assert plain == [False] * len(plain)


def test_an_instance_type_the_catalog_does_not_map_is_refused_by_the_component():
    # given a spec that slipped past validation with 2 x L4 (AWS has 1, 4 or 8)
    stack = load_stack("staging")
    bad = stack.spec.model_copy(update={"gpu": GpuSpec.model_construct(type="L4", count=2)})
    # then the component's own backstop names the allowed counts
    with pytest.raises(ValueError, match=r"AWS has no instance with 2 x L4; allowed gpu.count: 1 \(g6.xlarge\), 4"):
        instance_type(bad)
    args = AwsGatewayArgs.from_bundle(stack, render_bundle(stack))
    with pytest.raises(ValueError, match="AWS has no instance with 2 x L4"):
        under_mocks(stack, lambda: AwsGateway("bad", AwsGatewayArgs(**{**args.__dict__, "spec": bad})).url)


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

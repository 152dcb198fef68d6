"""The EKS cluster under mocks: Cluster Autoscaler wired to the GPU node group, add-ons after the nodes they need,
subnets in zones that offer the GPU machine, and how the API server is reached."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

from gpugate.cli.plan import plan
from gpugate.kubernetes.checks import check_object
from gpugate.stackfile import load_stack
from gpugate.targets import render_bundle
from infra.offline import PlanMocks, Run, record
from tests.conftest import PINNED_DIGEST, edit_stack
from tests.infra.conftest import of_type, one
from tests.infra.test_kubernetes_gateway import eks_variant

CLUSTER = "gpugate-prod"  # prod's kubernetes.cluster_name
NAME = "gpugate-prodeks"  # the component's resource names, from the stack's name
GROUP = "aws:eks/nodeGroup:NodeGroup"
ADDON = "aws:eks/addon:Addon"


def eks_stack(tmp: Path, *more: Any):
    def change(config: dict[str, Any]) -> None:
        eks_variant(config)
        for extra in more:
            extra(config)

    return load_stack(edit_stack("prod", tmp / "Pulumi.prodeks.yaml", change))


@pytest.fixture(scope="module")
def eks(tmp_path_factory) -> Run:
    return record(eks_stack(tmp_path_factory.mktemp("eks")))


def named(run: Run, type_token: str, suffix: str):
    return next(r for r in of_type(run, type_token) if r.name.endswith(suffix))


def k8s(run: Run, kind: str, name: str):
    return next(r for r in run.resources if r.type.endswith(f":{kind}") and r.props["metadata"]["name"] == name)


# ---- Cluster Autoscaler ------------------------------------------------------------------------------


def test_both_node_groups_carry_the_autoscaler_discovery_tags_and_the_gpu_group_the_replica_bounds(eks):
    for group in of_type(eks, GROUP):
        tags = group.props["tags"]
        assert tags["k8s.io/cluster-autoscaler/enabled"] == "true"
        assert tags[f"k8s.io/cluster-autoscaler/{CLUSTER}"] == "owned"
    scaling = named(eks, GROUP, "-gpu").props["scalingConfig"]
    # replicas 2..8 in prod, one node more for a rollout's surge pod
    assert (scaling["minSize"], scaling["desiredSize"], scaling["maxSize"]) == (2, 2, 9)


def test_the_autoscaler_finds_this_cluster_groups_by_their_tags_and_waits_out_a_vllm_drain(eks):
    deployment = k8s(eks, "Deployment", "cluster-autoscaler").props
    assert deployment["metadata"]["namespace"] == "kube-system"
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["image"] == "registry.k8s.io/autoscaling/cluster-autoscaler@" + PINNED_DIGEST  # the stack's pin
    assert "--cloud-provider=aws" in container["command"]
    assert (
        f"--node-group-auto-discovery=asg:tag=k8s.io/cluster-autoscaler/enabled,k8s.io/cluster-autoscaler/{CLUSTER}"
        in container["command"]
    )
    # vLLM's grace period is drain_seconds + 30 (300 + 30 in prod): a node is not taken from under a draining replica
    assert "--max-graceful-termination-sec=330" in container["command"]
    assert {"name": "AWS_REGION", "value": "us-east-1"} in container["env"]
    assert pod["nodeSelector"] == {"gpugate.dev/pool": "system"} and pod["serviceAccountName"] == "cluster-autoscaler"


def test_the_autoscaler_service_account_assumes_a_role_only_it_can_assume_that_resizes_only_this_cluster_groups(eks):
    role = named(eks, "aws:iam/role:Role", "-autoscaler")
    account = k8s(eks, "ServiceAccount", "cluster-autoscaler").props
    assert account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].endswith(f"{NAME}-eks-autoscaler")
    # trust: the cluster's OIDC provider, for kube-system/cluster-autoscaler's token only
    oidc = one(eks, "aws:iam/openIdConnectProvider:OpenIdConnectProvider")
    assert oidc.props["clientIdLists"] == ["sts.amazonaws.com"]
    [statement] = json.loads(role.props["assumeRolePolicy"])["Statement"]
    assert statement["Action"] == "sts:AssumeRoleWithWebIdentity"
    assert statement["Principal"]["Federated"].endswith(f"{NAME}-eks-oidc")
    host = oidc.props["url"].removeprefix("https://")
    assert statement["Condition"]["StringEquals"] == {
        f"{host}:sub": "system:serviceaccount:kube-system:cluster-autoscaler",
        f"{host}:aud": "sts.amazonaws.com",
    }
    # permissions: resize and terminate only groups tagged as this cluster's
    policy = json.loads(named(eks, "aws:iam/rolePolicy:RolePolicy", "-autoscaler").props["policy"])
    write = next(s for s in policy["Statement"] if "autoscaling:SetDesiredCapacity" in s["Action"])
    assert write["Condition"]["StringEquals"] == {
        "aws:ResourceTag/k8s.io/cluster-autoscaler/enabled": "true",
        f"aws:ResourceTag/k8s.io/cluster-autoscaler/{CLUSTER}": "owned",
    }
    read = next(s for s in policy["Statement"] if s is not write)
    assert "eks:DescribeNodegroup" in read["Action"] and not any("Set" in a or "Terminate" in a for a in read["Action"])


def test_the_autoscaler_objects_render_and_pass_the_schemas_of_the_cluster_version(tmp_path):
    bundle = render_bundle(eks_stack(tmp_path))
    yaml = YAML(typ="safe", pure=True)
    rendered = {p: yaml.load(d) for p, d in bundle.files.items() if "autoscaler" in p}
    assert sorted(rendered) == [
        "kubernetes/cluster/clusterrole-cluster-autoscaler.yaml",
        "kubernetes/cluster/clusterrolebinding-cluster-autoscaler.yaml",
        "kubernetes/kube-system/deployment-cluster-autoscaler.yaml",
        "kubernetes/kube-system/role-cluster-autoscaler.yaml",
        "kubernetes/kube-system/rolebinding-cluster-autoscaler.yaml",
        "kubernetes/kube-system/serviceaccount-cluster-autoscaler.yaml",
    ]
    for path, obj in rendered.items():
        assert check_object(obj, "1.30") == [], path
    # and GKE (prod as it is) gets none: its node pools autoscale themselves
    assert not [p for p in render_bundle(load_stack("prod")).files if "autoscaler" in p]


def test_the_autoscaler_pod_fits_the_system_pool_in_the_plan(tmp_path):
    fitting = lambda config: config["gpugate:kubernetes"].__setitem__("gpu_machine_type", "g6.2xlarge")  # noqa: E731
    report = plan(eks_stack(tmp_path, fitting))
    assert report.ok, report.errors
    assert ("cluster-autoscaler", "m6i.large", True) in [(f.pod, f.machine_type, f.fits) for f in report.node_fits]


def test_an_eks_stack_without_an_autoscaler_image_is_refused_naming_the_field(tmp_path):
    from gpugate.stackfile import SpecError

    with pytest.raises(SpecError, match=r"kubernetes.images.cluster_autoscaler: EKS needs the Cluster Autoscaler image .*v1.30.x"):
        eks_stack(tmp_path, lambda config: config["gpugate:kubernetes"]["images"].pop("cluster_autoscaler"))


# ---- add-ons and the nodes they need -----------------------------------------------------------------


def test_the_vpc_cni_comes_before_the_nodes_and_every_other_addon_after_both_node_groups(eks):
    order = [r.name for r in eks.resources]
    groups = of_type(eks, GROUP)
    addons = {r.props["addonName"]: r for r in of_type(eks, ADDON)}
    assert set(addons) == {"vpc-cni", "kube-proxy", "coredns"}
    cni = addons.pop("vpc-cni")
    assert json.loads(cni.props["configurationValues"]) == {"enableNetworkPolicy": "true"}
    for group in groups:
        # registered after the CNI, and waiting for it
        assert order.index(group.name) > order.index(cni.name) and cni.urn in group.dependencies
    for name, addon in addons.items():
        # registered after both groups, and waiting for them: a Deployment add-on with no node would sit DEGRADED
        assert all(order.index(addon.name) > order.index(g.name) for g in groups), name
        assert {g.urn for g in groups} <= set(addon.dependencies), name
        assert addon.props["resolveConflictsOnCreate"] == "OVERWRITE"


# ---- zones from the offering lookup ------------------------------------------------------------------


def offered_in(zones: list[str]):
    def call(self, args):
        if args.token == "aws:ec2/getInstanceTypeOfferings:getInstanceTypeOfferings":
            itype = args.args["filters"][0]["values"][0]
            assert itype == "g6.xlarge", itype  # asked for the GPU machine
            return {"id": "us-east-1", "instanceTypes": [itype] * len(zones), "locations": zones,
                    "locationTypes": ["availability-zone"] * len(zones)}
        return original(self, args)

    original = PlanMocks.call
    return call


def test_the_subnets_go_to_the_first_two_zones_that_offer_the_gpu_machine(tmp_path, monkeypatch):
    # given g6.xlarge offered only in us-east-1c, -1d and -1f (not in a and b)
    monkeypatch.setattr(PlanMocks, "call", offered_in(["us-east-1f", "us-east-1d", "us-east-1c"]))
    run = record(eks_stack(tmp_path))
    subnets = of_type(run, "aws:ec2/subnet:Subnet")
    assert sorted(s.props["availabilityZone"] for s in subnets) == ["us-east-1c", "us-east-1d"]
    assert sorted(s.name for s in subnets) == [f"{NAME}-eks-subnet-c", f"{NAME}-eks-subnet-d"]
    # the node groups and the NLB's addresses follow the subnets
    assert sorted(e.name for e in of_type(run, "aws:ec2/eip:Eip")) == [f"{NAME}-eks-ip-c", f"{NAME}-eks-ip-d"]
    assert len(named(run, GROUP, "-gpu").props["subnetIds"]) == 2


def test_a_region_with_one_zone_offering_the_gpu_machine_is_refused_naming_it(tmp_path, monkeypatch):
    monkeypatch.setattr(PlanMocks, "call", offered_in(["us-east-1d"]))
    with pytest.raises(ValueError, match="EKS needs two availability zones and only us-east-1d of us-east-1 offers g6.xlarge"):
        record(eks_stack(tmp_path))


# ---- API access --------------------------------------------------------------------------------------


def test_with_admin_networks_the_api_endpoint_is_public_to_them_only_and_the_plan_says_nothing(eks, tmp_path):
    vpc = one(eks, "aws:eks/cluster:Cluster").props["vpcConfig"]
    assert vpc["endpointPublicAccess"] is True and vpc["endpointPrivateAccess"] is True
    assert vpc["publicAccessCidrs"] == ["203.0.113.0/24"]


def test_without_admin_networks_the_endpoint_is_private_and_plan_and_validate_say_what_to_run_from_inside_the_vpc(tmp_path):
    from gpugate.validate import api_access_verdicts

    stack = eks_stack(tmp_path, lambda config: config.pop("gpugate:admin_cidrs"), lambda c: c["gpugate:kubernetes"].__setitem__("gpu_machine_type", "g6.2xlarge"))
    run = record(stack)
    vpc = one(run, "aws:eks/cluster:Cluster").props["vpcConfig"]
    assert vpc["endpointPublicAccess"] is False and vpc["endpointPrivateAccess"] is True
    assert "publicAccessCidrs" not in vpc
    report = plan(stack)
    # a private endpoint is allowed (the policy pack passes), but the plan warns how pulumi up must then run
    assert report.ok and report.violations == []
    [warning] = [w for w in report.warnings if "admin_cidrs" in w]
    assert "EKS API endpoint is private" in warning and "run `pulumi up -s prodeks` and kubectl from a machine inside the VPC" in warning
    [verdict] = api_access_verdicts(stack)
    assert verdict.warning and verdict.ok and verdict.detail == warning
    # and with admin networks there is nothing to say
    assert api_access_verdicts(eks_stack(tmp_path)) == []

"""The policy pack: every stack passes it, and a deliberately bad variant of each rule is caught.

The bad variants are real recorded resources with one property changed, fed to the pack's own
validate functions the way `pulumi up --policy-pack` and `gpugate plan` feed them.
"""

from __future__ import annotations

import base64
import copy
import gzip
import io
import os
import subprocess
import sys
from collections.abc import Callable

import grpc
import pytest
from ruamel.yaml import YAML
from google.protobuf import empty_pb2, json_format, struct_pb2
from pulumi.runtime.proto import analyzer_pb2, analyzer_pb2_grpc

from gpugate.cli.plan import plan_stack
from gpugate.images import PLACEHOLDER_DIGEST, is_placeholder, stack_images
from infra.policy.evaluate import evaluate_policies
from gpugate.spec import Target
from gpugate.stackfile import load_stack, stack_names
from infra.offline import Recorded, Run
from infra.policy.rules import K8S_SERVICE, RULES
from tests.conftest import REPO
from tests.infra.conftest import of_type, one

AWS_INSTANCE = "aws:ec2/instance:Instance"
AWS_INGRESS = "aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule"
GCP_INSTANCE = "gcp:compute/instance:Instance"
FIREWALL = "gcp:compute/firewall:Firewall"


def changed(resource: Recorded, change: Callable[[dict], None]) -> Recorded:
    wire = copy.deepcopy(resource.wire)
    change(wire)
    return Recorded(type=resource.type, name=resource.name, urn=resource.urn, custom=True, wire=wire)


def broken_rules(resource: Recorded) -> dict[str, list[str]]:
    """policy name -> messages, for the rules the resource breaks."""
    found: dict[str, list[str]] = {}
    for verdict in evaluate_policies([resource]):
        for violation in verdict.violations:
            found.setdefault(violation.policy, []).append(violation.message)
    return found


def named(run: Run, type_token: str, name_part: str) -> Recorded:
    return next(r for r in of_type(run, type_token) if name_part in r.name)


PLANNED_STACKS = [name for name in stack_names() if load_stack(name).spec.target is not Target.LOCAL]


@pytest.mark.parametrize("stack", PLANNED_STACKS)
def test_every_cloud_stack_in_stacks_passes_every_rule_of_the_policy_pack(stack):
    report = plan_stack(stack)
    # every rule ran over every resource the program asks for ...
    assert report.planned
    assert {v.policy for v in report.policies} >= {rule.name for rule in RULES}
    assert all(v.checked > 5 for v in report.policies)
    # ... and none found anything but the images the stack marks as placeholders (prod's, until pinned)
    placeholders = {ref for _, ref in stack_images(load_stack(stack).spec) if is_placeholder(ref)}
    assert [v for v in report.violations if v.policy != "images-pinned"] == []
    flagged = {ref for ref in placeholders if any(ref in v.message for v in report.violations)}
    assert flagged == (placeholders if load_stack(stack).spec.target is Target.KUBERNETES else set())


def test_the_local_stack_is_not_planned_so_the_pack_judges_nothing_there():
    # Pulumi provisions nothing for the local target: an empty verdict list would prove nothing,
    # so the report must say it did not plan (the local stack's exposure is tested in test_caddy.py).
    report = plan_stack("local")
    assert not report.planned and report.policies == []
    assert "local target" in report.note
    assert len(PLANNED_STACKS) == len(stack_names()) - 1


# ---- web-only-from-world -------------------------------------------------------------------


def test_a_security_group_rule_opening_another_port_to_the_world_is_caught(staging):
    http = named(staging, AWS_INGRESS, "in-http")
    assert broken_rules(http) == {}
    bad = changed(http, lambda w: w.update(fromPort=8000.0, toPort=8000.0))
    assert list(broken_rules(bad)) == ["web-only-from-world"]
    assert "tcp port 8000 from 0.0.0.0/0" in broken_rules(bad)["web-only-from-world"][0]


def test_an_inline_security_group_ingress_of_all_traffic_from_ipv6_anywhere_is_caught(staging):
    group = one(staging, "aws:ec2/securityGroup:SecurityGroup")
    everything = {"protocol": "-1", "fromPort": 0.0, "toPort": 0.0, "ipv6CidrBlocks": ["::/0"]}
    bad = changed(group, lambda w: w.update(ingress=[everything]))
    assert "web-only-from-world" in broken_rules(bad)


def test_a_gcp_firewall_without_source_ranges_is_open_to_the_world_and_caught(dev):
    http = named(dev, FIREWALL, "in-http")
    bad = changed(
        http, lambda w: (w.pop("sourceRanges"), w.update(allows=[{"protocol": "tcp", "ports": ["80", "8080-8090"]}]))
    )
    assert list(broken_rules(bad)) == ["web-only-from-world"]


def test_a_non_web_port_open_to_two_halves_of_the_address_space_is_the_world_and_caught(staging, dev):
    # given a non-web port open to 0.0.0.0/1 + 128.0.0.0/1: every address, written as two networks
    halves = ["0.0.0.0/1", "128.0.0.0/1"]
    group = one(staging, "aws:ec2/securityGroup:SecurityGroup")
    port_8000 = {"protocol": "tcp", "fromPort": 8000.0, "toPort": 8000.0, "cidrBlocks": halves}
    aws = changed(group, lambda w: w.update(ingress=[port_8000]))
    firewall = named(dev, FIREWALL, "in-http")
    gcp = changed(firewall, lambda w: w.update(sourceRanges=halves, allows=[{"protocol": "tcp", "ports": ["8000"]}]))
    # then both clouds' rules break web-only-from-world
    assert list(broken_rules(aws)) == ["web-only-from-world"]
    assert list(broken_rules(gcp)) == ["web-only-from-world"]
    assert "tcp port 8000 from 0.0.0.0/1, 128.0.0.0/1" in broken_rules(gcp)["web-only-from-world"][0]


@pytest.mark.parametrize(
    ("sources", "world"),
    [
        (["10.0.0.0/8"], False),  # the largest private range: the bound itself
        (["10.0.0.0/9", "10.128.0.0/9"], False),  # a /8 in two pieces
        (["10.0.0.0/8", "10.1.0.0/16"], False),  # overlaps count once
        (["10.0.0.0/7"], True),
        (["10.0.0.0/8", "11.0.0.0/8"], True),  # two /8s together
        (["2001:db8::/32"], False),
        (["2001:db8::/31"], True),
        (["not-a-network"], True),  # unbounded: a typo must not open a port quietly
    ],
)
def test_world_means_more_addresses_than_a_slash_8_alone_or_together(dev, sources, world):
    firewall = named(dev, FIREWALL, "in-http")
    variant = changed(firewall, lambda w: w.update(sourceRanges=sources, allows=[{"protocol": "tcp", "ports": ["8000"]}]))
    assert ("web-only-from-world" in broken_rules(variant)) is world


# ---- kubernetes-web-only-exposed --------------------------------------------------------------


def _service(kind: str, ports: list[dict], **spec: object) -> Recorded:
    wire = {"metadata": {"name": "debug", "namespace": "gpugate"}, "spec": {"type": kind, "ports": ports, **spec}}
    urn = "urn:pulumi:prod::gpugate::kubernetes:core/v1:Service::debug"
    return Recorded(type=K8S_SERVICE, name="debug", urn=urn, custom=True, wire=wire)


def test_a_node_port_service_is_caught_whatever_its_port():
    # given NodePort Services: one letting the cluster pick the node port, one on 8443, one on a web port
    allocated = _service("NodePort", [{"port": 443, "protocol": "TCP"}])
    chosen = _service("NodePort", [{"port": 80, "nodePort": 30443.0, "protocol": "TCP"}])
    web = _service("NodePort", [{"port": 443, "nodePort": 443.0, "protocol": "TCP"}])
    # then each that opens anything but 80/443 on the nodes is caught
    assert list(broken_rules(allocated)) == ["kubernetes-web-only-exposed"]
    assert "allocated from 30000-32767" in broken_rules(allocated)["kubernetes-web-only-exposed"][0]
    assert "nodePort 30443" in broken_rules(chosen)["kubernetes-web-only-exposed"][0]
    assert broken_rules(web) == {}


def test_a_load_balancer_on_a_non_web_port_is_caught_even_from_a_narrow_source_range():
    narrow = _service("LoadBalancer", [{"port": 9090, "protocol": "TCP"}], loadBalancerSourceRanges=["10.1.0.0/16"])
    web = _service("LoadBalancer", [{"port": 80, "protocol": "TCP"}, {"port": 443, "protocol": "TCP"}])
    internal = _service("ClusterIP", [{"port": 9090, "protocol": "TCP"}])
    assert list(broken_rules(narrow)) == ["kubernetes-web-only-exposed"]
    assert broken_rules(web) == {} and broken_rules(internal) == {}


# ---- images-pinned ---------------------------------------------------------------------------


def _deployment(*images: str) -> Recorded:
    containers = [{"name": f"c{i}", "image": image} for i, image in enumerate(images)]
    wire = {"metadata": {"name": "gateway", "namespace": "gpugate"}, "spec": {"template": {"spec": {"containers": containers}}}}
    urn = "urn:pulumi:prod::gpugate::kubernetes:apps/v1:Deployment::gateway"
    return Recorded(type="kubernetes:apps/v1:Deployment", name="gateway", urn=urn, custom=True, wire=wire)


def test_a_pod_image_by_tag_or_by_placeholder_digest_is_caught_and_a_real_digest_passes():
    real = "docker.io/library/caddy@sha256:" + "0123456789abcdef" * 4
    # given pods running a tag, a placeholder digest, and a digest of a published image
    tagged = _deployment("docker.io/library/caddy:2.6.2")
    placeholder = _deployment(real, "vllm/vllm-openai@" + PLACEHOLDER_DIGEST)
    # then the tag and the placeholder are caught, each message naming the container and what is allowed
    assert list(broken_rules(tagged)) == ["images-pinned"]
    assert "container c0 image docker.io/library/caddy:2.6.2 is not pinned by digest" in broken_rules(tagged)["images-pinned"][0]
    [message] = broken_rules(placeholder)["images-pinned"]
    assert "container c1" in message and "placeholder digest" in message and "allowed: repo@sha256:" in message
    assert "gpugate:kubernetes.images" in message
    assert broken_rules(_deployment(real)) == {}


# ---- no-world-ssh ----------------------------------------------------------------------------


def test_ssh_from_anywhere_on_aws_is_caught_by_both_ingress_rules(staging):
    ssh = named(staging, AWS_INGRESS, "in-ssh")
    assert broken_rules(ssh) == {}
    bad = changed(ssh, lambda w: w.update(cidrIpv4="0.0.0.0/0"))
    assert set(broken_rules(bad)) == {"no-world-ssh", "web-only-from-world"}


def test_ssh_from_the_world_split_in_two_halves_is_caught(dev):
    ssh = named(dev, FIREWALL, "in-ssh")
    assert broken_rules(ssh) == {}  # the IAP range is Google's proxy, not the world
    bad = changed(ssh, lambda w: w.update(sourceRanges=["0.0.0.0/1", "128.0.0.0/1"]))
    # the two halves are the world too, where only 80/443 may be open
    assert set(broken_rules(bad)) == {"no-world-ssh", "web-only-from-world"}
    assert "0.0.0.0/1, 128.0.0.0/1" in broken_rules(bad)["no-world-ssh"][0]


def test_a_wide_port_range_that_includes_ssh_from_a_huge_network_is_caught(staging):
    ssh = named(staging, AWS_INGRESS, "in-ssh")
    bad = changed(ssh, lambda w: w.update(fromPort=0.0, toPort=65535.0, cidrIpv4="10.0.0.0/8"))
    assert list(broken_rules(bad)) == ["no-world-ssh"]


# ---- encrypted-disks, imdsv2-required, mapped-gpu-machines -------------------------------------


def test_an_unencrypted_or_default_root_volume_is_caught(staging):
    vm = one(staging, AWS_INSTANCE)
    assert "encrypted-disks" not in broken_rules(vm)
    plain = changed(vm, lambda w: w["rootBlockDevice"].update(encrypted=False))
    default = changed(vm, lambda w: w.pop("rootBlockDevice"))
    assert list(broken_rules(plain)) == ["encrypted-disks"]
    assert list(broken_rules(default)) == ["encrypted-disks"]


def test_imdsv1_or_a_hop_limit_containers_can_cross_is_caught(staging):
    vm = one(staging, AWS_INSTANCE)
    v1 = changed(vm, lambda w: w["metadataOptions"].update(httpTokens="optional"))
    hops = changed(vm, lambda w: w["metadataOptions"].update(httpPutResponseHopLimit=2.0))
    assert list(broken_rules(v1)) == ["imdsv2-required"]
    assert "hop" in broken_rules(hops)["imdsv2-required"][0].lower()


def test_a_vm_type_the_catalog_does_not_map_is_caught_on_both_clouds(staging, dev):
    aws = changed(one(staging, AWS_INSTANCE), lambda w: w.update(instanceType="p3.2xlarge"))
    gcp = changed(one(dev, GCP_INSTANCE), lambda w: w.update(machineType="n1-standard-8"))
    assert list(broken_rules(aws)) == ["mapped-gpu-machines"]
    assert list(broken_rules(gcp)) == ["mapped-gpu-machines"]


# ---- no-secrets-in-user-data ---------------------------------------------------------------------


def _with_secret_file(encoded: str) -> str:
    """The user data as the cloud receives it (base64 of gzip), with one more write_files entry: a secret file."""
    document = YAML(typ="safe", pure=True).load(gzip.decompress(base64.b64decode(encoded)))
    assert not [f for f in document["write_files"] if f["path"].startswith("/etc/gpugate/secrets/")]
    document["write_files"].append({"path": "/etc/gpugate/secrets/vllm_api_key", "content": "vllm-abc", "permissions": "0600"})
    buffer = io.StringIO()
    YAML(typ="safe", pure=True).dump(document, buffer)
    return base64.b64encode(gzip.compress(("#cloud-config\n" + buffer.getvalue()).encode())).decode()


def test_user_data_that_writes_a_secret_file_is_caught_on_both_clouds(staging, dev):
    aws_vm, gcp_vm = one(staging, AWS_INSTANCE), one(dev, GCP_INSTANCE)
    assert "no-secrets-in-user-data" not in broken_rules(aws_vm) and "no-secrets-in-user-data" not in broken_rules(gcp_vm)
    aws = changed(aws_vm, lambda w: w.update(userDataBase64=_with_secret_file(w["userDataBase64"])))
    gcp = changed(gcp_vm, lambda w: w["metadata"].update({"user-data": _with_secret_file(w["metadata"]["user-data"])}))
    assert list(broken_rules(aws)) == ["no-secrets-in-user-data"]
    assert list(broken_rules(gcp)) == ["no-secrets-in-user-data"]
    assert "/etc/gpugate/secrets/vllm_api_key" in broken_rules(aws)["no-secrets-in-user-data"][0]


def test_user_data_that_is_not_a_cloud_config_is_caught(staging):
    garbled = changed(
        one(staging, AWS_INSTANCE), lambda w: w.update(userDataBase64=base64.b64encode(b"#cloud-config\n: [").decode())
    )
    assert "not a YAML cloud-config" in broken_rules(garbled)["no-secrets-in-user-data"][0]


# ---- the pack as the engine sees it ------------------------------------------------------------


@pytest.fixture
def analyzer():
    """The policy pack started the way `pulumi up --policy-pack infra/policy` starts it, and a client."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "runtime")])}
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "infra" / "policy" / "__main__.py")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=REPO / "infra" / "policy",
    )
    try:
        port = int(proc.stdout.readline())
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield analyzer_pb2_grpc.AnalyzerStub(channel)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _analyze(stub, resource: Recorded) -> list[str]:
    request = analyzer_pb2.AnalyzeRequest(
        type=resource.type,
        urn=resource.urn,
        name=resource.name,
        properties=json_format.ParseDict(resource.wire, struct_pb2.Struct()),
    )
    return sorted(d.policyName for d in stub.Analyze(request).diagnostics)


def test_the_pack_serves_every_rule_as_mandatory_to_the_engine(analyzer):
    info = analyzer.GetAnalyzerInfo(empty_pb2.Empty())
    assert info.name == "gpugate-security"
    assert sorted(p.name for p in info.policies) == sorted(rule.name for rule in RULES)
    assert {p.enforcementLevel for p in info.policies} == {analyzer_pb2.MANDATORY}


def test_the_engine_gets_the_same_verdicts_as_the_plan(analyzer, staging):
    ssh = named(staging, AWS_INGRESS, "in-ssh")
    assert _analyze(analyzer, ssh) == []
    assert _analyze(analyzer, changed(ssh, lambda w: w.update(cidrIpv4="0.0.0.0/0"))) == [
        "no-world-ssh",
        "web-only-from-world",
    ]
    vm = one(staging, AWS_INSTANCE)
    assert _analyze(analyzer, vm) == []
    leaky = changed(vm, lambda w: w.update(userDataBase64=_with_secret_file(w["userDataBase64"])))
    assert _analyze(analyzer, leaky) == ["no-secrets-in-user-data"] == list(broken_rules(leaky))


# ---- secrets-stay-secret (plan only) -----------------------------------------------------------


def test_a_secret_copied_into_a_plain_input_or_output_is_traced_by_the_plan():
    # given a change that copies the vLLM key into a plain tag and a plain stack output
    import pulumi
    import pulumi_aws as aws

    from gpugate.cli.plan import plan
    from gpugate.stackfile import load_stack
    from infra.program import gateway

    def build(stack):
        component = gateway(stack)
        leaked = pulumi.Output.unsecret(component.vllm_api_key)
        aws.ec2.Tag(
            "leak", resource_id="i-0example", key="debug", value=leaked, opts=pulumi.ResourceOptions(parent=component)
        )
        component.ssh_proxy_command = leaked
        return component

    # when planned
    report = plan(load_stack("staging"), build=build)
    # then both copies are named, and the plan fails
    leaks = {(v.resource, v.message.split(" ")[0]) for v in report.violations if v.policy == "secrets-stay-secret"}
    assert leaks == {("leak", "Tag.value"), ("output ssh_proxy_command", "stack")}
    assert not report.ok

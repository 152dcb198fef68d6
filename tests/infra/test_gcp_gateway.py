"""The GCP gateway (dev): what the Pulumi program asks Google Cloud for, checked on the inputs the engine would get."""

from __future__ import annotations

import base64
import gzip

import pulumi
import pytest

from gpugate.targets import render_bundle
from gpugate.spec import GpuSpec
from gpugate.stackfile import load_stack
from infra.gcp import (
    IMAGE_FAMILY,
    IMAGE_PROJECT,
    SERVICE_ACCOUNT_ROLES,
    SERVICE_ACCOUNT_SCOPES,
    TYPE_TOKEN,
)
from gpugate.catalog import machine
from infra.network import GCP_IAP_RANGE
from infra.offline import record
from infra.program import gateway
from tests.infra.conftest import of_type, one, under_mocks

INSTANCE = "gcp:compute/instance:Instance"
FIREWALL = "gcp:compute/firewall:Firewall"


def _ingress(run) -> set[tuple[str, str, tuple[str, ...]]]:
    found = set()
    for rule in of_type(run, FIREWALL):
        assert rule.props["direction"] == "INGRESS"
        for allow in rule.props["allows"]:
            for port in allow["ports"]:
                found.add((allow["protocol"], port, tuple(rule.props["sourceRanges"])))
    return found


def test_dev_is_one_gateway_component_whose_resources_are_all_its_children(dev):
    one(dev, TYPE_TOKEN)
    children = [r for r in dev.resources if r.type not in ("pulumi:pulumi:Stack", TYPE_TOKEN)]
    assert children and all(f"{TYPE_TOKEN}$" in r.urn for r in children)


def test_dev_opens_exactly_80_and_443_to_the_world_and_ssh_only_to_googles_iap_range(dev):
    assert _ingress(dev) == {
        ("tcp", "80", ("0.0.0.0/0",)),
        ("tcp", "443", ("0.0.0.0/0",)),
        ("tcp", "22", (GCP_IAP_RANGE,)),
    }
    assert all(rule.props["targetTags"] == ["gpugate-dev"] for rule in of_type(dev, FIREWALL))
    assert dev.outputs["ssh_proxy_command"][0].startswith("gcloud compute start-iap-tunnel %h %p")


def test_with_admin_networks_ssh_comes_from_them_and_not_through_iap(stack_copy):
    path = stack_copy("dev", lambda c: c.__setitem__("gpugate:admin_cidrs", ["198.18.0.0/16"]), name="admins")
    run = record(load_stack(path))
    assert ("tcp", "22", ("198.18.0.0/16",)) in _ingress(run)
    assert not any(GCP_IAP_RANGE in sources for _, _, sources in _ingress(run))
    assert run.outputs["ssh_host"][0] == run.outputs["public_ip"][0]


def test_the_network_is_dedicated_and_custom_mode(dev):
    assert one(dev, "gcp:compute/network:Network").props["autoCreateSubnetworks"] is False
    assert one(dev, "gcp:compute/subnetwork:Subnetwork").props["region"] == "europe-west4"


def test_dev_vm_is_the_catalog_machine_on_a_balanced_disk_from_googles_debian_12_image(dev):
    vm = one(dev, INSTANCE).props
    assert vm["machineType"] == "g2-standard-8" and vm["zone"] == "europe-west4-a"
    disk = vm["bootDisk"]["initializeParams"]
    assert disk["type"] == "pd-balanced" and disk["size"] == 150
    assert disk["image"].endswith(f"/projects/{IMAGE_PROJECT}/global/images/family/{IMAGE_FAMILY}")
    assert vm["metadata"]["enable-oslogin"] == "TRUE" and vm["metadata"]["block-project-ssh-keys"] == "TRUE"


def test_a_spot_vm_terminates_on_host_maintenance_and_does_not_restart_itself(dev):
    scheduling = one(dev, INSTANCE).props["scheduling"]
    assert scheduling["onHostMaintenance"] == "TERMINATE"
    assert scheduling["provisioningModel"] == "SPOT" and scheduling["preemptible"] is True
    assert scheduling["automaticRestart"] is False and scheduling["instanceTerminationAction"] == "STOP"


def test_an_on_demand_vm_restarts_automatically(stack_copy):
    path = stack_copy("dev", lambda c: c["gpugate:vm"].__setitem__("spot", False), name="ondemand")
    scheduling = one(record(load_stack(path)), INSTANCE).props["scheduling"]
    assert scheduling["onHostMaintenance"] == "TERMINATE"
    assert scheduling["automaticRestart"] is True and scheduling["provisioningModel"] == "STANDARD"


def test_the_host_identity_writes_logs_and_metrics_and_reads_its_bundle_and_its_secrets_only(dev):
    account = one(dev, "gcp:serviceaccount/account:Account")
    email = f"{account.props['accountId']}@gpugate-dev-4711.iam.gserviceaccount.com"
    members = of_type(dev, "gcp:projects/iAMMember:IAMMember")
    assert sorted(m.props["role"] for m in members) == sorted(SERVICE_ACCOUNT_ROLES)  # project-wide: logs, metrics
    assert {m.props["member"] for m in members} == {f"serviceAccount:{email}"}
    (bucket_read,) = of_type(dev, "gcp:storage/bucketIAMMember:BucketIAMMember")
    assert bucket_read.props["role"] == "roles/storage.objectViewer" and bucket_read.props["member"] == f"serviceAccount:{email}"
    secret_reads = of_type(dev, "gcp:secretmanager/secretIamMember:SecretIamMember")
    secrets = of_type(dev, "gcp:secretmanager/secret:Secret")
    assert len(secret_reads) == len(secrets) == 2  # the vLLM key and the Slack webhook, each readable on its own
    assert {r.props["role"] for r in secret_reads} == {"roles/secretmanager.secretAccessor"}
    assert one(dev, INSTANCE).props["serviceAccount"] == {"email": email, "scopes": list(SERVICE_ACCOUNT_SCOPES)}


def test_user_data_is_gzipped_base64_metadata_with_no_secret_in_it(dev):
    metadata = one(dev, INSTANCE).props["metadata"]
    assert metadata["user-data-encoding"] == "base64"
    text = gzip.decompress(base64.b64decode(metadata["user-data"])).decode()
    assert text.startswith("#cloud-config") and not any(canary in text for canary in dev.canaries)
    for version in of_type(dev, "gcp:secretmanager/secretVersion:SecretVersion"):
        assert version.wire["secretData"]["4dabf18193072939515e22adb298388d"] == "1b47061264138c4ac30d75fd1eb44270"


def test_the_host_boots_after_its_bundle_and_secrets_exist(dev):
    by_urn = {r.urn: r for r in dev.resources}
    kinds = {by_urn[u].type for u in one(dev, INSTANCE).dependencies if u in by_urn}
    assert {"gcp:storage/bucketObject:BucketObject", "gcp:secretmanager/secretVersion:SecretVersion"} <= kinds


def test_the_domain_points_at_the_static_address_the_vm_uses(dev):
    address = dev.outputs["public_ip"][0]
    record_ = one(dev, "gcp:dns/recordSet:RecordSet").props
    assert record_ == {
        "managedZone": "gpugate-example-com",
        "name": "llm.dev.gpugate.example.com.",
        "type": "A",
        "ttl": 300,
        "rrdatas": [address],
    }
    access = one(dev, INSTANCE).props["networkInterfaces"][0]["accessConfigs"][0]
    assert access["natIp"] == address


def test_the_vm_carries_the_bundle_hash_in_metadata_and_a_label(dev):
    bundle = render_bundle(load_stack("dev"))
    vm = one(dev, INSTANCE).props
    assert vm["metadata"]["gpugate-bundle-sha256"] == bundle.bundle_sha256
    assert bundle.bundle_sha256.startswith(vm["labels"]["gpugate-bundle"])


def test_stack_outputs_are_plain_and_the_vllm_key_is_secret():
    stack = load_stack("dev")

    def check():
        component = gateway(stack)
        return pulumi.Output.all(
            component.vllm_api_key.is_secret(),
            component.url.is_secret(),
            component.public_ip.is_secret(),
            component.bundle_sha256.is_secret(),
        ).apply(lambda flags: _assert_flags(flags, [True, False, False, False]))

    under_mocks(stack, check)


def _assert_flags(flags: list[bool], expected: list[bool]) -> None:
    assert flags == expected


def test_a_gpu_count_google_has_no_machine_for_is_refused_by_the_component():
    bad = load_stack("dev").spec.model_copy(update={"gpu": GpuSpec.model_construct(type="L4", count=3)})
    with pytest.raises(ValueError, match=r"GCP has no machine with 3 x L4; allowed gpu.count: 1 \(g2-standard-8\)"):
        machine("gcp", bad.gpu.type, bad.gpu.count)


def test_new_user_data_replaces_the_host_but_a_newer_image_alone_does_not(dev):
    vm = one(dev, INSTANCE)
    assert vm.replace_on_changes == ("metadata",)  # cloud-init runs once per instance
    assert vm.delete_before_replace  # the static address moves to the new host
    assert vm.ignore_changes == ("bootDisk.initializeParams.image",)


def test_a_named_existing_network_is_looked_up_and_no_network_is_created(stack_copy):
    path = stack_copy("dev", lambda c: c["gpugate:vm"].__setitem__("network", "shared"), name="shared")
    run = record(load_stack(path))
    assert not of_type(run, "gcp:compute/network:Network") and not of_type(run, "gcp:compute/subnetwork:Subnetwork")
    assert {r.props["network"] for r in of_type(run, FIREWALL)} == {
        "https://www.googleapis.com/compute/v1/projects/gpugate-dev-4711/global/networks/shared"
    }
    subnetwork = one(run, INSTANCE).props["networkInterfaces"][0]["subnetwork"]
    assert subnetwork.endswith("/regions/europe-west4/subnetworks/shared")

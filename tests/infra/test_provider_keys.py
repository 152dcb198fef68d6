"""An external provider's key on a VM stack: a Pulumi secret from `gpugate:providers.<name>.api_key` stored in the
cloud's secret manager, fetched at boot into the file the router's unit loads, and in no plain input, output or user data."""

from __future__ import annotations

import base64
import gzip
import json
from typing import Any

import pytest
from gpugate_runtime.contract.host import VM_LAYOUT

from gpugate.stackfile import load_stack
from gpugate.vm.delivery import BOOT_CONFIG
from infra.offline import provider_key_canary, record
from infra.policy.evaluate import plain_secrets
from tests.infra.conftest import of_type, one
from tests.infra.test_user_data import write_files

SECRET_MARK = ("4dabf18193072939515e22adb298388d", "1b47061264138c4ac30d75fd1eb44270")
KEY_FILE = str(VM_LAYOUT.provider_key_file("cloud"))


def with_provider(secure: bool) -> Any:
    def change(config: dict[str, Any]) -> None:
        cloud: dict[str, Any] = {"base_url": "https://api.example.com/v1", "models": {"m": "provider-m"},
                                 "input_usd_per_mtok": 0.15, "output_usd_per_mtok": 0.6}  # fmt: skip
        if secure:
            cloud["api_key"] = {"secure": "AAABAEncryptedProviderKey"}
        config["gpugate:providers"] = {"cloud": cloud}

    return change


def boot_secrets(user_data: str) -> list[dict[str, Any]]:
    """The boot config's secret list, as the user data hands it to hostboot (ids and files, never values)."""
    return json.loads(write_files(user_data)[str(BOOT_CONFIG)]["content"])["secrets"]


def secret_marked(wire: dict[str, Any]) -> bool:
    return wire.get(SECRET_MARK[0]) == SECRET_MARK[1]


def test_an_aws_stack_stores_each_providers_key_in_secrets_manager_and_the_host_fetches_it_to_the_routers_file(stack_copy):
    # given staging (AWS) with a provider whose key is a stack secret
    run = record(load_stack(stack_copy("staging", with_provider(secure=True), name="routed")))
    # then Secrets Manager holds it under the stack's prefix, as a Pulumi secret with the key's value
    stored = {s.props["name"] for s in of_type(run, "aws:secretsmanager/secret:Secret")}
    assert "gpugate/routed/provider_cloud_api_key" in stored
    versions = [v for v in of_type(run, "aws:secretsmanager/secretVersion:SecretVersion") if "provider-cloud" in v.name]
    assert len(versions) == 1 and secret_marked(versions[0].wire["secretString"])
    assert versions[0].props["secretString"] == provider_key_canary("cloud")
    # and the host's role may read it, like its other secrets
    (policy,) = of_type(run, "aws:iam/rolePolicy:RolePolicy")
    assert len(json.loads(policy.props["policy"])["Statement"][1]["Resource"]) == len(stored) == 3
    # and the user data names where it goes, never what it is
    user_data = gzip.decompress(base64.b64decode(one(run, "aws:ec2/instance:Instance").props["userDataBase64"])).decode()
    refs = {s["name"]: s for s in boot_secrets(user_data)}
    assert refs["provider_cloud_api_key"] == {
        "name": "provider_cloud_api_key", "id": "gpugate/routed/provider_cloud_api_key", "file": KEY_FILE, "optional": False,
    }  # fmt: skip
    assert provider_key_canary("cloud") in run.canaries
    assert not any(canary in user_data for canary in run.canaries)
    assert plain_secrets(run).violations == []
    assert not any(provider_key_canary("cloud") in json.dumps(value, default=str) for value, _ in run.outputs.values())


def test_a_gcp_stack_stores_each_providers_key_in_secret_manager_readable_by_the_host_only(stack_copy):
    run = record(load_stack(stack_copy("dev", with_provider(secure=True), name="routed")))
    secrets = {s.props["secretId"] for s in of_type(run, "gcp:secretmanager/secret:Secret")}
    assert "gpugate-routed-provider-cloud-api-key" in secrets
    (version,) = [v for v in of_type(run, "gcp:secretmanager/secretVersion:SecretVersion") if "provider-cloud" in v.name]
    assert secret_marked(version.wire["secretData"]) and version.props["secretData"] == provider_key_canary("cloud")
    assert len(of_type(run, "gcp:secretmanager/secretIamMember:SecretIamMember")) == len(secrets)
    metadata = one(run, "gcp:compute/instance:Instance").props["metadata"]
    user_data = gzip.decompress(base64.b64decode(metadata["user-data"])).decode()
    (ref,) = [s for s in boot_secrets(user_data) if s["name"] == "provider_cloud_api_key"]
    assert ref["file"] == KEY_FILE and ref["id"].endswith("/secrets/gpugate-routed-provider-cloud-api-key")
    assert not any(canary in user_data for canary in run.canaries)
    assert plain_secrets(run).violations == []


def test_a_vm_stack_whose_provider_has_no_key_is_refused_naming_the_secret_and_how_to_set_it(stack_copy):
    stack = load_stack(stack_copy("staging", with_provider(secure=False), name="nokey"))
    with pytest.raises(ValueError) as refused:
        record(stack)
    assert "gpugate:providers.cloud.api_key is not set" in str(refused.value)
    assert "pulumi config set --secret --path 'gpugate:providers.cloud.api_key' KEY -s nokey" in str(refused.value)

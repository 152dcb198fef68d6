"""The user-data a gateway VM boots with: the bundle plus its secrets, valid for cloud-init, small enough, secret."""

from __future__ import annotations

import subprocess

import pytest
from ruamel.yaml import YAML

from gpugate.targets import render_bundle
from gpugate.vm.userdata import USER_DATA
from gpugate.stackfile import load_stack
from gpugate.vm.userdata import USER_DATA_LIMIT_BYTES
from infra.offline import ALERT_CANARY, CONFIG_KEY_CANARY, Recorded, Run, record
from infra.secrets import with_secret_files
from tests.infra.conftest import of_type

VM_TYPES = ("aws:ec2/instance:Instance", "gcp:compute/instance:Instance")
SECRETS = "/etc/gpugate/secrets/"


def _vm(run: Run) -> Recorded:
    return next(r for r in run.resources if r.type in VM_TYPES)


def user_data(run: Run) -> str:
    vm = _vm(run)
    props = vm.props
    return props["userData"] if vm.type == VM_TYPES[0] else props["metadata"]["user-data"]


def write_files(text: str) -> dict[str, dict]:
    return {entry["path"]: entry for entry in YAML(typ="safe").load(text)["write_files"]}


@pytest.mark.parametrize("stack", ["staging", "dev"])
def test_user_data_is_a_valid_cloud_config_by_cloud_inits_own_schema(stack, request, tmp_path):
    # given the user-data the program hands the cloud, secrets included
    path = tmp_path / "user-data.yaml"
    path.write_text(user_data(request.getfixturevalue(stack)))
    # when cloud-init itself checks it
    result = subprocess.run(
        ["cloud-init", "schema", "--config-file", str(path)], capture_output=True, text=True, timeout=120
    )
    # then it is valid
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Valid cloud-config" in result.stdout


@pytest.mark.parametrize("stack", ["staging", "dev"])
def test_user_data_carries_the_bundle_hash_the_vm_is_labelled_with(stack, request):
    run = request.getfixturevalue(stack)
    bundle = render_bundle(load_stack(stack))
    files = write_files(user_data(run))
    assert files["/etc/gpugate/BUNDLE_SHA256"]["content"] == bundle.bundle_sha256 + "\n"
    assert run.outputs["bundle_sha256"][0] == bundle.bundle_sha256


@pytest.mark.parametrize("stack", ["staging", "dev"])
def test_user_data_fits_the_16_kib_aws_limit_with_its_secrets(stack, request):
    # AWS limits user-data to 16 KiB *before* base64 (the provider encodes it); GCP allows 256 KiB
    # per metadata value, so AWS's limit is the one that binds. The plan's secrets are as long as
    # the longest real ones (48-char key, 128-char alert credential).
    raw = user_data(request.getfixturevalue(stack)).encode()
    assert len(raw) <= USER_DATA_LIMIT_BYTES, f"{len(raw)} bytes"
    assert len(raw) > len(render_bundle(load_stack(stack)).files[USER_DATA])  # the secrets are in it


@pytest.mark.parametrize("stack", ["staging", "dev"])
def test_secrets_are_root_only_files_from_the_generated_key_and_the_config_secret(stack, request):
    run = request.getfixturevalue(stack)
    files = {path: entry for path, entry in write_files(user_data(run)).items() if path.startswith(SECRETS)}
    assert set(files) == {SECRETS + "vllm_api_key", SECRETS + "alert_credential"}
    assert all(e["permissions"] == "0600" and e["owner"] == "root:root" for e in files.values())
    generated = of_type(run, "random:index/randomPassword:RandomPassword")
    assert len(generated) == 1 and generated[0].props["length"] == 48 and generated[0].props["special"] is False
    assert files[SECRETS + "vllm_api_key"]["content"] in run.canaries  # the generated password's result
    assert files[SECRETS + "alert_credential"]["content"] == ALERT_CANARY  # config.require_secret("alert_credential")


def test_a_vllm_key_set_as_config_secret_replaces_the_generated_one(stack_copy):
    # given a stack whose file holds gpugate:vllm_api_key as a Pulumi secret
    path = stack_copy("staging", lambda c: c.__setitem__("gpugate:vllm_api_key", {"secure": "v1:AAAA"}), name="ownkey")
    # when planned
    run = record(load_stack(path))
    # then no password is generated, and the host gets the configured key
    assert not of_type(run, "random:index/randomPassword:RandomPassword")
    assert write_files(user_data(run))[SECRETS + "vllm_api_key"]["content"] == CONFIG_KEY_CANARY


def test_a_channel_without_a_credential_puts_no_alert_credential_on_the_host(stack_copy):
    # given a plain webhook receiver (no bearer token)
    channel = {"kind": "webhook", "url": "https://alerts.example.com/gpugate"}
    path = stack_copy("staging", lambda c: c["gpugate:alerts"].__setitem__("channel", channel), name="webhook")
    files = write_files(user_data(record(load_stack(path))))
    assert SECRETS + "vllm_api_key" in files and SECRETS + "alert_credential" not in files


def test_a_secret_may_not_overwrite_a_file_of_the_bundle():
    base = render_bundle(load_stack("staging")).files[USER_DATA]
    with pytest.raises(ValueError, match="already writes /etc/gpugate/BUNDLE_SHA256"):
        with_secret_files(base, [("/etc/gpugate/BUNDLE_SHA256", "x")])


def test_only_a_cloud_config_document_takes_secrets():
    with pytest.raises(ValueError, match="must start with #cloud-config"):
        with_secret_files(b"#!/bin/sh\necho hi\n", [("/etc/gpugate/secrets/x", "y")])


def test_the_merged_document_keeps_the_bundles_header_comment(staging):
    lines = user_data(staging).splitlines()
    assert lines[0] == "#cloud-config"
    assert lines[1].startswith("# Generated by gpugate") and "stacks/Pulumi.staging.yaml" in lines[1]

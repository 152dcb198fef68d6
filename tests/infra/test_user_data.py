"""The user data a gateway VM boots with: packages, the boot script and its config, the first-boot script.
Valid for cloud-init, within AWS's limit even with the longest values a stack allows, and free of secrets."""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import subprocess
from pathlib import Path

import pytest
from gpugate_runtime import hostboot
from ruamel.yaml import YAML

from gpugate.stackfile import load_stack
from gpugate.targets import render_bundle
from gpugate.vm.bundle import ARCHIVE
from gpugate.vm.delivery import BOOT_CONFIG, bucket_name, object_key, secret_id
from gpugate.vm.userdata import HOSTBOOT, USER_DATA, USER_DATA_LIMIT_BYTES, delivered
from infra.offline import Recorded, Run, record
from tests.conftest import edit_stack

VM_TYPES = ("aws:ec2/instance:Instance", "gcp:compute/instance:Instance")
VM_STACKS = ("staging", "dev", "smoke")


def _vm(run: Run) -> Recorded:
    return next(r for r in run.resources if r.type in VM_TYPES)


def received(run: Run) -> bytes:
    """The user data as the cloud receives it (gzipped), from the recorded plan."""
    vm = _vm(run)
    text = vm.props["userDataBase64"] if vm.type == VM_TYPES[0] else vm.props["metadata"]["user-data"]
    return base64.b64decode(text)


def write_files(text: str) -> dict[str, dict]:
    return {entry["path"]: entry for entry in YAML(typ="safe").load(text)["write_files"]}


@pytest.fixture(scope="module")
def runs() -> dict[str, Run]:
    return {name: record(load_stack(name)) for name in VM_STACKS}


@pytest.mark.parametrize("stack", VM_STACKS)
def test_the_cloud_receives_the_rendered_user_data_gzipped_and_cloud_init_accepts_it(stack, runs, tmp_path):
    rendered = render_bundle(load_stack(stack)).files[USER_DATA]
    assert received(runs[stack]) == delivered(rendered)
    path = tmp_path / "user-data.yaml"
    path.write_bytes(gzip.decompress(received(runs[stack])))
    result = subprocess.run(["cloud-init", "schema", "--config-file", str(path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "Valid cloud-config" in result.stdout, result.stdout + result.stderr


@pytest.mark.parametrize("stack", VM_STACKS)
def test_the_boot_config_names_the_bundle_object_and_the_secrets_the_program_creates(stack, runs):
    loaded = load_stack(stack)
    bundle = render_bundle(loaded)
    files = write_files(bundle.files[USER_DATA].decode())
    config = json.loads(files[str(BOOT_CONFIG)]["content"])
    assert files[str(BOOT_CONFIG)]["permissions"] == "0600"
    archive_sha = hashlib.sha256(bundle.files[ARCHIVE]).hexdigest()
    assert config["bundle_sha256"] == archive_sha
    scheme = "s3" if loaded.spec.target == "aws" else "gs"
    assert config["bundle_url"] == f"{scheme}://{bucket_name(loaded.spec, stack)}/{object_key(archive_sha)}"
    names = [s["name"] for s in config["secrets"]]
    assert names[0] == "vllm_api_key" and len(names) == len(set(names)) >= 1
    assert {s["id"] for s in config["secrets"]} == {secret_id(loaded.spec, stack, n) for n in names}
    # the boot package is the runtime's own, every module verbatim
    sources = sorted(Path(hostboot.__file__).parent.glob("*.py"))
    assert len(sources) >= 4
    for source in sources:
        assert files[str(HOSTBOOT / source.name)]["content"] == source.read_text()


@pytest.mark.parametrize("stack", VM_STACKS)
def test_no_secret_travels_in_user_data(stack, runs):
    text = gzip.decompress(received(runs[stack])).decode()
    assert runs[stack].canaries and not any(canary in text for canary in runs[stack].canaries)
    assert not [path for path in write_files(text) if path.startswith("/etc/gpugate/secrets/")]


def _noise(n: int, seed: str) -> str:
    """n lowercase letters that compress as badly as real names do (not a run of one letter)."""
    out, block = "", seed.encode()
    while len(out) < n:
        block = hashlib.sha256(block).digest()
        out += "".join(chr(ord("a") + b % 26) for b in block)
    return out[:n]


def _longest(config: dict) -> None:
    """Every value the user data carries at the longest the spec allows."""
    labels = [_noise(63, str(i)) for i in range(3)]
    config["gpugate:domain"] = ".".join([*labels, _noise(61, "tld")])  # 253 characters
    config["gpugate:vm"]["bundle_bucket"] = _noise(63, "bucket")
    config["gpugate:alerts"] = {
        "channel": {"kind": "webhook", "url": "https://alerts.example.com/" + _noise(200, "url"), "bearer_token": True},
        "runbook_base_url": "https://runbooks.example.com/" + _noise(200, "runbooks"),
    }
    if "gpugate:vllm" in config and config["gpugate:vllm"].get("image"):
        path = "/".join(_noise(60, f"repo{i}") for i in range(3))
        config["gpugate:vllm"]["image"] = f"registry.example.com/{path}@sha256:" + hashlib.sha256(b"x").hexdigest()
    if "gpugate:project" in config:
        config["gpugate:project"] = "p" + _noise(28, "project") + "q"


@pytest.mark.parametrize("stack", VM_STACKS)
def test_user_data_stays_under_the_aws_limit_with_the_longest_values_a_stack_allows(stack, tmp_path):
    longest = _noise(60, "stack")  # a stack name of 60 characters
    path = edit_stack(stack, tmp_path / f"Pulumi.{longest}.yaml", _longest)
    bundle = render_bundle(load_stack(path))
    size = len(delivered(bundle.files[USER_DATA]))
    assert size <= USER_DATA_LIMIT_BYTES, f"{stack}: {size} bytes of user data, AWS takes {USER_DATA_LIMIT_BYTES}"
    # and the stack's own is smaller than that worst case
    assert len(delivered(render_bundle(load_stack(stack)).files[USER_DATA])) < size

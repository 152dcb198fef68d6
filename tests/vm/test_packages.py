"""Every package a VM stack's user data installs exists in Debian 12 as a stock cloud image's apt sources see it.

cloud-init's `packages:` runs `apt-get install` with every name at once: one name the release lacks and the
host installs nothing, so no gateway. NVIDIA's driver and container toolkit come from NVIDIA's own apt
repository (firstboot.sh adds it on GPU hosts); no registry here mirrors it, so those names are not checked
(docs/deploy-vm.md says so).
"""

from __future__ import annotations

import gzip

import pytest
from ruamel.yaml import YAML

from gpugate.stackfile import load_stack, stack_names
from gpugate.targets import render_bundle
from gpugate.vm.userdata import USER_DATA, delivered
from tests.vm.debian_index import DebianIndex
from tests.vm.disk_image import APT_CACHE
from tests.vm.disk_image import PACKAGES as IMAGE_PACKAGES

VM_STACKS = [name for name in stack_names() if load_stack(name).spec.target in ("aws", "gcp")]


def installed_packages(stack: str) -> list[str]:
    """The `packages:` of the user data the cloud receives for this stack (decoded as cloud-init decodes it)."""
    document = YAML(typ="safe", pure=True).load(gzip.decompress(delivered(render_bundle(load_stack(stack)).files[USER_DATA])))
    return list(document["packages"])


def test_there_are_vm_stacks_with_and_without_gpus():
    assert {"dev", "staging", "smoke"} <= set(VM_STACKS)
    assert {load_stack(name).spec.gpu.type == "cpu" for name in VM_STACKS} == {True, False}


@pytest.mark.parametrize("stack", VM_STACKS)
def test_every_package_the_user_data_installs_is_in_bookworm_main(stack: str, debian_index: DebianIndex) -> None:
    names = installed_packages(stack)
    assert {"caddy", "prometheus", "prometheus-alertmanager", "python3-venv"} <= set(names)
    assert debian_index.missing(names) == [], f"stack {stack}: not installable on Debian 12 main"


def test_a_name_the_release_lacks_is_caught(debian_index: DebianIndex) -> None:
    # what the review found: a package installed by a name Debian does not publish
    assert debian_index.missing([*installed_packages("smoke"), "gpugate-runtime"]) == ["gpugate-runtime"]


@pytest.mark.parametrize("stack", [name for name in VM_STACKS if load_stack(name).spec.gpu.type == "cpu"])
def test_the_test_images_apt_cache_holds_every_package_a_cpu_stack_installs(stack: str) -> None:
    # the CPU stacks are the ones tests/vm boots; a package missing from the cache is still installed
    # there, only downloaded slowly
    assert set(installed_packages(stack)) <= set(APT_CACHE) | set(IMAGE_PACKAGES), stack

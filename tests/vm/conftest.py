"""Fixtures for tests that boot a real Debian 12 VM in QEMU, and for the fast check against Debian's package index."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# the real vLLM CPU venv and the small model (the boot test serves the guest's vLLM port from this machine)
from tests.e2e.conftest import smollm_dir, vllm_python  # noqa: F401 - fixtures
from tests.apt import ensure_packages
from tests.vm.debian_index import DebianIndex, IndexUnavailable, cached_index, ensure_index
from tests.vm.disk_image import DiskImage, ensure_disk_image

# Debian packages the harness runs on this machine (package -> a file that proves it is installed).
VM_PACKAGES: dict[str, str] = {
    "qemu-system-x86": "/usr/bin/qemu-system-x86_64",
    "qemu-utils": "/usr/bin/qemu-img",
    "debootstrap": "/usr/sbin/debootstrap",
    "cloud-image-utils": "/usr/bin/cloud-localds",
    "genisoimage": "/usr/bin/genisoimage",
}
# A VM build or boot takes minutes under emulation; pyproject's 600 s per test is too short for a cold image.
VM_TEST_TIMEOUT_S = 2400


@pytest.fixture(scope="session")
def vm_image() -> DiskImage:
    """The cached Debian 12 image (`<cache>/vm/debian12-<recipe hash>`); built on first use, 5-10 min here."""
    if os.geteuid() != 0:
        pytest.skip("the VM tests run as root (debootstrap, the image's chroot); deselect with -m 'not vm'")
    ensure_packages(VM_PACKAGES)
    return ensure_disk_image()


@pytest.fixture(scope="module")
def vm_workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One VM's overlay, seed and sockets (removed when it stops) and its serial and QEMU logs (kept by pytest)."""
    return tmp_path_factory.mktemp("vm")


@pytest.fixture(scope="session")
def debian_index() -> DebianIndex:
    """Debian 12's package index from this machine's mirror: the cached copy, else downloaded once (~20 MB)."""
    index = cached_index()
    if index is not None:
        return index
    try:
        return ensure_index()
    except IndexUnavailable as exc:
        pytest.skip(f"Debian package index not cached and not downloadable: {exc}")

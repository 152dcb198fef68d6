"""Fixtures for the podman tests: the harness (installed, configured, torn down) and gpugate's two images,
kept in podman's store and in ~/.cache/gpugate/podman (tests/kubernetes/image_cache.py)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import smollm_dir, vllm_python  # noqa: F401 - fixtures of tests/kubernetes/test_proxy_pod.py
from tests.kubernetes.image_cache import ImageCache
from tests.kubernetes.images import (
    build_proxy_image,
    build_runtime_image,
    build_wheel,
    runtime_context,
    runtime_lock,
)
from tests.kubernetes.podman import BuildResult, Podman, ensure_installed


@pytest.fixture(scope="session")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Podman]:
    """Podman with tests/kubernetes/containers.conf; at the end of the session, every pod it played is
    removed, and so is what podman added to the host network meanwhile."""
    if os.geteuid() != 0:
        # Rootless podman differs in what these tests prove (hostPort listeners, iptables, uids
        # on the host), and debootstrap needs root: skipped, visibly, rather than half run.
        pytest.skip("the podman tests run as root (rootful podman 4.3.1, debootstrap); deselect with -m 'not podman'")
    ensure_installed()
    harness = Podman(tmp_path_factory.mktemp("podman"), cache=ImageCache.default())
    try:
        yield harness
    finally:
        harness.teardown()


@pytest.fixture(scope="session")
def base_image(podman: Podman) -> BuildResult:
    """localhost/gpugate-debian:bookworm: about 35 s the first time on this machine (debootstrap), then cached."""
    return podman.base_image()


@pytest.fixture(scope="session")
def runtime_image(podman: Podman, base_image: BuildResult, tmp_path_factory: pytest.TempPathFactory) -> BuildResult:
    """The runtime image from ./runtime (wheel) and the lock; rebuilt only when either changes."""
    scratch = tmp_path_factory.mktemp("runtime-build")
    wheel = build_wheel(scratch / "wheel")
    lock = runtime_lock(scratch / "lock")
    context = runtime_context(scratch / "context", wheel, lock)
    return build_runtime_image(podman, context, base=base_image.tag)


@pytest.fixture(scope="session")
def proxy_image(podman: Podman, base_image: BuildResult, tmp_path_factory: pytest.TempPathFactory) -> BuildResult:
    return build_proxy_image(podman, tmp_path_factory.mktemp("proxy-build"), base=base_image.tag)


@pytest.fixture(scope="session")
def pod_workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("pod")

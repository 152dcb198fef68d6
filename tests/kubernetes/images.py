"""gpugate's two images as the tests build them: their build contexts (the runtime wheel and the lock) and tags.

The release workflow builds the same Containerfiles on a pinned public Debian base; here the base is
localhost/gpugate-debian:bookworm (tests/kubernetes/podman.py), so nothing comes from a registry.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from gpugate_runtime.contract.services import GID_GATEWAY, UIDS, USER_CADDY, USER_GATEWAY

from tests.kubernetes.podman import BASE_IMAGE, BuildResult, Podman, PodmanError, run_checked

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
CONTAINERS = REPO / "runtime" / "containers"
RUNTIME_CONTAINERFILE = CONTAINERS / "runtime.Containerfile"
PROXY_CONTAINERFILE = CONTAINERS / "proxy.Containerfile"
RUNTIME_TAG = "localhost/gpugate-runtime:test"
PROXY_TAG = "localhost/gpugate-proxy:test"

# The runtime's hash-locked requirements. Until runtime/requirements.lock lands (branch helper/lock),
# `provisional_lock` compiles one with uv; point GPUGATE_RUNTIME_LOCK at another file to use it.
RUNTIME_LOCK = REPO / "runtime" / "requirements.lock"
LOCK_ENV = "GPUGATE_RUNTIME_LOCK"
# A fixed SOURCE_DATE_EPOCH makes the runtime wheel the same bytes for the same sources, so an
# unchanged runtime leaves the image's context hash, and the image, as they were.
WHEEL_EPOCH = "315532800"  # 1980-01-01, the earliest time a zip file can hold
# The CA bundle pip trusts on this machine (its /etc/pip.conf `cert`); a build mounts it as a secret.
PIP_CERT = Path("/etc/ssl/certs/ca-certificates.crt")
UV_VERSION = "0.13.9"  # provisional lock only


@dataclass(frozen=True)
class RuntimeContext:
    """A build context for runtime.Containerfile and the build arguments naming its two parts."""

    path: Path
    requirements: str  # relative to path
    wheels: str  # relative to path: a directory with exactly one gpugate_runtime-*.whl

    @property
    def build_args(self) -> dict[str, str]:
        return {"REQUIREMENTS": self.requirements, "WHEELS": self.wheels}


def runtime_sources(dest: Path) -> Path:
    """A copy of ./runtime as git sees it (tracked and untracked-but-not-ignored files): no build
    directories, egg-info or caches find their way into the wheel."""
    listed = run_checked(
        ["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard", "runtime"]
    ).stdout.decode()
    for rel in filter(None, listed.split("\0")):
        source = REPO / rel
        if source.is_file():
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return dest / "runtime"


def build_wheel(dest: Path, *, epoch: str = WHEEL_EPOCH) -> Path:
    """The gpugate_runtime wheel, built from ./runtime with pip (the same bytes for the same sources and epoch)."""
    sources = runtime_sources(dest / "src")
    out = dest / "wheels"
    env = {**os.environ, "SOURCE_DATE_EPOCH": epoch}
    run_checked([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(out), str(sources)],
                env=env, timeout=300)
    wheels = sorted(out.glob("gpugate_runtime-*.whl"))
    if len(wheels) != 1:
        raise PodmanError(f"{out}: expected one gpugate_runtime wheel, found {[w.name for w in wheels]}")
    shutil.rmtree(dest / "src")
    return wheels[0]


def provisional_lock(dest: Path) -> Path:
    """requirements.lock compiled by uv from runtime/pyproject.toml (CPython 3.11, manylinux x86_64).

    A stand-in until the project's own lock lands: it resolves the newest releases each time.
    """
    venv = dest / "uv-venv"
    if not (venv / "bin" / "uv").exists():
        run_checked([sys.executable, "-m", "venv", str(venv)])
        run_checked([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", f"uv=={UV_VERSION}"], timeout=300)
    lock = dest / "requirements.lock"
    run_checked(
        [str(venv / "bin" / "uv"), "pip", "compile", "--quiet", "--generate-hashes", "--python-version", "3.11",
         "--python-platform", "x86_64-manylinux_2_28", "--no-header", "--output-file", str(lock),
         str(REPO / "runtime" / "pyproject.toml")],
        timeout=300,
    )
    return lock


def runtime_lock(scratch: Path) -> Path:
    """$GPUGATE_RUNTIME_LOCK, else runtime/requirements.lock, else a provisional lock compiled now."""
    named = os.environ.get(LOCK_ENV)
    if named:
        if not Path(named).is_file():
            raise PodmanError(f"{LOCK_ENV}={named}: no such file")
        return Path(named)
    if RUNTIME_LOCK.is_file():
        return RUNTIME_LOCK
    log.warning("%s does not exist yet: compiling a provisional lock with uv", RUNTIME_LOCK)
    return provisional_lock(scratch)


def runtime_context(dest: Path, wheel: Path, lock: Path) -> RuntimeContext:
    """A build context holding the wheel and the lock, under the names the Containerfile's defaults use."""
    (dest / "wheels").mkdir(parents=True)
    shutil.copy2(wheel, dest / "wheels" / wheel.name)
    shutil.copy2(lock, dest / "requirements.lock")
    return RuntimeContext(dest, "requirements.lock", "wheels")


def build_runtime_image(podman: Podman, context: RuntimeContext, *, tag: str = RUNTIME_TAG, base: str = BASE_IMAGE,
                        no_cache: bool = False) -> BuildResult:
    return podman.build(
        RUNTIME_CONTAINERFILE,
        context.path,
        tag,
        build_args={"BASE": base, "UID": str(UIDS[USER_GATEWAY]), "GID": str(GID_GATEWAY), **context.build_args},
        secrets={"pip_cert": PIP_CERT} if PIP_CERT.is_file() else {},
        no_cache=no_cache,
    )


def build_proxy_image(podman: Podman, empty_context: Path, *, tag: str = PROXY_TAG, base: str = BASE_IMAGE,
                      no_cache: bool = False) -> BuildResult:
    empty_context.mkdir(parents=True, exist_ok=True)
    return podman.build(PROXY_CONTAINERFILE, empty_context, tag, build_args={"BASE": base, "UID": str(UIDS[USER_CADDY]), "GID": str(GID_GATEWAY)}, no_cache=no_cache)


def image_user(podman: Podman, tag: str) -> str:
    """The USER an image runs as when nothing overrides it ("uid:gid")."""
    return podman.text("image", "inspect", tag, "--format", "{{.Config.User}}").strip()


def run_once(podman: Podman, tag: str, argv: list[str]) -> subprocess.CompletedProcess[bytes]:
    """`podman run --rm` with no network: what the image does by itself."""
    return podman.run("run", "--rm", "--network", "none", tag, *argv, check=False, timeout=120)

"""Build (once) and find the Debian 12 disk image the VM tests boot: a stand-in for a cloud's stock Debian 12 image.

The image holds what a cloud's image holds (kernel, systemd, udev, cloud-init, sshd, sudo, curl, python3,
ifupdown) plus qemu-guest-agent, through which the tests talk to the guest. It holds nothing the gateway's
user data installs (Caddy, Prometheus, ...): the user data installs those from the Debian mirror while the
VM boots, as it does on a cloud. The image is a raw ext4 file system without a partition table (QEMU boots
its kernel and initrd directly), built by debootstrap from this machine's mirror and cached under
`<cache>/vm/debian12-<recipe hash>/`; a change to the recipe below builds a new one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from gpugate_runtime.vllmenv import PrepareError, run_step

from gpugate.cache import cache_lock, default_cache_dir

from tests.vm.apt_sources import RELEASE, guest_sources_files, release_mirror

log = logging.getLogger(__name__)

# Bump when the build steps change in a way the recipe below does not show.
BUILD_SCRIPT_VERSION = 4
IMAGE_PREFIX = "debian12"
LOCK_NAME = "debian12-image"
DISK_NAME = "disk.raw"
KERNEL_NAME = "vmlinuz"
INITRD_NAME = "initrd.img"
RECIPE_NAME = "recipe.json"
IMAGE_SIZE = "4G"  # the file system's size; an overlay may be larger and cloud-init's resizefs grows it
ROOT_DEVICE = "/dev/vda"  # the first virtio disk, which Vm attaches the overlay as
FS_LABEL = "cloudimg-rootfs"

KERNEL_PACKAGE = "linux-image-cloud-amd64"  # the kernel Debian's cloud images boot
POLICY_RC_D = "#!/bin/sh\n# gpugate VM image build: start no service inside the build chroot\nexit 101\n"
# debootstrap's minbase plus what a cloud's Debian 12 image has. python3-cffi-backend must be named:
# without it debootstrap cannot configure python3-cryptography and cloud-init stays unconfigured.
PACKAGES: tuple[str, ...] = (
    KERNEL_PACKAGE,
    "systemd-sysv",
    "udev",
    "kmod",
    "dbus",
    "procps",
    "e2fsprogs",
    "cloud-init",
    "python3",
    "python3-cffi-backend",
    "openssh-server",
    "sudo",
    "curl",
    "ca-certificates",
    "gpg",
    "ifupdown",
    "isc-dhcp-client",
    "iproute2",
    "netbase",
    "qemu-guest-agent",
)

# Debian packages the VM stacks' user data installs (tests/vm/test_packages.py keeps this a superset),
# downloaded into the image's apt cache with the indexes they came from: the guest's cloud-init still runs
# `apt-get update` and installs them for real (resolve, unpack, configure), but need not fetch 54 MB through
# QEMU's user network, which under an emulated CPU moves about 100-300 kB/s. A cloud's image has no such
# cache; its network is fast.
APT_CACHE: tuple[str, ...] = (
    "caddy",
    "prometheus",
    "prometheus-alertmanager",
    "python3-venv",
    "python3-boto3",
    "curl",
    "gpg",
)

# The datasource list stops cloud-init from probing cloud metadata addresses; the locale module
# fails on a minbase system (no `locales` package), as it does not on a cloud image.
CLOUD_CFG = """\
# gpugate VM test image: read the NoCloud seed only, never probe a cloud's metadata address.
datasource_list: [ NoCloud, None ]
locale: false
"""
FSTAB = f"{ROOT_DEVICE} / ext4 errors=remount-ro 0 1\n"
HOSTNAME = "debian\n"
HOSTS = "127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n"
INTERFACES = """\
# cloud-init writes the interfaces it configures to interfaces.d
auto lo
iface lo inet loopback

source /etc/network/interfaces.d/*
"""

CERT_RE = re.compile(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
DEBIAN_CA_DIR = Path("/usr/share/ca-certificates")
GUEST_EXTRA_CA_DIR = "usr/local/share/ca-certificates"


class DiskImageError(RuntimeError):
    """The image could not be built; the message says which step failed."""


@dataclass(frozen=True)
class DiskImage:
    """A built image: the read-only raw disk and the kernel and initrd QEMU boots it with."""

    directory: Path
    key: str

    @property
    def disk(self) -> Path:
        return self.directory / DISK_NAME

    @property
    def kernel(self) -> Path:
        return self.directory / KERNEL_NAME

    @property
    def initrd(self) -> Path:
        return self.directory / INITRD_NAME

    def overlay(self, dest: Path, size: str = "8G") -> Path:
        """A qcow2 file at `dest` that reads through to the image and takes every write, so the image never changes."""
        run_step(
            "qemu-img create (overlay)",
            ["qemu-img", "create", "-q", "-f", "qcow2", "-b", self.disk, "-F", "raw", dest, size],
        )
        return dest


def _normalised(pem: str) -> str:
    return re.sub(r"\s", "", pem)


def host_extra_ca_certs() -> list[str]:
    """CA certificates this machine trusts beyond Debian's own set (e.g. an HTTPS proxy's), in bundle order.

    The guest trusts them too, so HTTPS from inside it (pip, curl) works as it does on this machine.
    """
    if not HOST_CA_BUNDLE.is_file():
        return []
    debian = {_normalised(CERT_RE.search(p.read_text()).group(0)) for p in DEBIAN_CA_DIR.rglob("*.crt")
              if CERT_RE.search(p.read_text())}
    return [pem + "\n" for pem in CERT_RE.findall(HOST_CA_BUNDLE.read_text()) if _normalised(pem) not in debian]


def recipe() -> dict[str, object]:
    """Everything that decides the image's content; its hash names the cached image."""
    files = {
        "etc/cloud/cloud.cfg.d/99-gpugate-vm-image.cfg": CLOUD_CFG,
        "etc/fstab": FSTAB,
        "etc/hostname": HOSTNAME,
        "etc/hosts": HOSTS,
        "etc/network/interfaces": INTERFACES,
    }
    files |= {f"etc/apt/sources.list.d/{name}": text for name, text in guest_sources_files().items()}
    files |= {f"{GUEST_EXTRA_CA_DIR}/host-{i}.crt": pem for i, pem in enumerate(host_extra_ca_certs())}
    return {
        "build_script_version": BUILD_SCRIPT_VERSION,
        "release": RELEASE,
        "mirror": release_mirror(),
        "packages": list(PACKAGES),
        "apt_cache": list(APT_CACHE),
        "size": IMAGE_SIZE,
        "files": files,
    }


def recipe_key(spec: dict[str, object]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def image_root(cache_dir: Path | None = None) -> Path:
    """`<cache>/vm`: images, the debootstrap package cache and the Debian package indices."""
    return (cache_dir or default_cache_dir()) / "vm"


def find_disk_image(cache_dir: Path | None = None) -> DiskImage | None:
    """The image the current recipe names, if it is built; never builds."""
    key = recipe_key(recipe())
    image = DiskImage(image_root(cache_dir) / f"{IMAGE_PREFIX}-{key}", key)
    return image if (image.directory / RECIPE_NAME).is_file() else None


def ensure_disk_image(cache_dir: Path | None = None) -> DiskImage:
    """The cached image for the current recipe, built first if missing (about 5-10 min here); safe in parallel."""
    root = image_root(cache_dir)
    spec = recipe()
    key = recipe_key(spec)
    image = DiskImage(root / f"{IMAGE_PREFIX}-{key}", key)
    if (image.directory / RECIPE_NAME).is_file():
        return image
    with cache_lock(root, LOCK_NAME):
        if (image.directory / RECIPE_NAME).is_file():  # another process built it while we waited
            return image
        for dead in root.glob(".build-*"):  # builds run only under this lock: these are from killed builds
            _remove_build_dir(dead)
        started = time.monotonic()
        log.info("building the Debian 12 VM image %s (debootstrap from %s)", image.directory, spec["mirror"])
        build_dir = Path(tempfile.mkdtemp(prefix=f".build-{key}-", dir=root))
        try:
            _build(spec, root, build_dir)
            build_dir.chmod(0o755)  # mkdtemp made it private
            build_dir.rename(image.directory)  # atomic: readers see a whole image or none
        except BaseException:
            _remove_build_dir(build_dir)
            raise
        _remove_stale_images(root, keep=image.directory)
        log.info("built %s in %.0f s", image.directory, time.monotonic() - started)
    return image


def _remove_build_dir(build_dir: Path) -> None:
    """Remove a build directory, first unmounting what a killed debootstrap or upgrade left mounted in it."""
    prefix = str(build_dir.resolve()) + "/"
    mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
    for mount_point in sorted((m for m in mounts if m.startswith(prefix)), key=len, reverse=True):
        subprocess.run(["umount", "-l", mount_point], check=False)
    shutil.rmtree(build_dir, ignore_errors=True)


def _build(spec: dict[str, object], root: Path, build_dir: Path) -> None:
    rootfs = build_dir / "rootfs"
    debs = root / "debs"  # debootstrap's download cache: a rebuild downloads only what changed
    debs.mkdir(parents=True, exist_ok=True)
    try:
        run_step(
            "debootstrap",
            [
                "debootstrap", "--variant=minbase", f"--include={','.join(spec['packages'])}",  # type: ignore[arg-type]
                f"--cache-dir={debs}", RELEASE, rootfs, spec["mirror"],
            ],
        )
        _configure(rootfs, spec["files"])  # type: ignore[arg-type]
        kernel_release = _upgrade(rootfs)
        _clean(rootfs)
        _copy_boot_files(rootfs, build_dir, kernel_release)
        disk = build_dir / DISK_NAME
        run_step("truncate", ["truncate", "-s", IMAGE_SIZE, disk])
        run_step("mkfs.ext4", ["mkfs.ext4", "-q", "-F", "-L", FS_LABEL, "-d", rootfs, disk])
        disk.chmod(0o444)
    except PrepareError as exc:
        raise DiskImageError(f"building the VM image in {build_dir}: {exc}") from exc
    finally:
        shutil.rmtree(rootfs, ignore_errors=True)
    (build_dir / RECIPE_NAME).write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n")


def _configure(rootfs: Path, files: dict[str, str]) -> None:
    """Check debootstrap's work, then write the image's config files and trust this machine's extra CAs."""
    leftover = rootfs / "usr/sbin/policy-rc.d"
    if leftover.exists():
        raise DiskImageError(
            f"{leftover} is left over: debootstrap did not finish configuring packages, and every service "
            "in the guest would refuse to start"
        )
    unconfigured = run_step("dpkg --audit", ["chroot", rootfs, "dpkg", "--audit"]).strip()
    if unconfigured:
        raise DiskImageError(f"packages left unconfigured in the image:\n{unconfigured}")
    (rootfs / "etc/apt/sources.list").unlink(missing_ok=True)  # debootstrap's; the host's sources replace it
    for relative, text in files.items():
        path = rootfs / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    run_step("update-ca-certificates", ["chroot", rootfs, "update-ca-certificates"])


def _upgrade(rootfs: Path) -> str:
    """Apply the release's updates and security fixes, as a cloud's freshly published image has them.

    Returns the release of the kernel the image boots (the one `linux-image-cloud-amd64` depends on now);
    older kernels are purged.
    """
    policy = rootfs / "usr/sbin/policy-rc.d"
    policy.write_text(POLICY_RC_D)  # without it, an upgraded package's init script would start a daemon here
    policy.chmod(0o755)
    proc = rootfs / "proc"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    # No Recommends, as debootstrap installed none (the new kernel's would add apparmor and firmware).
    apt = ["chroot", rootfs, "apt-get", "-y", "-q", "--no-install-recommends", "-o", "Dpkg::Options::=--force-confold"]
    run_step("mount /proc in the image", ["mount", "-t", "proc", "proc", proc])
    try:
        run_step("apt-get update (image)", ["chroot", rootfs, "apt-get", "-q", "update"], env)
        run_step("apt-get dist-upgrade (image)", [*apt, "dist-upgrade"], env)
        depends = run_step(
            "dpkg-query (kernel)", ["chroot", rootfs, "dpkg-query", "-W", "-f", "${Depends}", KERNEL_PACKAGE]
        )
        match = re.match(r"linux-image-(\S+)", depends.strip())
        if match is None:
            raise DiskImageError(f"cannot tell which kernel {KERNEL_PACKAGE} depends on: {depends!r}")
        release = match.group(1)
        known = run_step(
            "dpkg-query (kernels)",
            ["chroot", rootfs, "dpkg-query", "-W", "-f", "${db:Status-Abbrev}${Package}\n", "linux-image-[0-9]*"],
        ).splitlines()
        installed = [line[3:] for line in known if line.startswith("ii ")]
        older = [name for name in installed if name != f"linux-image-{release}"]
        if older:
            run_step("apt-get purge (older kernels)", [*apt, "purge", *older], env)
        run_step("apt-get clean (image)", ["chroot", rootfs, "apt-get", "clean"], env)
        run_step("apt-get install --download-only (the VM stacks' packages)", [*apt, "install", "--download-only", *APT_CACHE], env)
    finally:
        run_step("umount /proc in the image", ["umount", proc])
        policy.unlink()
    return release


def _clean(rootfs: Path) -> None:
    """No identity and no state of the build machine in the image."""
    (rootfs / "etc/resolv.conf").unlink(missing_ok=True)  # debootstrap copied this machine's; DHCP writes the guest's
    # Each boot is a new machine: systemd makes a machine id, cloud-init makes SSH host keys.
    (rootfs / "etc/machine-id").write_text("")
    (rootfs / "var/lib/dbus/machine-id").unlink(missing_ok=True)
    for key in (rootfs / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    # Kept: the package indexes and the downloaded .debs of APT_CACHE (nothing else is in the cache: the
    # upgrade's were cleaned before they were fetched).


def _copy_boot_files(rootfs: Path, build_dir: Path, kernel_release: str) -> None:
    for source, name in ((f"vmlinuz-{kernel_release}", KERNEL_NAME), (f"initrd.img-{kernel_release}", INITRD_NAME)):
        path = rootfs / "boot" / source
        if not path.is_file():
            raise DiskImageError(f"{path} is missing after the upgrade; /boot holds {sorted(p.name for p in path.parent.iterdir())}")
        shutil.copyfile(path, build_dir / name)


def _remove_stale_images(root: Path, keep: Path) -> None:
    """Images built from an older recipe are never booted again; a running VM keeps its open file."""
    for old in root.glob(f"{IMAGE_PREFIX}-*"):
        if old != keep and old.is_dir():
            log.info("removing stale VM image %s", old)
            shutil.rmtree(old, ignore_errors=True)


def main() -> None:
    """`python -m tests.vm.disk_image`: build (or find) the image and print where it is."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    started = time.monotonic()
    image = ensure_disk_image()
    elapsed = time.monotonic() - started
    result = subprocess.run(["du", "-sh", "--apparent-size", image.disk], capture_output=True, text=True)
    log.info("image %s ready in %.2f s (%s)", image.directory, elapsed, result.stdout.split("\t")[0])


if __name__ == "__main__":
    main()

"""cloud-init user data for VM targets: Debian packages, the boot script and its config, the first-boot script.

The bundle itself does not travel in user data (16 KiB on AWS, and readable with
ec2:DescribeInstanceAttribute / compute.instances.get): the host fetches it, and its secrets, with its own
identity (gpugate/vm/delivery.py, gpugate_runtime/hostboot.py). What the clouds receive is the document
gzipped (`delivered`); cloud-init unpacks it.
"""

from __future__ import annotations

import gzip
import io
import json
from dataclasses import dataclass
from pathlib import Path

from gpugate_runtime import hostboot
from gpugate_runtime.contract.host import VM_RUNTIME_VENV, HostLayout
from gpugate_runtime.contract.services import GROUP_GATEWAY, USER_GATEWAY, Service, unit_name
from ruamel.yaml import YAML
from ruamel.yaml.scalarstring import LiteralScalarString

from gpugate.render.templates import render_template
from gpugate.spec import GatewaySpec, Target
from gpugate.vm.delivery import BOOT_CONFIG, boot_config

USER_DATA = "cloud-init/user-data.yaml"
# The boot package, as the top-level package gpugate_hostboot (its modules import each other relatively).
HOSTBOOT_LIB = Path("/usr/local/lib/gpugate")
HOSTBOOT = HOSTBOOT_LIB / "gpugate_hostboot"
FIRSTBOOT = Path("/usr/local/lib/gpugate/firstboot.sh")
RUNTIME_LOCK = "runtime/requirements.lock"
# Debian 12 packages every VM host installs (tests/vm checks each name against the release's index).
PACKAGES = ("caddy", "prometheus", "prometheus-alertmanager", "python3-venv", "curl", "gpg")
# hostboot's S3 and Secrets Manager client on AWS (GCP needs only the standard library).
AWS_PACKAGES = ("python3-boto3",)
# GPU hosts: Docker from Debian, kernel headers for the NVIDIA driver's module.
GPU_PACKAGES = ("docker.io", "linux-headers-cloud-amd64")
# AWS takes 16 KiB of user data (before base64), GCP 256 KiB per metadata value: the stricter one binds.
USER_DATA_LIMIT_BYTES = 16 * 1024


@dataclass(frozen=True)
class NvidiaRepos:
    """NVIDIA's apt repositories for Debian 12: the CUDA repository's driver (its keyring package sets up the
    source) and the container toolkit's. Fetched over HTTPS from NVIDIA at first boot, as NVIDIA documents."""

    image: str
    cuda_keyring_url: str = "https://developer.download.nvidia.com/compute/cuda/repos/debian12/x86_64/cuda-keyring_1.1-1_all.deb"
    toolkit_key_url: str = "https://nvidia.github.io/libnvidia-container/gpgkey"
    toolkit_keyring: str = "/usr/share/keyrings/nvidia-container-toolkit-keyring.gpg"
    toolkit_repo: str = "https://nvidia.github.io/libnvidia-container/stable/deb/$(ARCH) /"
    packages: tuple[str, ...] = ("nvidia-open", "nvidia-container-toolkit")


def packages(spec: GatewaySpec) -> list[str]:
    """The Debian packages the user data installs for this stack."""
    out = list(PACKAGES)
    if spec.target is Target.AWS:
        out += AWS_PACKAGES
    if spec.gpu.type != "cpu":
        out += GPU_PACKAGES
    return out


def hostboot_files() -> list[dict[str, str]]:
    """The runtime's boot package, verbatim, one write_files entry a module."""
    package = Path(hostboot.__file__).parent
    return [
        {"path": str(HOSTBOOT / source.name), "content": source.read_text(), "permissions": "0644", "owner": "root:root"}
        for source in sorted(package.glob("*.py"))
    ]


def firstboot_script(spec: GatewaySpec, layout: HostLayout, table: tuple[Service, ...], wheel: str, header: str) -> bytes:
    return render_template(
        "vm/firstboot.sh.j2",
        header=header,
        layout=layout,
        user=USER_GATEWAY,
        group=GROUP_GATEWAY,
        hostboot_lib=HOSTBOOT_LIB,
        hostboot=HOSTBOOT.name,
        boot_config=BOOT_CONFIG,
        venv=VM_RUNTIME_VENV,
        runtime_lock=RUNTIME_LOCK,
        wheel=wheel,
        gpu=NvidiaRepos(image=spec.vllm.image) if spec.vllm.image else None,
        units=[f"{unit_name(s)}.service" for s in table],
        # What a service writes beyond the state and log dirs (vLLM's venv on a CPU host), owned by it.
        owned=sorted({(str(path), s.user) for s in table for path in s.writes if path not in (layout.state, layout.logs)}),
    )


def user_data(
    spec: GatewaySpec, stack: str, layout: HostLayout, table: tuple[Service, ...], wheel: str, archive_sha256: str, header: str
) -> bytes:
    document = {
        # Exactly the packages named, none of their Recommends: prometheus would bring
        # prometheus-node-exporter, listening on every address at :9100 (seen in the boot test).
        "apt": {"preserve_sources_list": True, "conf": 'APT::Install-Recommends "false";\n'},
        "package_update": True,
        "packages": packages(spec),
        "write_files": [
            {
                "path": str(BOOT_CONFIG),
                "content": json.dumps(boot_config(spec, stack, layout, archive_sha256), indent=1, sort_keys=True) + "\n",
                "permissions": "0600",
                "owner": "root:root",
            },
            *hostboot_files(),
            {
                "path": str(FIRSTBOOT),
                "content": firstboot_script(spec, layout, table, wheel, header).decode(),
                "permissions": "0755",
                "owner": "root:root",
            },
        ],
        "runcmd": [["sh", str(FIRSTBOOT)]],
    }
    return ("#cloud-config\n" + _readable_yaml(document, header)).encode()


def _readable_yaml(document: dict, header: str) -> str:
    """YAML with keys sorted and every multi-line string (scripts, the boot config) as a literal block,
    so the user data reads as the files it writes."""

    def blocks(value: object) -> object:
        if isinstance(value, dict):
            return {k: blocks(value[k]) for k in sorted(value)}
        if isinstance(value, list):
            return [blocks(v) for v in value]
        if isinstance(value, str) and "\n" in value:
            return LiteralScalarString(value)
        return value

    yaml = YAML(typ="rt", pure=True)
    yaml.default_flow_style = False
    yaml.width = 4096
    buffer = io.StringIO()
    buffer.write(f"# {header}\n")
    yaml.dump(blocks(document), buffer)
    return buffer.getvalue()


def delivered(user_data_yaml: bytes) -> bytes:
    """What a cloud receives: the document gzipped (fixed mtime: the same bundle gives the same bytes)."""
    return gzip.compress(user_data_yaml, compresslevel=9, mtime=0)

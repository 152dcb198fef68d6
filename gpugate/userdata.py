"""cloud-init user-data for VM targets: writes the bundle to the host and starts its services."""

from __future__ import annotations

import base64
import gzip
from typing import TYPE_CHECKING

from gpugate_runtime import __version__ as runtime_version
from gpugate_runtime.host import HostLayout

if TYPE_CHECKING:
    from gpugate.render import Bundle

SERVICES = ("gpugate-authz", "gpugate-vllm", "gpugate-caddy", "gpugate-prober", "gpugate-prometheus", "gpugate-alertmanager")
PACKAGES = ("caddy", "prometheus", "prometheus-alertmanager", "python3-venv")
# AWS allows 16 KiB of user-data, GCP 256 KiB of metadata per value: the stricter one binds.
USER_DATA_LIMIT_BYTES = 16 * 1024


def _compressed(data: bytes) -> str:
    # mtime=0 keeps the gzip stream, and so the bundle, byte-identical between renders.
    return base64.b64encode(gzip.compress(data, compresslevel=9, mtime=0)).decode()


def user_data_document(bundle: "Bundle", layout: HostLayout) -> dict:
    from gpugate.render import USER_DATA, MANIFEST  # noqa: PLC0415 - avoid an import cycle

    etc = layout.etc
    files = [
        {
            "path": str(etc / relpath),
            "encoding": "gz+b64",
            "content": _compressed(data),
            "permissions": "0644",
            "owner": "root:root",
        }
        for relpath, data in sorted(bundle.files.items())
        if relpath not in (USER_DATA, MANIFEST)
    ]
    files.append({"path": str(etc / "BUNDLE_SHA256"), "content": bundle.bundle_sha256 + "\n", "permissions": "0644"})
    image = next(
        (line for line in bundle.files["vllm/launch.json"].decode().splitlines() if '"image"' in line), ""
    ).split('"')[-2:-1]
    runcmd: list[list[str] | str] = [
        ["useradd", "--system", "--home-dir", str(layout.state), "--shell", "/usr/sbin/nologin", "gpugate"],
        ["install", "-d", "-m", "0750", "-o", "gpugate", "-g", "gpugate", str(layout.state), str(layout.logs)],
        ["install", "-d", "-m", "0700", str(layout.secrets)],
        ["python3", "-m", "venv", "/opt/gpugate/venv"],
        ["/opt/gpugate/venv/bin/pip", "install", "--no-cache-dir", f"gpugate-runtime=={runtime_version}"],
    ]
    if image:
        runcmd.append(["docker", "pull", image[0]])
    runcmd += [
        "cp /etc/gpugate/systemd/*.service /etc/systemd/system/",
        ["systemctl", "daemon-reload"],
        ["systemctl", "disable", "--now", "caddy.service", "prometheus.service", "prometheus-alertmanager.service"],
        ["systemctl", "enable", "--now", *[f"{s}.service" for s in SERVICES]],
    ]
    return {
        "package_update": True,
        "packages": list(PACKAGES),
        "write_files": files,
        "runcmd": runcmd,
    }


def user_data(bundle: "Bundle", layout: HostLayout, header: str) -> bytes:
    from gpugate.render import dump_yaml  # noqa: PLC0415

    body = dump_yaml(user_data_document(bundle, layout), header).decode()
    return ("#cloud-config\n" + body).encode()

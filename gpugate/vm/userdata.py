"""cloud-init user-data for VM targets: writes the bundle to the host and starts its services."""

from __future__ import annotations

import base64
import gzip

from gpugate_runtime import __version__ as runtime_version
from gpugate_runtime.contract.host import VM_RUNTIME_VENV, HostLayout
from gpugate_runtime.contract.services import Service, unit_name
from gpugate_runtime.launchspec import LaunchSpec

from gpugate.render.bundle import MANIFEST, Bundle, dump_yaml

USER_DATA = "cloud-init/user-data.yaml"
PACKAGES = ("caddy", "prometheus", "prometheus-alertmanager", "python3-venv")
# AWS allows 16 KiB of user-data, GCP 256 KiB of metadata per value: the stricter one binds.
USER_DATA_LIMIT_BYTES = 16 * 1024


def _compressed(data: bytes) -> str:
    # mtime=0 keeps the gzip stream, and so the bundle, byte-identical between renders.
    return base64.b64encode(gzip.compress(data, compresslevel=9, mtime=0)).decode()


def user_data_document(bundle: Bundle, layout: HostLayout, table: tuple[Service, ...], launch: LaunchSpec) -> dict:
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
    venv = str(VM_RUNTIME_VENV)
    state, logs = str(layout.state), str(layout.logs)
    runcmd: list[list[str] | str] = [
        ["useradd", "--system", "--home-dir", state, "--shell", "/usr/sbin/nologin", "gpugate"],
        # Caddy writes the access log authz reads; Prometheus' data lives under the state dir.
        ["usermod", "-aG", "gpugate", "caddy"],
        ["usermod", "-aG", "gpugate", "prometheus"],
        ["install", "-d", "-m", "0770", "-o", "root", "-g", "gpugate", state, logs],
        ["install", "-d", "-m", "0700", "-o", "caddy", "-g", "caddy", str(layout.caddy_storage)],
        ["install", "-d", "-m", "0700", "-o", "prometheus", "-g", "prometheus", f"{state}/prometheus", f"{state}/alertmanager"],
        ["install", "-d", "-m", "0700", str(layout.secrets)],
        # authz (user gpugate) follows Caddy's access log to release concurrency slots; Caddy keeps
        # an existing file's owner and mode, also when it rolls the log.
        ["install", "-m", "0640", "-o", "caddy", "-g", "gpugate", "/dev/null", str(layout.access_log)],
        ["python3", "-m", "venv", venv],
        [f"{venv}/bin/pip", "install", "--no-cache-dir", f"gpugate-runtime[gpu]=={runtime_version}"],
        # The prober's own client key: created once, as the user authz reads the key store as.
        (
            f"test -s {layout.prober_key_file} || (umask 077; runuser -u gpugate -- {venv}/bin/python -m gpugate_runtime"
            f" keys create prober --store {layout.key_store} --json"
            f" | python3 -c 'import json,sys; print(json.load(sys.stdin)[\"key\"])' > {layout.prober_key_file})"
        ),
    ]
    if launch.image:
        runcmd.append(["docker", "pull", launch.image])
    runcmd += [
        "cp /etc/gpugate/systemd/*.service /etc/systemd/system/",
        ["systemctl", "daemon-reload"],
        ["systemctl", "disable", "--now", "caddy.service", "prometheus.service", "prometheus-alertmanager.service"],
        ["systemctl", "enable", "--now", *[f"{unit_name(s)}.service" for s in table]],
    ]
    return {
        "package_update": True,
        "packages": list(PACKAGES),
        "write_files": files,
        "runcmd": runcmd,
    }


def user_data(bundle: Bundle, layout: HostLayout, table: tuple[Service, ...], launch: LaunchSpec, header: str) -> bytes:
    body = dump_yaml(user_data_document(bundle, layout, table, launch), header).decode()
    return ("#cloud-config\n" + body).encode()

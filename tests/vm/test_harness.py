"""The VM harness works end to end: one real Debian 12 guest boots from cloud-init user data under QEMU.

The user data installs Caddy from the Debian mirror (`packages:`) and configures it, as gpugate's own
user data does on a cloud; each test proves one mechanism the gateway boot test relies on.
"""

from __future__ import annotations

import http.server
import re
import secrets
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.vm.conftest import VM_TEST_TIMEOUT_S
from tests.vm.disk_image import DiskImage
from tests.vm.qemu import GUEST_FORWARD_ADDRESS, HOST_LOOPBACK, Vm, free_loopback_port

pytestmark = [pytest.mark.vm, pytest.mark.e2e, pytest.mark.timeout(VM_TEST_TIMEOUT_S)]

CLOUD_INIT_TIMEOUT_S = 1200  # ~150 s for an empty user data here, plus apt installing Caddy, on 2 loaded cores
HOSTNAME = "harness-vm"
ENV_NAME = "GPUGATE_VM_HARNESS_PROBE"
RUNCMD_ENV_FILE = "/var/tmp/gpugate-runcmd.env"
CADDY_PORT = 80

USER_DATA_TEMPLATE = """\
#cloud-config
packages: [caddy]
write_files:
  - path: /etc/caddy/Caddyfile
    defer: true  # after `packages:` installed Caddy, so its package's own Caddyfile does not win
    content: |
      :{caddy_port} {{
        respond "harness says hello from {{system.hostname}}"
      }}
runcmd:
  - [sh, -c, 'env > {env_file}']
  - [systemctl, restart, caddy]
"""


class _HostService:
    """A Python http.server on host loopback that answers GET /token with a secret: what the guest forward must reach."""

    def __init__(self) -> None:
        self.token = secrets.token_hex(16)
        self.requests = 0
        service = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                service.requests += 1
                body = service.token.encode() if self.path == "/token" else b"not found"
                self.send_response(200 if self.path == "/token" else 404)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

        self.server = http.server.ThreadingHTTPServer((HOST_LOOPBACK, 0), Handler)
        self.port = int(self.server.server_address[1])
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def host_service() -> Iterator[_HostService]:
    service = _HostService()
    yield service
    service.close()


@pytest.fixture(scope="module")
def env_value() -> str:
    return secrets.token_hex(8)


@pytest.fixture(scope="module")
def vm(vm_image: DiskImage, vm_workdir: Path, host_service: _HostService, env_value: str) -> Iterator[Vm]:
    user_data = USER_DATA_TEMPLATE.format(caddy_port=CADDY_PORT, env_file=RUNCMD_ENV_FILE).encode()
    machine = Vm(
        vm_image,
        user_data,
        vm_workdir,
        meta_data=f"instance-id: harness-{env_value}\nlocal-hostname: {HOSTNAME}\n",
        host_forwards={CADDY_PORT: free_loopback_port()},
        guest_forwards={host_service.port: host_service.port},
        kernel_args=[f"systemd.setenv={ENV_NAME}={env_value}"],
    )
    with machine:
        machine.wait_cloud_init(CLOUD_INIT_TIMEOUT_S)
        yield machine


def test_cloud_init_finishes_and_installs_packages_from_the_mirror(vm: Vm) -> None:
    status = vm.exec(["cloud-init", "status", "--long"])
    assert status.rc == 0 and "status: done" in status.stdout, status
    caddy = vm.exec(["dpkg-query", "-W", "-f", "${Status} ${Version}", "caddy"])
    assert caddy.stdout.startswith("install ok installed 2."), caddy


def test_guest_exec_returns_exit_code_stdout_and_stderr(vm: Vm) -> None:
    result = vm.exec(["sh", "-c", "echo to-stdout; echo to-stderr >&2; exit 7"])
    assert (result.rc, result.stdout, result.stderr) == (7, "to-stdout\n", "to-stderr\n")
    assert vm.read_file("/etc/hostname").decode().strip() == HOSTNAME


def test_forwarded_guest_port_answers_on_host_loopback_only(vm: Vm) -> None:
    host_port = vm.host_port(CADDY_PORT)
    response = httpx.get(f"http://{HOST_LOOPBACK}:{host_port}/", timeout=30)
    assert response.status_code == 200
    assert response.text == f"harness says hello from {HOSTNAME}"
    # QEMU listens for the forward on loopback and on no other address of this machine.
    listening = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    qemu_sockets = [line.split()[3] for line in listening.splitlines() if f"pid={vm.pid}," in line]
    assert qemu_sockets == [f"{HOST_LOOPBACK}:{host_port}"]


def test_ss_in_the_guest_lists_its_listeners(vm: Vm) -> None:
    result = vm.exec(["ss", "-ltnH"])
    assert result.rc == 0, result
    ports = {int(re.sub(r".*:", "", line.split()[3])) for line in result.stdout.splitlines()}
    assert {CADDY_PORT, 22} <= ports, result.stdout


def test_kernel_command_line_setenv_reaches_runcmd(vm: Vm, env_value: str) -> None:
    environment = vm.read_file(RUNCMD_ENV_FILE).decode()
    assert f"{ENV_NAME}={env_value}" in environment.splitlines()


def test_guest_reaches_a_host_loopback_service_through_the_guest_forward(vm: Vm, host_service: _HostService) -> None:
    before = host_service.requests
    url = f"http://{GUEST_FORWARD_ADDRESS}:{host_service.port}/token"
    for attempt in range(3):  # three connections: each gets its own relay on the host
        result = vm.exec(["curl", "-sS", "--max-time", "30", url], timeout=60)
        assert (result.rc, result.stdout) == (0, host_service.token), (attempt, result)
    assert host_service.requests == before + 3

"""Boot the test image in QEMU with a cloud-init NoCloud seed, and reach the guest through qemu-guest-agent.

QEMU emulates the CPU (TCG): this machine is itself a VM without nested virtualisation. The guest gets a
qcow2 overlay on the cached image, so the image never changes; its TCP ports are forwarded to this
machine's loopback only, and it can reach chosen loopback services of this machine at GUEST_FORWARD_ADDRESS.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

from gpugate_runtime.vllmenv import PrepareError, run_step

from tests.vm import guest_forward_relay
from tests.vm.disk_image import ROOT_DEVICE, DiskImage
from tests.vm.guest_agent import ExecResult, GuestAgent, GuestAgentError

log = logging.getLogger(__name__)

QEMU = "qemu-system-x86_64"
# Inside QEMU's user network (10.0.2.0/24): the guest connects here to reach a service on host loopback.
GUEST_FORWARD_ADDRESS = "10.0.2.100"
HOST_LOOPBACK = "127.0.0.1"
KERNEL_ARGS: tuple[str, ...] = (f"root={ROOT_DEVICE}", "rw", "console=ttyS0,115200", "net.ifnames=0")
AGENT_PORT_NAME = "org.qemu.guest_agent.0"  # the name the guest's udev rule starts qemu-guest-agent for
SERIAL_LOG = "serial.log"
QEMU_LOG = "qemu.log"
SOCKET_PATH_MAX = 107  # sun_path
TAIL_LINES = 40
CLOUD_INIT_POLL_S = 5.0
STOP_GRACE_S = 60.0  # an emulated guest takes a while to shut down


class VmError(RuntimeError):
    """The VM did not start, did not boot, or cloud-init failed; the message carries the evidence."""


def _tail(path: Path, lines: int = TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"({path} unreadable)"
    return "\n".join(text.splitlines()[-lines:])


def free_loopback_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST_LOOPBACK, 0))
        return int(sock.getsockname()[1])


class Vm:
    """A running QEMU guest booted from `image` with `user_data`; use it as a context manager.

    host_forwards: guest TCP port -> port on host 127.0.0.1 (0: pick a free one; see `host_port()`).
    guest_forwards: port the guest connects to at GUEST_FORWARD_ADDRESS -> port on host 127.0.0.1.
    kernel_args: appended to the kernel command line (e.g. `systemd.setenv=NAME=value`).
    tb_size_mib: TCG's translation cache; QEMU's default (1 GiB) makes most of its resident memory.
    """

    def __init__(
        self,
        image: DiskImage,
        user_data: bytes,
        workdir: Path,
        *,
        meta_data: str | None = None,
        vendor_data: bytes | None = None,
        memory_mib: int = 1024,
        cpus: int = 2,
        host_forwards: Mapping[int, int] | None = None,
        guest_forwards: Mapping[int, int] | None = None,
        kernel_args: Sequence[str] = (),
        disk_size: str = "8G",
        tb_size_mib: int | None = 256,
        multi_thread: bool = True,
    ) -> None:
        self.image = image
        self.user_data = user_data
        self.workdir = workdir
        self.instance_id = f"gpugate-vm-{uuid.uuid4().hex[:12]}"
        self.meta_data = meta_data or f"instance-id: {self.instance_id}\nlocal-hostname: gpugate-vm\n"
        # What a cloud adds next to the user's own user data (cloud-init runs a vendor script before runcmd).
        self.vendor_data = vendor_data
        self.memory_mib = memory_mib
        self.cpus = cpus
        self._host_forwards = {
            guest: (port or free_loopback_port()) for guest, port in (host_forwards or {}).items()
        }
        self.guest_forwards = dict(guest_forwards or {})
        self.kernel_args = tuple(kernel_args)
        self.disk_size = disk_size
        self.tb_size_mib = tb_size_mib
        self.multi_thread = multi_thread
        self.serial_log = workdir / SERIAL_LOG
        self.qemu_log = workdir / QEMU_LOG
        self._overlay = workdir / "overlay.qcow2"
        self._seed = workdir / "seed.iso"
        self._seed_inputs = (workdir / "user-data", workdir / "meta-data", workdir / "vendor-data")
        self._agent_socket = workdir / "qga.sock"
        self._qmp_socket = workdir / "qmp.sock"
        self._process: subprocess.Popen[bytes] | None = None
        self.agent = GuestAgent(self._agent_socket)
        self.started_at: float | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    def __enter__(self) -> Vm:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def host_port(self, guest_port: int) -> int:
        """The host loopback port that guest TCP port `guest_port` is forwarded to."""
        return self._host_forwards[guest_port]

    @property
    def pid(self) -> int:
        if self._process is None:
            raise VmError("the VM is not running")
        return self._process.pid

    def argv(self) -> list[str]:
        """QEMU's command line for this VM."""
        accel = "tcg"
        if self.tb_size_mib is not None:
            accel += f",tb-size={self.tb_size_mib}"
        accel += f",thread={'multi' if self.multi_thread else 'single'}"
        netdev = ["user", "id=net0"]
        netdev += [f"hostfwd=tcp:{HOST_LOOPBACK}:{host}-:{guest}" for guest, host in self._host_forwards.items()]
        relay = Path(guest_forward_relay.__file__)
        for guest, host in self.guest_forwards.items():
            command = shlex.join([sys.executable, str(relay), str(host)])
            if "," in command:
                raise VmError(f"guest forward command {command!r} holds a comma, which QEMU's option syntax splits on")
            netdev.append(f"guestfwd=tcp:{GUEST_FORWARD_ADDRESS}:{guest}-cmd:{command}")
        return [
            QEMU,
            "-nodefaults",
            "-display", "none",
            "-accel", accel,
            "-cpu", "max",
            "-smp", str(self.cpus),
            "-m", str(self.memory_mib),
            "-kernel", str(self.image.kernel),
            "-initrd", str(self.image.initrd),
            "-append", " ".join((*KERNEL_ARGS, *self.kernel_args)),
            "-drive", f"file={self._overlay},if=virtio,format=qcow2,cache=unsafe",  # a throwaway disk: skip flushes
            "-drive", f"file={self._seed},if=virtio,format=raw,readonly=on",
            "-netdev", ",".join(netdev),
            "-device", "virtio-net-pci,netdev=net0",
            "-device", "virtio-rng-pci",
            "-chardev", f"socket,id=qga0,path={self._agent_socket},server=on,wait=off",
            "-device", "virtio-serial-pci",
            "-device", f"virtserialport,chardev=qga0,name={AGENT_PORT_NAME}",
            "-qmp", f"unix:{self._qmp_socket},server=on,wait=off",
            "-serial", f"file:{self.serial_log}",
        ]

    def start(self) -> None:
        if self._process is not None:
            raise VmError("the VM is already running")
        for path in (self._agent_socket, self._qmp_socket):
            if len(str(path)) > SOCKET_PATH_MAX:
                raise VmError(f"socket path {path} is longer than {SOCKET_PATH_MAX} bytes; use a shorter workdir")
        self.workdir.mkdir(parents=True, exist_ok=True)
        user_data_file, meta_data_file, vendor_data_file = self._seed_inputs
        user_data_file.write_bytes(self.user_data)
        meta_data_file.write_text(self.meta_data)
        vendor = []
        if self.vendor_data is not None:
            vendor_data_file.write_bytes(self.vendor_data)
            vendor = ["--vendor-data", vendor_data_file]
        try:
            run_step(
                "cloud-localds (NoCloud seed)", ["cloud-localds", *vendor, self._seed, user_data_file, meta_data_file]
            )
            self.image.overlay(self._overlay, self.disk_size)
        except PrepareError as exc:
            self._remove_scratch()
            raise VmError(str(exc)) from exc
        argv = self.argv()
        log.info("starting %s", shlex.join(argv))
        with self.qemu_log.open("wb") as qemu_log:
            self._process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=qemu_log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.started_at = time.monotonic()
        # QEMU creates its sockets while it starts; a bad option makes it exit at once instead.
        deadline = time.monotonic() + 30
        while not (self._agent_socket.exists() and self._qmp_socket.exists()):
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise VmError(f"QEMU did not start (exit {self._process.returncode}):\n{_tail(self.qemu_log)}")
            time.sleep(0.1)

    def _check_running(self, what: str) -> None:
        if self._process is None:
            raise VmError(f"{what}: the VM is not running")
        if self._process.poll() is not None:
            raise VmError(
                f"{what}: QEMU exited with {self._process.returncode}\n"
                f"--- {self.qemu_log} ---\n{_tail(self.qemu_log)}\n--- {self.serial_log} ---\n{_tail(self.serial_log)}"
            )

    # -- the guest ---------------------------------------------------------------------------------

    def wait_agent(self, timeout: float) -> float:
        """Wait until the guest agent answers; returns the seconds since QEMU started."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_running("waiting for the guest agent")
            try:
                if self.agent.sync():
                    return time.monotonic() - (self.started_at or 0)
            except GuestAgentError:
                self.agent.close()
                time.sleep(1)
        self._check_running("waiting for the guest agent")
        raise VmError(
            f"the guest agent did not answer within {timeout:.0f} s of waiting\n"
            f"--- {self.serial_log} ---\n{_tail(self.serial_log)}"
        )

    def wait_cloud_init(self, timeout: float) -> float:
        """Wait until cloud-init has finished every stage; returns seconds since QEMU started.

        Raises VmError when cloud-init reports an error or runs past `timeout`, with `cloud-init status --long`,
        the tail of cloud-init-output.log and of the serial console.
        """
        deadline = time.monotonic() + timeout
        self.wait_agent(timeout)
        status = "unknown"
        while True:
            self._check_running("waiting for cloud-init")
            remaining = deadline - time.monotonic()
            try:
                result = self.exec(["cloud-init", "status"], timeout=max(remaining, 10))
                status = result.stdout.strip().removeprefix("status:").strip() or result.stderr.strip()
            except GuestAgentError as exc:
                status = f"unknown ({exc})"
            if status == "done":
                return time.monotonic() - (self.started_at or 0)
            if status.startswith(("error", "degraded")):
                raise VmError(f"cloud-init finished with status {status!r}\n{self._cloud_init_evidence()}")
            if time.monotonic() >= deadline:
                raise VmError(
                    f"cloud-init still {status!r} after {timeout:.0f} s\n{self._cloud_init_evidence()}"
                )
            time.sleep(min(CLOUD_INIT_POLL_S, max(deadline - time.monotonic(), 0)))

    def _cloud_init_evidence(self) -> str:
        parts = []
        for title, argv in (
            ("cloud-init status --long", ["cloud-init", "status", "--long"]),
            ("tail of /var/log/cloud-init-output.log", ["tail", "-n", str(TAIL_LINES), "/var/log/cloud-init-output.log"]),
        ):
            try:
                result = self.exec(argv, timeout=30)
                parts.append(f"--- {title} ---\n{result.stdout}{result.stderr}")
            except (GuestAgentError, VmError) as exc:
                parts.append(f"--- {title} --- unavailable: {exc}")
        parts.append(f"--- {self.serial_log} ---\n{_tail(self.serial_log)}")
        return "\n".join(parts)

    def exec(self, argv: Sequence[str], timeout: float = 60.0, stdin: bytes | None = None) -> ExecResult:
        """Run `argv` as root in the guest (no shell) and return (rc, stdout, stderr)."""
        self._check_running(f"exec {list(argv)}")
        return self.agent.exec(list(argv), timeout=timeout, stdin=stdin)

    def read_file(self, path: str, timeout: float = 30.0) -> bytes:
        """A file's content, read through the guest agent."""
        self._check_running(f"read {path}")
        return self.agent.read_file(path, timeout=timeout)

    def rss_bytes(self) -> tuple[int, int]:
        """QEMU's resident memory now and at its peak (VmRSS, VmHWM), in bytes."""
        values: dict[str, int] = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                values[name] = int(value.split()[0]) * 1024
        return values["VmRSS"], values["VmHWM"]

    # -- shutdown ------------------------------------------------------------------------------------

    def _qmp(self, command: str) -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(str(self._qmp_socket))
            reader = sock.makefile("rb")
            reader.readline()  # greeting
            for execute in ("qmp_capabilities", command):
                sock.sendall(json.dumps({"execute": execute}).encode() + b"\n")
                while True:
                    reply = json.loads(reader.readline() or b"{}")
                    if "event" not in reply:
                        break

    def stop(self, grace: float = STOP_GRACE_S) -> None:
        """Power the guest off (ACPI), kill QEMU if it outlives `grace`, and remove the overlay, seed and sockets."""
        process = self._process
        try:
            if process is not None and process.poll() is None:
                try:
                    self._qmp("system_powerdown")
                except (OSError, ValueError) as exc:
                    log.warning("QMP system_powerdown failed: %s", exc)
                try:
                    process.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    log.warning("the guest did not power off within %.0f s; killing QEMU (pid %d)", grace, process.pid)
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait(timeout=30)
        finally:
            self.agent.close()
            self._remove_scratch()

    def _remove_scratch(self) -> None:
        for path in (self._overlay, self._seed, *self._seed_inputs, self._agent_socket, self._qmp_socket):
            path.unlink(missing_ok=True)

"""Fixtures for the runbook tasks: a real sshd on 127.0.0.1 with a key made here, and `gpugate run` as a user runs it."""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.conftest import find_free_port

REPO = Path(__file__).resolve().parents[2]
SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
PRIVSEP_DIR = Path("/run/sshd")  # compiled into Debian's sshd; the ssh service creates it when it starts
SSHD_START_TIMEOUT_S = 10
RUN_TIMEOUT_S = 900


@dataclass(frozen=True)
class Sshd:
    """A running sshd that lets `user` in with `identity`; its host key is in `known_hosts` and nowhere else."""

    port: int
    user: str
    identity: Path
    known_hosts: Path
    log: Path

    @property
    def host(self) -> str:
        return f"{self.user}@127.0.0.1:{self.port}"

    def ssh_args(self) -> list[str]:
        return ["--host", self.host, "--identity", str(self.identity), "--known-hosts", str(self.known_hosts)]


def _keygen(path: Path, comment: str) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)], check=True, timeout=30)


@pytest.fixture(scope="session")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    """`sshd -D` on a free loopback port with a throwaway host key and client key; stopped at the end."""
    if not Path(SSHD).exists():
        pytest.fail(f"sshd is not installed ({SSHD}); ./scripts/test installs openssh-server")
    if not PRIVSEP_DIR.is_dir():
        if os.geteuid() != 0:
            pytest.fail(f"sshd needs {PRIVSEP_DIR}; create it as root (mkdir -m 0755 {PRIVSEP_DIR})")
        PRIVSEP_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
    work = tmp_path_factory.mktemp("sshd")
    _keygen(work / "host_ed25519", "gpugate-test-host")
    _keygen(work / "client_ed25519", "gpugate-test-client")
    authorized = work / "authorized_keys"
    authorized.write_text((work / "client_ed25519.pub").read_text())
    authorized.chmod(0o600)
    port = find_free_port()
    known_hosts = work / "known_hosts"
    host_key = (work / "host_ed25519.pub").read_text().split()
    known_hosts.write_text(f"[127.0.0.1]:{port} {host_key[0]} {host_key[1]}\n")
    config = work / "sshd_config"
    config.write_text(
        "\n".join(
            [
                f"Port {port}",
                "ListenAddress 127.0.0.1",
                f"HostKey {work / 'host_ed25519'}",
                f"AuthorizedKeysFile {authorized}",
                f"PidFile {work / 'sshd.pid'}",
                f"AllowUsers {getpass.getuser()}",
                "PubkeyAuthentication yes",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "PermitRootLogin prohibit-password",
                "UsePAM no",
                "StrictModes no",  # the temporary directory is not the user's home
                "",
            ]
        )
    )
    log = work / "sshd.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + SSHD_START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"sshd exited with {proc.returncode}:\n{log.read_text()}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"sshd did not listen on {port} within {SSHD_START_TIMEOUT_S} s:\n{log.read_text()}")
                time.sleep(0.1)
        yield Sshd(port=port, user=getpass.getuser(), identity=work / "client_ed25519", known_hosts=known_hosts, log=log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def gpugate_run(*args: str, env: dict[str, str] | None = None, timeout: float = RUN_TIMEOUT_S) -> subprocess.CompletedProcess:
    """`gpugate run ...` in a fresh process, as a user's shell runs it."""
    return subprocess.run(
        [sys.executable, "-m", "gpugate", "run", *args],
        cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env,
    )  # fmt: skip

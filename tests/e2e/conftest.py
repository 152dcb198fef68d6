"""Fixtures for end-to-end tests: the real vLLM CPU toolchain, the small real model, free ports, a running vLLM."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import gpugate_runtime
import httpx
import pytest
from gpugate_runtime.launchspec import LaunchSpec

from tests.conftest import smollm_dir, vllm_python  # noqa: F401 - fixtures, imported from here by tests/vm and tests/kubernetes

# /health comes after about 40 s on a quiet 2-core machine; the margin is for one shared with other test
# sessions' vLLMs and image builds. A vLLM that exits fails at once (wait_for_health), not after this.
VLLM_HEALTH_TIMEOUT_S = 240
VLLM_STOP_TIMEOUT_S = 30
VLLM_SERVED_NAME = "smollm2"


def find_free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def free_port() -> int:
    """A TCP port free on 127.0.0.1; ask for `find_free_port()` directly when a test needs several."""
    return find_free_port()


@dataclass(frozen=True)
class VllmServer:
    """A real vLLM started by the launcher: where it listens, its internal key, and its start-up log."""

    url: str
    api_key: str
    served_model_name: str
    spec: LaunchSpec
    spec_path: Path
    log_path: Path
    pid: int

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


def stop_process_group(proc: subprocess.Popen[bytes], timeout: float = VLLM_STOP_TIMEOUT_S) -> None:
    """SIGTERM the process group `proc` leads (vLLM and its engine/worker children), SIGKILL it if it lingers."""
    deadline = time.monotonic() + timeout
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        while time.monotonic() < deadline:  # the leader exits first; let its children finish shutting down
            proc.poll()
            os.killpg(proc.pid, 0)  # raises ProcessLookupError once the whole group is gone
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def wait_for_health(proc: subprocess.Popen[bytes], url: str, log_path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-40:])
            pytest.fail(f"vLLM exited with {proc.returncode} before /health answered:\n{tail}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-20:])
    pytest.fail(f"vLLM /health not 200 after {timeout:.0f} s; log: {log_path}, ending:\n{tail}")


@contextlib.contextmanager
def running_vllm(
    vllm_python: Path,
    model: Path,
    workdir: Path,
    *,
    served_model_name: str = VLLM_SERVED_NAME,
    key: str | None = None,
    port: int | None = None,
    health_timeout: float = VLLM_HEALTH_TIMEOUT_S,
) -> Iterator[VllmServer]:
    """A real vLLM (CPU, 1 GiB KV, max_model_len 2048) started by `launcher run` on a loopback port (`port`, or a
    free one), stopped (process group SIGTERM, then SIGKILL) on exit. Start-up takes about 40 s."""
    key = key or "sk-vllm-internal-" + os.urandom(8).hex()
    key_file = workdir / "vllm_api_key"
    key_file.write_text(key + "\n")
    key_file.chmod(0o600)
    spec = LaunchSpec(
        model=str(model),
        served_model_name=served_model_name,
        max_model_len=2048,
        device="cpu",
        enforce_eager=True,
        cpu_kv_cache_gib=1,
        max_num_seqs=8,
        port=port or find_free_port(),
        api_key_file=key_file,
    )
    spec_path = workdir / "launch.json"
    spec_path.write_text(spec.model_dump_json(indent=2))
    log_path = workdir / "vllm.log"
    runtime_root = str(Path(gpugate_runtime.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [runtime_root, os.environ.get("PYTHONPATH")]))}
    argv = [sys.executable, "-m", "gpugate_runtime", "launch", "run", "--spec", str(spec_path), "--python", str(vllm_python)]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://{spec.host}:{spec.port}"
    try:
        wait_for_health(proc, url, log_path, health_timeout)
        yield VllmServer(url, key, served_model_name, spec, spec_path, log_path, proc.pid)
    finally:
        stop_process_group(proc)


@pytest.fixture(scope="module")
def vllm_server(vllm_python: Path, smollm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmServer]:
    """A real vLLM serving SmolLM2 as `smollm2`; module-scoped, so only one vLLM runs at a time on a small machine."""
    with running_vllm(vllm_python, smollm_dir, tmp_path_factory.mktemp("vllm")) as server:
        yield server

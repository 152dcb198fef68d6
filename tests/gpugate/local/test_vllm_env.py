"""The local stack's vLLM CPU venv is the one cpu.lock describes, in the cache, reused while the lock is unchanged."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from gpugate_runtime.vllmenv import MARKER_NAME, sha256_of

from gpugate.lockfiles import TORCH_WHEELS_ENV, VLLM_CPU_LOCK, read_pins
from gpugate.local import vllm_env
from gpugate.local.vllm_env import CPU_LOCK, VENV_NAME, ensure_vllm_venv, torch_wheels


def fake_venv(cache: Path, marker: object | None) -> Path:
    venv = cache / VENV_NAME
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    if marker is not None:
        (venv / MARKER_NAME).write_text(json.dumps(marker))
    return venv


def test_venv_built_from_the_current_cpu_lock_is_returned_without_building(tmp_path: Path) -> None:
    venv = fake_venv(tmp_path, {"lock_sha256": sha256_of(CPU_LOCK), "smoke": "0.32.0 5.19.0"})

    assert ensure_vllm_venv(tmp_path) == venv / "bin" / "python"


def test_venv_built_from_another_lock_is_built_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_venv(tmp_path, {"lock_sha256": "0" * 64, "smoke": "0.31.0 5.18.0"})
    built: list[tuple[Path, Path]] = []
    monkeypatch.setattr(
        "gpugate_runtime.vllmenv.build_venv", lambda venv, lock, digest, find_links, smoke: built.append((venv, lock))
    )

    ensure_vllm_venv(tmp_path)

    assert built == [(tmp_path / VENV_NAME, CPU_LOCK)]


def test_the_venv_directory_names_the_vllm_cpu_release_the_lock_pins() -> None:
    assert VENV_NAME == f"vllm-cpu-{read_pins(CPU_LOCK)['vllm-cpu'].version}"
    assert CPU_LOCK.relative_to(CPU_LOCK.parents[2]).as_posix() == VLLM_CPU_LOCK.path


def test_torch_wheels_come_from_the_environment_or_the_lock(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TORCH_WHEELS_ENV, raising=False)
    assert torch_wheels() is None  # the page cpu.lock names
    monkeypatch.setenv(TORCH_WHEELS_ENV, "/opt/wheels  /srv/more")
    assert torch_wheels() == ["/opt/wheels", "/srv/more"]


def test_cache_dir_defaults_to_the_environment_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPUGATE_CACHE_DIR", str(tmp_path))

    assert vllm_env.default_cache_dir() == tmp_path

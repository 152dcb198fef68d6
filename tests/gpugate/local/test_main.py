"""`python -m gpugate.local ensure` prints the vLLM python and the model directory as shell assignments."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.e2e
def test_ensure_prints_both_paths_and_they_exist(smollm_dir: Path) -> None:
    # smollm_dir: prepared before the tests run (tests/conftest.py), so this ensure finds both and returns at once
    repo = Path(__file__).resolve().parents[3]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))}

    result = subprocess.run(
        [sys.executable, "-m", "gpugate.local", "ensure"],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    paths = dict(line.split("=", 1) for line in result.stdout.splitlines())
    python, model_dir = (
        Path(shlex.split(paths["GPUGATE_VLLM_PYTHON"])[0]),
        Path(shlex.split(paths["GPUGATE_MODEL_DIR"])[0]),
    )
    assert python.name == "python" and os.access(python, os.X_OK)
    assert (model_dir / "config.json").is_file()

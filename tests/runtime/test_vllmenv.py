"""vLLM's venv is built from its lock alone, reused while the lock is the same, and built again when it changes.

These build real venvs with real pip from small locks (six, idna: PyPI's files and hashes); the 3.5 GB
vLLM CPU venv itself is built by the e2e test of `launch prepare` (tests/runtime/test_launcher.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from gpugate_runtime import vllmenv
from gpugate_runtime.vllmenv import MARKER_NAME, PrepareError, ensure_venv, is_ready, run_step, sha256_of, wheel_sources

SIX = """six==1.17.0 \\
    --hash=sha256:4721f391ed90541fddacab5acf947aa0d3dc7d27b2e1e8eda2be8970586c3274 \\
    --hash=sha256:ff70335d468e7eb6ec65b95b99d3a2836546063f63acc5171de367e834932a81
"""
IDNA = """idna==3.10 \\
    --hash=sha256:12f65c9b470abda6dc35cf8e63cc574b1c52b11df2c86030af0ac09b01b13ea9 \\
    --hash=sha256:946d195a0d259cbba61165e88e65941f16e9b36ea6ddb97f00452bae8b1287d3
"""
SMOKE = "import six; print(six.__version__)"


def write_lock(path: Path, *entries: str, header: str = "# compiled by a test\n") -> Path:
    path.write_text(header + "".join(entries))
    return path


def imports(python: Path, module: str) -> bool:
    return subprocess.run([str(python), "-c", f"import {module}"], capture_output=True, check=False).returncode == 0


def test_a_venv_is_built_from_its_lock_reused_then_rebuilt_when_the_lock_changes(tmp_path: Path) -> None:
    venv, lock = tmp_path / "vllm", write_lock(tmp_path / "cpu.lock", SIX)

    python = ensure_venv(venv, lock, find_links=[], smoke=SMOKE)

    marker = json.loads((venv / MARKER_NAME).read_text())
    assert marker["lock_sha256"] == sha256_of(lock) and marker["smoke"] == "1.17.0"
    assert imports(python, "six") and not imports(python, "idna")
    built = (venv / MARKER_NAME).stat().st_mtime_ns

    assert ensure_venv(venv, lock, find_links=[], smoke=SMOKE) == python
    assert (venv / MARKER_NAME).stat().st_mtime_ns == built, "an unchanged lock rebuilt the venv"

    write_lock(lock, SIX, IDNA)
    ensure_venv(venv, lock, find_links=[], smoke=SMOKE)
    assert imports(python, "idna"), "the changed lock did not reach the venv"


def test_a_file_whose_hash_the_lock_does_not_hold_is_refused_and_no_venv_counts_as_ready(tmp_path: Path) -> None:
    venv = tmp_path / "vllm"
    lock = write_lock(tmp_path / "cpu.lock", SIX.replace("4721f391", "0000f391").replace("ff70335d", "0000335d"))

    with pytest.raises(PrepareError) as raised:
        ensure_venv(venv, lock, find_links=[], smoke=SMOKE)

    assert str(raised.value).startswith(f"pip install -r {lock} (exit 1) failed")
    assert "DO NOT MATCH THE HASHES" in str(raised.value)
    assert not is_ready(venv, sha256_of(lock))


def test_a_half_built_venv_is_removed_and_built_again(tmp_path: Path) -> None:
    venv, lock = tmp_path / "vllm", write_lock(tmp_path / "cpu.lock", SIX)
    (venv / "bin").mkdir(parents=True)
    (venv / "leftover-of-a-killed-build").write_text("")

    ensure_venv(venv, lock, find_links=[], smoke=SMOKE)

    assert not (venv / "leftover-of-a-killed-build").exists()
    assert is_ready(venv, sha256_of(lock))


def test_two_processes_asking_at_once_build_the_venv_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    venv, lock = tmp_path / "vllm", write_lock(tmp_path / "cpu.lock", SIX)
    builds: list[int] = []
    real_build = vllmenv.build_venv

    def counted(*args: object, **kwargs: object) -> None:
        builds.append(1)
        real_build(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(vllmenv, "build_venv", counted)
    results: list[Path] = []
    workers = [
        threading.Thread(target=lambda: results.append(ensure_venv(venv, lock, find_links=[], smoke=SMOKE))) for _ in range(2)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=300)

    assert len(results) == 2 and results[0] == results[1]
    assert builds == [1], f"built {len(builds)} times"


def test_wheel_sources_are_read_from_the_header_only(tmp_path: Path) -> None:
    lock = write_lock(
        tmp_path / "cpu.lock",
        SIX,
        "# wheels-from: https://example.invalid/not-in-the-header/\n",
        header="# compiled\n# wheels-from: https://download.pytorch.org/whl/cpu/torch/\n#   a note\n",
    )

    assert wheel_sources(lock) == ["https://download.pytorch.org/whl/cpu/torch/"]
    assert wheel_sources(write_lock(tmp_path / "cuda.lock", SIX)) == []


def test_the_lock_page_is_handed_to_pip_unless_find_links_are_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lock = write_lock(tmp_path / "cpu.lock", SIX, header="# wheels-from: https://download.pytorch.org/whl/cpu/torch/\n")
    seen: list[list[str]] = []

    def record(step: str, argv: list[object], env: object = None) -> str:
        seen.append([str(a) for a in argv])
        if seen[-1][1:3] == ["-m", "venv"]:
            (Path(seen[-1][3]) / "bin").mkdir(parents=True)
        return "ok"

    monkeypatch.setattr(vllmenv, "run_step", record)
    ensure_venv(tmp_path / "default", lock)
    ensure_venv(tmp_path / "given", lock, find_links=["/opt/wheels"])

    installs = [argv for argv in seen if "install" in argv]
    assert len(installs) == 2
    assert installs[0][installs[0].index("--find-links") + 1] == "https://download.pytorch.org/whl/cpu/torch/"
    assert installs[1][installs[1].index("--find-links") + 1] == "/opt/wheels"
    assert "https://download.pytorch.org/whl/cpu/torch/" not in installs[1]
    assert all({"--no-deps", "--require-hashes", "--only-binary=:all:"} <= set(argv) for argv in installs)


def test_failed_step_names_the_step_and_shows_the_last_output_lines() -> None:
    script = "import sys; print('\\n'.join(f'line {i}' for i in range(100))); sys.exit(3)"

    with pytest.raises(PrepareError) as raised:
        run_step("pip install -r cpu.lock", [sys.executable, "-c", script])

    message = str(raised.value)
    assert message.startswith("pip install -r cpu.lock (exit 3) failed")
    assert "line 99" in message
    assert "line 10\n" not in message

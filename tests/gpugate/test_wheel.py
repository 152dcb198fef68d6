"""The runtime wheel: same sources, same bytes; changed sources, new wheel; it installs next to its lock and runs."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from gpugate.render import wheel as runtime_wheel
from gpugate.lockfiles import REPO_ROOT, RUNTIME_LOCK
from gpugate.render.wheel import build_runtime_wheel


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _runtime_copy(dest: Path) -> Path:
    shutil.copytree(runtime_wheel.RUNTIME_SOURCE, dest, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build"))
    return dest


def test_two_builds_of_one_tree_are_byte_identical_whatever_the_modes_umask_times_and_leftovers(tmp_path: Path) -> None:
    first_tree = _runtime_copy(tmp_path / "a" / "runtime")
    second_tree = _runtime_copy(tmp_path / "b" / "runtime")
    # The second checkout differs in everything that is not source: modes, mtimes, stale build output.
    for path in second_tree.rglob("*.py"):
        path.chmod(0o664)
        os.utime(path, (1_900_000_000, 1_900_000_000))
    stale = second_tree / "build" / "lib" / "gpugate_runtime" / "removed_module.py"
    stale.parent.mkdir(parents=True)
    stale.write_text("raise SystemExit('a stale build file reached the wheel')\n")

    # Separate caches: both are real builds, not one build read back. The second under a group-writable
    # umask, as on a machine whose files come out 0664.
    first = build_runtime_wheel(tmp_path / "dist-a", first_tree, cache_dir=tmp_path / "cache-a")
    umask = os.umask(0o002)
    try:
        second = build_runtime_wheel(tmp_path / "dist-b", second_tree, cache_dir=tmp_path / "cache-b")
    finally:
        os.umask(umask)

    assert first.name == second.name == "gpugate_runtime-0.1.0-py3-none-any.whl"
    assert _sha256(first) == _sha256(second)
    names = zipfile.ZipFile(first).namelist()
    assert "gpugate_runtime/removed_module.py" not in names


def test_the_wheel_holds_every_module_of_the_runtime_and_its_console_script(tmp_path: Path) -> None:
    wheel = build_runtime_wheel(tmp_path / "dist", cache_dir=tmp_path / "cache")
    archive = zipfile.ZipFile(wheel)
    modules = sorted(p.relative_to(runtime_wheel.RUNTIME_SOURCE).as_posix() for p in (runtime_wheel.RUNTIME_SOURCE / "gpugate_runtime").rglob("*.py"))
    assert len(modules) >= 5
    assert sorted(n for n in archive.namelist() if n.startswith("gpugate_runtime/")) == modules
    entry_points = archive.read("gpugate_runtime-0.1.0.dist-info/entry_points.txt").decode()
    assert "gpugate-runtime = gpugate_runtime.cli:app" in entry_points
    assert {info.date_time for info in archive.infolist()} == {(1980, 1, 1, 0, 0, 0)}


def test_a_changed_source_file_builds_a_different_wheel_and_the_old_one_stays_cached(tmp_path: Path) -> None:
    tree = _runtime_copy(tmp_path / "runtime")
    cache = tmp_path / "cache"
    before = build_runtime_wheel(tmp_path / "before", tree, cache_dir=cache)
    again = build_runtime_wheel(tmp_path / "again", tree, cache_dir=cache)
    assert _sha256(again) == _sha256(before)
    assert len(list((cache / runtime_wheel.CACHE_SUBDIR).glob("*/*.whl"))) == 1, "an unchanged tree was built twice"

    cli = tree / "gpugate_runtime" / "cli" / "__init__.py"
    cli.write_text(cli.read_text() + "\n# a changed line\n")
    after = build_runtime_wheel(tmp_path / "after", tree, cache_dir=cache)

    assert _sha256(after) != _sha256(before)
    assert zipfile.ZipFile(after).read("gpugate_runtime/cli/__init__.py").decode().endswith("# a changed line\n")
    assert len(list((cache / runtime_wheel.CACHE_SUBDIR).glob("*/*.whl"))) == 2


def test_a_relock_or_a_stale_bytecode_file_is_not_a_new_runtime(tmp_path: Path) -> None:
    tree = _runtime_copy(tmp_path / "runtime")
    key = runtime_wheel.cache_key(tree)
    (tree / "requirements.lock").write_text("# re-locked\n")
    (tree / "gpugate_runtime" / "__pycache__").mkdir(exist_ok=True)
    (tree / "gpugate_runtime" / "__pycache__" / "cli.cpython-311.pyc").write_bytes(b"stale")
    assert runtime_wheel.cache_key(tree) == key
    (tree / "gpugate_runtime" / "new_module.py").write_text("")
    assert runtime_wheel.cache_key(tree) != key


def test_a_tree_without_pyproject_is_refused_by_name(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(runtime_wheel.RuntimeWheelError, match="empty has no pyproject.toml"):
        build_runtime_wheel(tmp_path / "dist", tmp_path / "empty", cache_dir=tmp_path / "cache")


@pytest.mark.e2e
def test_the_wheel_installs_with_no_deps_next_to_the_runtime_lock_and_its_cli_runs(tmp_path: Path) -> None:
    """What a VM host and a container image do: a fresh venv, the hash-checked lock, then exactly this wheel."""
    wheel = build_runtime_wheel(tmp_path / "dist", cache_dir=tmp_path / "cache")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"

    def pip(*args: str) -> None:
        done = subprocess.run([str(python), "-m", "pip", "install", "--quiet", *args], capture_output=True, text=True, timeout=600, check=False)
        assert done.returncode == 0, f"pip install {' '.join(args)} failed:\n{done.stderr[-3000:]}"

    pip("--require-hashes", "-r", str(REPO_ROOT / RUNTIME_LOCK.path))
    pip("--no-deps", str(wheel))

    # From outside the repository, so the installed wheel is imported, not the tree.
    result = subprocess.run(
        [str(python), "-m", "gpugate_runtime", "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert all(command in result.stdout for command in ("keys", "authz", "prober")), result.stdout
    where = subprocess.run(
        [str(python), "-c", "import gpugate_runtime; print(gpugate_runtime.__file__)"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60, check=True,
    ).stdout
    assert where.startswith(str(venv)), where
    check = subprocess.run([str(python), "-m", "pip", "check"], capture_output=True, text=True, timeout=120, check=False)
    assert check.returncode == 0, f"the lock does not satisfy the wheel's requirements:\n{check.stdout}"

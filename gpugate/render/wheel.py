"""Build the gpugate-runtime wheel from ./runtime reproducibly: the same sources give the same bytes.

The VM bundle and the container images install exactly this wheel (`pip install --no-deps`) next to
`pip install --require-hashes -r runtime/requirements.lock`. What could make two builds of one tree differ,
and what is done about it:
- zip entry times: setuptools' wheel writer takes SOURCE_DATE_EPOCH (fixed below) for every entry;
- entry order: it walks the tree sorted (dist-info last, sorted), so only the file set matters;
- file modes (umask, checkout): recorded in each entry; the build runs on a copy with modes normalized,
  under a fixed umask (setuptools writes the dist-info files afresh);
- stale files in an in-tree build/ or *.egg-info: the copy holds only the source files hashed below;
- the compressor: deflate output depends on the zlib build, so entries are stored uncompressed;
- the build backend: no build isolation (a fresh, unpinned setuptools each time); the running
  interpreter's setuptools, pinned by requirements.lock, builds, and its version is part of the cache key.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

from gpugate.cache import cache_lock, default_cache_dir

log = logging.getLogger(__name__)

RUNTIME_SOURCE = Path(__file__).resolve().parents[2] / "runtime"
# 1980-01-01T00:00:00Z, the earliest time a zip entry can carry: the wheel is named by its content, never
# by when it was built.
SOURCE_DATE_EPOCH = 315532800
CACHE_SUBDIR = "runtime-wheels"
# Bumped when the build recipe below changes, so older cached wheels are not reused.
RECIPE_VERSION = 1
FILE_MODE, DIR_MODE = 0o644, 0o755
# Build and tool output that can sit in a working tree and is no source.
_SKIPPED_DIRS = frozenset({"__pycache__", "build", "dist", ".pytest_cache", ".mypy_cache", ".ruff_cache"})
_SKIPPED_SUFFIXES = (".pyc", ".pyo", ".egg-info")
# Installed next to the wheel, never built into it: a re-lock must not look like a new runtime.
_SKIPPED_FILES = frozenset({"requirements.lock"})
# The umask: setuptools writes the dist-info files afresh, and the wheel records each file's mode.
_BUILD = """
import os, sys
os.umask(0o022)
from setuptools import build_meta
print(build_meta.build_wheel(sys.argv[1], {"--build-option": ["--compression=stored"]}))
"""


class RuntimeWheelError(RuntimeError):
    """The runtime wheel could not be built; the message names the source or the step and its output."""


def source_files(source_dir: Path) -> list[Path]:
    """The files a build reads, relative to `source_dir`, sorted: everything but caches and build output."""
    found: list[Path] = []
    for root, dirnames, filenames in os.walk(source_dir):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIPPED_DIRS and not d.endswith(_SKIPPED_SUFFIXES))
        for name in sorted(filenames):
            path = Path(root, name)
            if not name.endswith(_SKIPPED_SUFFIXES) and name not in _SKIPPED_FILES and path.is_file():
                found.append(path.relative_to(source_dir))
    return found


def _setuptools_version() -> str:
    try:
        return metadata.version("setuptools")
    except metadata.PackageNotFoundError:
        raise RuntimeWheelError(
            f"setuptools is not installed in {sys.prefix}; the operator venv installs it from requirements.lock"
            " (./scripts/test or ./scripts/up do)"
        ) from None


def cache_key(source_dir: Path = RUNTIME_SOURCE) -> str:
    """sha256 of the source files (paths and contents) and of what builds them: recipe, setuptools, Python."""
    files = source_files(source_dir)
    if not (source_dir / "pyproject.toml").is_file():
        raise RuntimeWheelError(f"{source_dir} has no pyproject.toml: not the gpugate-runtime source tree")
    digest = hashlib.sha256()
    digest.update(
        f"recipe={RECIPE_VERSION} setuptools={_setuptools_version()} python={sys.version_info[0]}.{sys.version_info[1]}"
        f" epoch={SOURCE_DATE_EPOCH}\n".encode()
    )
    for relative in files:
        digest.update(f"{relative.as_posix()}\0{hashlib.sha256((source_dir / relative).read_bytes()).hexdigest()}\n".encode())
    return digest.hexdigest()


def _stage(source_dir: Path, staged: Path) -> None:
    """Copy the source files alone, with no leftover build output; modes normalized too (today's setuptools
    copies modules without their mode, but a backend that kept it would carry a checkout's 0664 or 0755)."""
    for relative in source_files(source_dir):
        target = staged / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source_dir / relative, target)
        target.chmod(FILE_MODE)
    for directory in [staged, *(p for p in staged.rglob("*") if p.is_dir())]:
        directory.chmod(DIR_MODE)


def _build(source_dir: Path, out_dir: Path, scratch: Path) -> Path:
    staged = scratch / "src"
    _stage(source_dir, staged)
    env = {
        **os.environ,
        "SOURCE_DATE_EPOCH": str(SOURCE_DATE_EPOCH),
        "PYTHONHASHSEED": "0",
        "PYTHONDONTWRITEBYTECODE": "1",
        "LC_ALL": "C.UTF-8",
        "TZ": "UTC",
    }
    completed = subprocess.run(
        [sys.executable, "-c", _BUILD, str(out_dir)], cwd=staged, env=env, capture_output=True, text=True, check=False
    )
    if completed.returncode != 0:
        tail = "\n".join((completed.stdout + completed.stderr).strip().splitlines()[-25:])
        raise RuntimeWheelError(f"building the runtime wheel from {source_dir} failed (exit {completed.returncode}):\n{tail}")
    name = completed.stdout.strip().splitlines()[-1]
    wheel = out_dir / name
    if not wheel.is_file():
        raise RuntimeWheelError(f"setuptools reported {name!r} but wrote no such wheel in {out_dir}")
    return wheel


def build_runtime_wheel(dest_dir: Path, source_dir: Path = RUNTIME_SOURCE, cache_dir: Path | None = None) -> Path:
    """The gpugate-runtime wheel of `source_dir`, copied into `dest_dir`; built once per source hash.

    Cached under `<cache>/runtime-wheels/<key>/`, where the key hashes the sources and the build tools,
    so a changed file builds anew and an unchanged tree costs a copy.
    """
    cache = (cache_dir or default_cache_dir()) / CACHE_SUBDIR
    key = cache_key(source_dir)
    entry = cache / key
    with cache_lock(cache, "runtime-wheel"):
        wheels = sorted(entry.glob("*.whl")) if entry.is_dir() else []
        if not wheels:
            log.info("building the gpugate-runtime wheel from %s", source_dir)
            with tempfile.TemporaryDirectory(prefix=f".{key[:12]}-", dir=cache) as scratch:
                out = Path(scratch, "out")
                out.mkdir()
                _build(source_dir, out, Path(scratch))
                # Renamed whole into place: a crash leaves no half-written entry behind.
                out.rename(entry)
            wheels = sorted(entry.glob("*.whl"))
        if len(wheels) != 1:
            raise RuntimeWheelError(f"{entry} holds {len(wheels)} wheels, expected one: remove the folder and build again")
        dest_dir.mkdir(parents=True, exist_ok=True)
        target = dest_dir / wheels[0].name
        shutil.copyfile(wheels[0], target)
    log.info("runtime wheel %s (source key %s)", target.name, key[:12])
    return target

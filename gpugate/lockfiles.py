"""The hash-locked requirement files: what each is compiled from, its fingerprint, and how uv compiles it.

Standard library only (and gpugate_runtime.vllmenv, itself standard library only): `scripts/lock` runs it
with the system python3, before (or without) .venv.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from gpugate_runtime.vllmenv import WHEELS_FROM_PREFIX

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
REFRESH_COMMAND = "scripts/lock"
# Every host that installs a lock: the VM hosts, the container images and CI are Debian 12 (glibc 2.36)
# with its python3 3.11. The hashes cover every file of each pinned release, so a lock also installs on
# other platforms where the same releases resolve.
TARGET_PYTHON = "3.11"
TARGET_PLATFORM = "x86_64-manylinux_2_36"
# The same target as PEP 508 marker values, for checking a lock against its requirements.
TARGET_MARKERS: dict[str, str] = {
    "python_version": TARGET_PYTHON,
    "python_full_version": f"{TARGET_PYTHON}.0",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "os_name": "posix",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
}
# The locking tool, itself hash-locked (all platforms): `scripts/lock --uv VERSION` moves it.
UV_LOCK = "tools/uv/requirements.lock"
FINGERPRINT_PREFIX = "# inputs-sha256: "
# Bumped when the fingerprint's document changes shape, so old locks read as stale rather than equal.
FINGERPRINT_FORMAT = 1
# What uv is run with, besides the inputs; part of the fingerprint.
COMPILE_OPTIONS: tuple[str, ...] = (
    "--no-config",  # a developer's uv.toml must not change the lock
    "--generate-hashes",
    f"--python-version={TARGET_PYTHON}",
    f"--python-platform={TARGET_PLATFORM}",
    "--resolution=highest",
    "--prerelease=if-necessary-or-explicit",
    "--index-strategy=first-index",
    f"--custom-compile-command={REFRESH_COMMAND}",
)
# uv settings a developer's environment may carry that are about reaching the index (a PyPI mirror,
# certificates, the cache), not about what resolves; every other UV_* variable is dropped.
UV_ENV_KEPT = frozenset(
    {"UV_DEFAULT_INDEX", "UV_INDEX_URL", "UV_CACHE_DIR", "UV_SYSTEM_CERTS", "UV_NATIVE_TLS", "UV_HTTP_TIMEOUT", "UV_OFFLINE"}
)
# PyTorch's CPU builds of torch (`2.13.0+cpu`), which vLLM's CPU build pins and PyPI does not serve: the page
# of PyTorch's index that lists torch's files, read as find-links (so it serves torch alone, not a copy of
# numpy). Written in the CPU lock's header; the installer hands it to pip.
PYTORCH_CPU_WHEELS = "https://download.pytorch.org/whl/cpu/torch/"
# Folders or pages (whitespace-separated) that hold PyTorch's wheels on this machine, used instead of the
# page above when compiling a lock and when building the local vLLM venv (e.g. /opt/wheels where
# download.pytorch.org cannot be reached). Only the files' hashes reach the lock, never these names.
TORCH_WHEELS_ENV = "GPUGATE_TORCH_WHEELS"
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)")
_HASH = re.compile(r"--hash=sha256:([0-9a-f]{64})")


@dataclass(frozen=True)
class Project:
    """A pyproject in this repository; installed from the tree (`--no-deps -e`), so never pinned itself."""

    pyproject: str  # relative to the repository root
    name: str
    extras: tuple[str, ...]

    @property
    def directory(self) -> str:
        return str(Path(self.pyproject).parent)


OPERATOR = Project("pyproject.toml", "gpugate", ("test",))
# The `gpu` extra (nvidia-ml-py: pure Python, no dependencies) is in the runtime's one lock: the VM
# hosts need it, and where NVML is missing the prober reports the GPU check as not applicable.
RUNTIME = Project("runtime/pyproject.toml", "gpugate-runtime", ("gpu",))


@dataclass(frozen=True)
class LockFile:
    path: str  # relative to the repository root
    projects: tuple[Project, ...] = ()
    # The installer and the projects' build backends: the operator's venv builds the editable installs
    # and the runtime wheel without build isolation, so nothing it runs comes unpinned.
    with_tools: bool = False
    # A lock compiled earlier whose pins this one must reuse: the tests run what the hosts run.
    constraint: str | None = None
    # Instead of projects: a requirements file of exact pins (vLLM's venvs, which no pyproject describes).
    requirements: str | None = None
    # Packages left out of the resolution together with what only they need; the lock is installed
    # with `--no-deps`, so their absence is never noticed by pip.
    excludes: tuple[str, ...] = ()
    # Where the wheels PyPI does not serve come from (a find-links page), named in the lock's header.
    wheels_from: str | None = None

    @property
    def inputs(self) -> tuple[str, ...]:
        """The files of this repository it is compiled from (besides the uv lock)."""
        return (*(p.pyproject for p in self.projects), *([self.requirements] if self.requirements else []))


OPERATOR_LOCK = LockFile("requirements.lock", (RUNTIME, OPERATOR), with_tools=True, constraint=None)
RUNTIME_LOCK = LockFile("runtime/requirements.lock", (RUNTIME,), with_tools=False, constraint=OPERATOR_LOCK.path)
# vLLM's CPU build (local stack, CPU VM stacks). torchvision, torchaudio and torchcodec are left out: the
# registry's torchvision breaks `import transformers` next to the CPU torch ("operator torchvision::nms does
# not exist"), and vLLM's text models need none of them.
VLLM_CPU_LOCK = LockFile(
    "runtime/vllm/cpu.lock",
    requirements="runtime/vllm/cpu.in",
    excludes=("torchaudio", "torchcodec", "torchvision"),
    wheels_from=PYTORCH_CPU_WHEELS,
)
# vLLM's CUDA build from PyPI, with PyPI's CUDA torch (GPU VM stacks).
VLLM_CUDA_LOCK = LockFile("runtime/vllm/cuda.lock", requirements="runtime/vllm/cuda.in")
LOCK_FILES: tuple[LockFile, ...] = (OPERATOR_LOCK, RUNTIME_LOCK, VLLM_CPU_LOCK, VLLM_CUDA_LOCK)  # in compile order
PROJECTS: tuple[Project, ...] = (OPERATOR, RUNTIME)


class LockError(RuntimeError):
    """A lock file could not be read or compiled; the message says which file and why."""


@dataclass(frozen=True)
class Pin:
    name: str  # as written in the lock (uv writes normalized names)
    version: str
    hashes: frozenset[str]
    via: tuple[str, ...]  # uv's annotation: the packages (or `-c FILE`) that asked for it


def _normalized(requirement: str) -> str:
    return " ".join(requirement.split())


def read_pyproject(repo: Path, project: Project) -> dict:
    path = repo / project.pyproject
    try:
        return tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise LockError(f"{path}: {exc}") from exc


def build_requirements(repo: Path) -> list[str]:
    """`[build-system] requires` of every project, deduplicated."""
    found: set[str] = set()
    for project in PROJECTS:
        found.update(_normalized(r) for r in read_pyproject(repo, project).get("build-system", {}).get("requires", []))
    return sorted(found)


def tool_requirements(repo: Path) -> list[str]:
    return ["pip", *build_requirements(repo)]


def read_requirements_file(repo: Path, relative: str) -> list[str]:
    """The requirement lines of a requirements input file, comments and blank lines left out."""
    path = repo / relative
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise LockError(f"{path}: {exc}") from exc
    requirements = []
    for number, line in enumerate(lines, 1):
        text = line.split(" #", 1)[0].strip() if not line.lstrip().startswith("#") else ""
        if text.startswith("-"):
            raise LockError(f"{path}:{number}: options ({text.split()[0]}) are not read here; write requirements only")
        if text:
            requirements.append(_normalized(text))
    return requirements


def direct_requirements(repo: Path, lock: LockFile) -> dict[str, list[str]]:
    """What each input asks for, by where it is written: `pyproject.toml`, `pyproject.toml[test]`, `(tools)`,
    `runtime/vllm/cpu.in`."""
    asked: dict[str, list[str]] = {}
    if lock.requirements:
        asked[lock.requirements] = read_requirements_file(repo, lock.requirements)
    for project in lock.projects:
        document = read_pyproject(repo, project).get("project", {})
        asked[project.pyproject] = [_normalized(r) for r in document.get("dependencies", [])]
        optional = document.get("optional-dependencies", {})
        for extra in project.extras:
            if extra not in optional:
                raise LockError(f"{project.pyproject}: [project.optional-dependencies] has no extra {extra!r}")
            asked[f"{project.pyproject}[{extra}]"] = [_normalized(r) for r in optional[extra]]
    if lock.with_tools:
        asked["(tools)"] = tool_requirements(repo)
    return asked


def uv_requirement(repo: Path) -> str:
    """`uv==X.Y.Z` as pinned in tools/uv/requirements.lock."""
    pins = read_pins(repo / UV_LOCK)
    if "uv" not in pins:
        raise LockError(f"{repo / UV_LOCK}: pins no uv")
    return f"uv=={pins['uv'].version}"


def fingerprint(lock: LockFile, repo: Path = REPO_ROOT) -> str:
    """sha256 of everything `lock` is compiled from: its projects' dependency lists and extras (or its
    requirements file, exclusions and wheel page), the tools (with every project's build requirements), the
    constraint's name, uv's version and options. Comments and formatting do not count, nor does anything
    the lock does not read (the runtime lock ignores the operator's test extra: a new test dependency
    leaves what the hosts install untouched)."""
    projects = []
    for project in lock.projects:
        metadata = read_pyproject(repo, project).get("project", {})
        optional = metadata.get("optional-dependencies", {})
        projects.append(
            {
                "pyproject": project.pyproject,
                "name": metadata.get("name"),
                "requires-python": metadata.get("requires-python"),
                "dependencies": sorted(_normalized(r) for r in metadata.get("dependencies", [])),
                "extras": {e: sorted(_normalized(r) for r in optional.get(e, [])) for e in project.extras},
            }
        )
    document = {
        "format": FINGERPRINT_FORMAT,
        "tool": uv_requirement(repo),
        "options": list(COMPILE_OPTIONS),
        "no-emit": sorted(p.name for p in PROJECTS),
        "path": lock.path,
        "projects": projects,
        "tools": tool_requirements(repo) if lock.with_tools else [],
        "constraint": lock.constraint,
    }
    if lock.requirements:  # only these locks carry the keys, so the others' fingerprints stay as they were
        document["requirements"] = {lock.requirements: sorted(read_requirements_file(repo, lock.requirements))}
        document["excludes"] = sorted(lock.excludes)
        document["wheels-from"] = lock.wheels_from
    return hashlib.sha256(json.dumps(document, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def recorded_fingerprint(path: Path) -> str | None:
    """The `# inputs-sha256:` line a lock was written with, or None."""
    for line in path.read_text().splitlines():
        if line.startswith(FINGERPRINT_PREFIX):
            return line[len(FINGERPRINT_PREFIX) :].split()[0]
    return None


def read_pins(path: Path) -> dict[str, Pin]:
    """Every `name==version` of a requirements file uv wrote, with its hashes and `# via` annotation."""
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise LockError(f"{path}: {exc}") from exc
    pins: dict[str, Pin] = {}
    current: dict | None = None

    def close() -> None:
        if current is not None:
            pins[current["name"]] = Pin(
                current["name"], current["version"], frozenset(current["hashes"]), tuple(current["via"])
            )

    in_via = False
    for line in lines:
        match = _PIN.match(line)
        if match:
            close()
            current = {"name": match[1], "version": match[2], "hashes": [], "via": []}
            in_via = False
        elif current is None:
            continue
        elif found := _HASH.search(line):
            current["hashes"].append(found[1])
        elif line.startswith("    # via "):
            current["via"].append(line.removeprefix("    # via ").strip())
        elif line.strip() == "# via":
            in_via = True
        elif in_via and line.startswith("    #   "):
            current["via"].append(line.removeprefix("    #   ").strip())
        else:
            in_via = False
    close()
    return pins


def uv_environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("UV_") or k in UV_ENV_KEPT}
    env["UV_PYTHON_DOWNLOADS"] = "never"  # resolve with this machine's python3; never fetch an interpreter
    env["NO_COLOR"] = "1"
    return env


def compile_inputs(repo: Path, lock: LockFile) -> str:
    """The requirements fed to uv on stdin: the projects by absolute path (uv reads their metadata from the
    tree and `--no-emit-package` keeps them out of the output, so no path reaches the lock), then the tools."""
    lines = [f"{repo / p.directory}[{','.join(p.extras)}]" for p in lock.projects]
    if lock.with_tools:
        lines += tool_requirements(repo)
    return "\n".join(lines) + "\n"


def wheel_sources(lock: LockFile) -> list[str]:
    """Where uv looks for the wheels PyPI does not serve: $GPUGATE_TORCH_WHEELS if set, else the lock's page."""
    if lock.wheels_from is None:
        return []
    return os.environ.get(TORCH_WHEELS_ENV, "").split() or [lock.wheels_from]


def header_notes(lock: LockFile) -> list[str]:
    """Comment lines after the fingerprint: what an installer must know besides PyPI."""
    if lock.wheels_from is None:
        return []
    return [
        f"{WHEELS_FROM_PREFIX}{lock.wheels_from}",
        "#   torch's CPU build is not on PyPI: pip takes it from this page (or from a folder holding the same file)",
        "#   given as find-links; the hashes below admit only the locked files (gpugate_runtime.vllmenv does this).",
    ]


def _with_header(text: str, digest: str, notes: Sequence[str] = ()) -> str:
    """Put the fingerprint line (and the notes) right after uv's header (its first comment block)."""
    fingerprint_line = f"{FINGERPRINT_PREFIX}{digest}  (checked by tests/test_locks.py; refresh: {REFRESH_COMMAND})"
    lines = [line for line in text.splitlines() if not line.startswith(FINGERPRINT_PREFIX)]
    at = next((i for i, line in enumerate(lines) if not line.startswith("#")), len(lines))
    header = [line for line in lines[:at] if line not in notes]
    return "\n".join([*header, fingerprint_line, *notes, *lines[at:]]) + "\n"


def compile_locks(
    uv: Path,
    workdir: Path,
    repo: Path = REPO_ROOT,
    upgrade_all: bool = False,
    upgrade_packages: Sequence[str] = (),
    only: Sequence[str] = (),
) -> dict[str, str]:
    """Compile every lock (or those whose paths are in `only`) into `workdir`, laid out like the repository,
    returning path -> new text.

    Each output starts as a copy of the current lock, which uv reads as preferences: a pin that still
    fits stays, so a refresh is the smallest change. uv runs in `workdir` so the constraint reads
    `-c requirements.lock` in the annotations, and a requirements file `-r runtime/vllm/cpu.in`, as they
    are named in the repository.
    """
    unknown = sorted(set(only) - {lock.path for lock in LOCK_FILES})
    if unknown:
        raise LockError(f"no such lock: {', '.join(unknown)} (the locks: {', '.join(lock.path for lock in LOCK_FILES)})")
    for lock in LOCK_FILES:
        for relative in (lock.path, *([lock.requirements] if lock.requirements else [])):
            (workdir / relative).parent.mkdir(parents=True, exist_ok=True)
            if (repo / relative).is_file() and not (workdir / relative).exists():
                shutil.copyfile(repo / relative, workdir / relative)
    results: dict[str, str] = {}
    for lock in LOCK_FILES:
        if only and lock.path not in only:
            continue
        source = lock.requirements or "-"
        argv = [str(uv), "pip", "compile", source, "--output-file", lock.path, "--python", sys.executable, "--quiet"]
        argv += list(COMPILE_OPTIONS)
        argv += [f"--no-emit-package={p.name}" for p in PROJECTS]
        if lock.constraint:
            argv += ["--constraints", lock.constraint]
        if lock.excludes:
            excludes = workdir / f"{lock.path}.excludes"
            excludes.write_text("\n".join(lock.excludes) + "\n")
            argv += ["--excludes", str(excludes)]
        argv += [f"--find-links={where}" for where in wheel_sources(lock)]
        if upgrade_all:
            argv.append("--upgrade")
        argv += [f"--upgrade-package={name}" for name in upgrade_packages]
        log.info("compiling %s", lock.path)
        completed = subprocess.run(
            argv, input=compile_inputs(repo, lock), cwd=workdir, env=uv_environment(),
            capture_output=True, text=True, check=False,
        )
        if completed.returncode != 0:
            hint = (
                f"\n(torch's CPU build comes from {', '.join(wheel_sources(lock))}; where that cannot be reached, "
                f"set {TORCH_WHEELS_ENV} to a folder holding PyTorch's wheels)"
                if lock.wheels_from else ""
            )
            raise LockError(
                f"uv pip compile for {lock.path} failed (exit {completed.returncode}):\n{completed.stderr.strip()}{hint}"
            )
        out = workdir / lock.path
        text = _with_header(out.read_text(), fingerprint(lock, repo), header_notes(lock))
        out.write_text(text)
        results[lock.path] = text
    return results


def compile_uv_lock(uv: Path, version: str, repo: Path = REPO_ROOT) -> None:
    """Pin the locking tool itself: `uv==version` with the hashes of its files for every platform."""
    target = repo / UV_LOCK
    target.parent.mkdir(parents=True, exist_ok=True)
    argv = [
        str(uv), "pip", "compile", "-", "--output-file", str(target), "--quiet", "--no-config", "--universal",
        "--generate-hashes", f"--custom-compile-command={REFRESH_COMMAND} --uv {version}",
    ]
    completed = subprocess.run(
        argv, input=f"uv=={version}\n", env=uv_environment(), capture_output=True, text=True, check=False
    )
    if completed.returncode != 0:
        raise LockError(f"uv pip compile for {UV_LOCK} failed (exit {completed.returncode}):\n{completed.stderr.strip()}")


def ensure_uv(cache_dir: Path, repo: Path = REPO_ROOT) -> Path:
    """uv at the version tools/uv/requirements.lock pins, in a tool venv under the cache; installed if missing."""
    version = uv_requirement(repo).split("==", 1)[1]
    venv = cache_dir / "tools" / f"uv-{version}"
    uv = venv / "bin" / "uv"
    if uv.is_file():
        reported = subprocess.run([str(uv), "--version"], capture_output=True, text=True, check=False).stdout.split()
        if reported[1:2] == [version]:
            return uv
    log.info("installing uv %s into %s", version, venv)
    for step in (
        [sys.executable, "-m", "venv", "--clear", str(venv)],
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--require-hashes", "-r", str(repo / UV_LOCK)],
    ):
        completed = subprocess.run(step, capture_output=True, text=True, check=False)
        if completed.returncode != 0:
            raise LockError(f"installing uv {version}: {' '.join(step)} failed:\n{completed.stderr.strip()[-2000:]}")
    return uv

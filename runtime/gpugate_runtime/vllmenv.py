"""Build (once) the virtualenv vLLM runs in, from a hash-locked requirements file (runtime/vllm/*.lock).

Standard library only: `scripts/lock` reads `WHEELS_FROM_PREFIX` from here with the system python3, and a
host builds the venv before anything else of vLLM's exists.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

# Written last, once the venv imports vLLM: a venv without it (or built from another lock) is built again.
MARKER_NAME = ".gpugate-ready.json"
# A lock's header line naming a page (or folder) of wheels PyPI does not serve, e.g. PyTorch's CPU build of
# torch; `scripts/lock` writes it, the installer hands it to pip as find-links.
WHEELS_FROM_PREFIX = "# wheels-from: "
SMOKE_IMPORT = "import vllm, transformers; print(vllm.__version__, transformers.__version__)"
OUTPUT_TAIL_LINES = 25


class PrepareError(RuntimeError):
    """A step of preparing vLLM's host (venv, model) failed; the message says which and shows its output's tail."""

    def __init__(self, step: str, output: str = "") -> None:
        tail = "\n".join(output.strip().splitlines()[-OUTPUT_TAIL_LINES:])
        super().__init__(f"{step} failed" + (f"; last lines of its output:\n{tail}" if tail else ""))
        self.step = step
        self.output = output


def run_step(step: str, argv: Sequence[str | Path], env: dict[str, str] | None = None) -> str:
    """Run one step, returning its combined output or raising `PrepareError` with the tail of it."""
    log.debug("running %s", " ".join(map(str, argv)))
    try:
        completed = subprocess.run(
            [str(a) for a in argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, check=False
        )
    except OSError as exc:
        raise PrepareError(step, str(exc)) from exc
    if completed.returncode != 0:
        raise PrepareError(f"{step} (exit {completed.returncode})", completed.stdout)
    return completed.stdout


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@contextmanager
def exclusive(target: Path) -> Iterator[None]:
    """Hold `<target>.lock` (a sibling file) exclusively, so two processes never build `target` at once."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_name(f"{target.name}.lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def wheel_sources(lock: Path) -> list[str]:
    """The pages or folders the lock's header names for the wheels PyPI does not serve (may be none)."""
    sources = []
    for line in lock.read_text().splitlines():
        if not line.startswith("#"):
            break  # the header is the leading comment block
        if line.startswith(WHEELS_FROM_PREFIX):
            sources += line[len(WHEELS_FROM_PREFIX) :].split()[:1]
    return sources


def read_marker(venv: Path) -> dict[str, object] | None:
    try:
        recorded = json.loads((venv / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None
    return recorded if isinstance(recorded, dict) else None


def is_ready(venv: Path, lock_sha256: str) -> bool:
    """The venv was built from a lock with this sha256 and passed its smoke import."""
    marker = read_marker(venv)
    return marker is not None and marker.get("lock_sha256") == lock_sha256 and venv_python(venv).exists()


def ensure_venv(venv: Path, lock: Path, find_links: Sequence[str] | None = None, smoke: str = SMOKE_IMPORT) -> Path:
    """Return the python of a venv at `venv` installed from `lock`, building it first if needed.

    Idempotent: a venv whose marker records the lock's sha256 is reused at once; a missing, half-built
    or outdated one (the lock changed) is removed and built again, under `<venv>.lock`. `find_links`:
    where pip finds the wheels PyPI does not serve; default the lock's `# wheels-from:` lines. `smoke`:
    the Python run in the new venv before it counts as ready. Raises PrepareError (a lock that cannot be read, or a failed step).
    """
    try:
        digest = sha256_of(lock)
    except OSError as exc:
        raise PrepareError(f"reading the lock {lock}", exc.strerror or str(exc)) from None
    if is_ready(venv, digest):
        return venv_python(venv)
    with exclusive(venv):
        if is_ready(venv, digest):  # another process finished it while we waited
            return venv_python(venv)
        if venv.exists():
            log.info("removing the incomplete or outdated vLLM venv at %s", venv)
            shutil.rmtree(venv)
        build_venv(venv, lock, digest, wheel_sources(lock) if find_links is None else find_links, smoke)
    return venv_python(venv)


def build_venv(venv: Path, lock: Path, digest: str, find_links: Sequence[str], smoke: str = SMOKE_IMPORT) -> None:
    started = time.monotonic()
    python = venv_python(venv)
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    log.info("creating the vLLM venv at %s", venv)
    run_step("creating the venv", [sys.executable, "-m", "venv", venv])
    # Exactly the lock: no resolver (--no-deps), no file but the locked ones (--require-hashes), nothing
    # built on the host (--only-binary). What the lock leaves out stays out, though packages ask for it.
    install = [python, "-m", "pip", "install", "--no-input", "--no-deps", "--require-hashes", "--only-binary=:all:"]
    install += [arg for source in find_links for arg in ("--find-links", source)]
    log.info("installing %s into it (CPU build: about 3.5 GB, minutes the first time)", lock.name)
    run_step(f"pip install -r {lock}", [*install, "-r", lock], env=env)
    versions = run_step("the smoke import", [python, "-c", smoke], env=env)
    marker = {
        "lock": str(lock.resolve()),
        "lock_sha256": digest,
        "smoke": versions.strip().splitlines()[-1] if versions.strip() else "",
        "seconds": round(time.monotonic() - started),
    }
    partial = venv / f"{MARKER_NAME}.part"
    partial.write_text(json.dumps(marker, indent=2) + "\n")
    partial.replace(venv / MARKER_NAME)
    log.info("vLLM venv ready in %.0f s: %s", time.monotonic() - started, python)

"""Debian packages a group of tests needs on this machine, installed on first use (idempotent, as root)."""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
from collections.abc import Mapping
from pathlib import Path

log = logging.getLogger(__name__)

APT_LOCK_TIMEOUT_S = 600  # other sessions on this machine may be installing packages too


class AptError(RuntimeError):
    """apt-get failed; the message holds its command and the end of its stderr."""


def ensure_packages(packages: Mapping[str, str]) -> None:
    """Install `packages` (Debian package -> a file that proves it is installed) when any is missing.

    Without recommends, as the product's own hosts install theirs. A second call costs nothing."""
    missing = [package for package, marker in packages.items() if not Path(marker).exists()]
    if not missing:
        return
    log.info("installing Debian packages %s (missing: %s)", " ".join(packages), ", ".join(missing))
    lock = f"DPkg::Lock::Timeout={APT_LOCK_TIMEOUT_S}"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    _apt(["apt-get", "-o", lock, "update", "-qq"], env, APT_LOCK_TIMEOUT_S + 300)
    _apt(["apt-get", "-o", lock, "install", "-y", "-qq", "--no-install-recommends", *packages], env, APT_LOCK_TIMEOUT_S + 600)


def _apt(argv: list[str], env: dict[str, str], timeout: float) -> None:
    proc = subprocess.run(argv, env=env, capture_output=True, timeout=timeout)
    if proc.returncode != 0:
        tail = proc.stderr.decode(errors="replace").strip()[-4000:]
        raise AptError(f"`{shlex.join(argv)}` exited {proc.returncode}:\n{tail}")

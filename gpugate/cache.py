"""gpugate's cache on this machine (~/.cache/gpugate): what is slow to build is built once, under a lock."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

CACHE_ENV = "GPUGATE_CACHE_DIR"


def default_cache_dir() -> Path:
    """`$GPUGATE_CACHE_DIR`, else `~/.cache/gpugate`."""
    configured = os.environ.get(CACHE_ENV)
    return Path(configured) if configured else Path.home() / ".cache" / "gpugate"


@contextmanager
def cache_lock(cache_dir: Path, name: str) -> Iterator[None]:
    """Hold an exclusive lock so two processes (e.g. parallel test sessions) never build the same thing at once."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / f"{name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)

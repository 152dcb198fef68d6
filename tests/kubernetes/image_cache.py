"""Images kept as archives in gpugate's cache (`~/.cache/gpugate/podman`): a fresh podman store (a new CI
runner whose ~/.cache/gpugate was restored, a wiped /var/lib/containers) loads the base image and the
built images instead of running debootstrap, apt and pip again.

An archive is named after the image's tag and the key of its inputs (the base recipe's digest, or a
build's context digest, tests/kubernetes/podman.py); writing a new one removes the older archives of the
same tag, so the cache holds one archive per image. `podman save` keeps the image's id and labels, so
an image loaded from the cache is the image the key names, and the builds on top of it see the same
base id.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from gpugate.cache import cache_lock, default_cache_dir

if TYPE_CHECKING:
    from tests.kubernetes.podman import Podman

log = logging.getLogger(__name__)

CACHE_SUBDIR = "podman"
ARCHIVE_FORMAT = "docker-archive"  # keeps the tag; podman 4.3.1 loads it back with the same id


def _slug(tag: str) -> str:
    return tag.replace("/", "_").replace(":", "_")


@dataclass(frozen=True)
class ImageCache:
    directory: Path

    @classmethod
    def default(cls) -> ImageCache:
        """`$GPUGATE_CACHE_DIR/podman`, else `~/.cache/gpugate/podman`."""
        return cls(default_cache_dir() / CACHE_SUBDIR)

    def archive(self, tag: str, key: str) -> Path:
        return self.directory / f"{_slug(tag)}--{key}.tar"

    def load(self, podman: Podman, tag: str, key: str) -> float | None:
        """Load the archive of `tag` made from inputs `key` into podman's store; its seconds, or None if there is none."""
        path = self.archive(tag, key)
        if not path.is_file():
            return None
        started = time.monotonic()
        with cache_lock(self.directory, _slug(tag)):
            proc = podman.run("load", "--quiet", "--input", str(path), check=False)
        if proc.returncode != 0:  # a truncated or foreign file: build instead, and overwrite it then
            log.warning("could not load %s (%s): building instead", path, proc.stderr.decode(errors="replace")[-500:])
            return None
        return time.monotonic() - started

    def save(self, podman: Podman, tag: str, key: str) -> None:
        """Write `tag`'s archive for inputs `key`, replacing the archives of its earlier inputs."""
        path = self.archive(tag, key)
        with cache_lock(self.directory, _slug(tag)):
            partial = path.with_suffix(".partial")
            partial.unlink(missing_ok=True)
            podman.run("save", "--quiet", "--format", ARCHIVE_FORMAT, "--output", str(partial), tag)
            os.replace(partial, path)
            for old in self.directory.glob(f"{_slug(tag)}--*.tar"):
                if old != path:
                    old.unlink(missing_ok=True)

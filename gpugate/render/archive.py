"""The bundle archive a VM host fetches at boot: a deterministic tar.gz of the bundle's files.

The same files give the same bytes, so the archive's sha256 (which the host checks before it installs
anything) changes only when a file does: paths sorted, every member a regular file with mtime 0,
uid/gid 0, no user or group names, mode 0644, and a gzip header with mtime 0 and no file name.
Byte-identity holds for one Python and zlib; another zlib may compress differently (the files are
the same, the sha256 is not). Paths follow the host's rule (gpugate_runtime.hostboot.check_bundle_path),
so nothing written here is refused there.
"""

from __future__ import annotations

import gzip
import io
import itertools
import tarfile
from collections.abc import Mapping

from gpugate_runtime.hostboot import check_bundle_path

FILE_MODE = 0o644
GZIP_LEVEL = 9


def archive(files: Mapping[str, bytes]) -> bytes:
    """tar.gz of `files` (relative path -> content); ValueError names a path the host would refuse."""
    checked: dict[str, bytes] = {}
    for name, data in files.items():
        path = check_bundle_path(name)
        if path != name:
            raise ValueError(f"bundle path {name!r}: a file's path must not end with '/'")
        if not isinstance(data, bytes):
            raise ValueError(f"bundle path {name!r}: content must be bytes, got {type(data).__name__}")
        checked[path] = data
    paths = sorted(checked)
    for shorter, longer in itertools.pairwise(paths):
        if longer.startswith(shorter + "/"):
            raise ValueError(f"bundle path {shorter!r} is a file and also the directory of {longer!r}")
    raw = io.BytesIO()
    # PAX: long and non-ASCII names without USTAR's limits; with integer fields it adds no time headers.
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT, encoding="utf-8") as tar:
        for path in paths:
            data = checked[path]
            info = tarfile.TarInfo(path)
            info.size = len(data)
            info.mtime = 0
            info.mode = FILE_MODE
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.type = tarfile.REGTYPE
            tar.addfile(info, io.BytesIO(data))
    # gzip.compress with mtime=0 writes no file name either; tarfile's own "w:gz" would stamp the time.
    return gzip.compress(raw.getvalue(), compresslevel=GZIP_LEVEL, mtime=0)

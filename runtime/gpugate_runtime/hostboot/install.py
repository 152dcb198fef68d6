"""Installing what was fetched: the bundle swapped in with one rename, each secret written atomically; run() and main()."""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import functools
import hashlib
import logging
import os
import shutil
import stat
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

from .clouds import Aws, Gcp, with_retries
from .config import (
    BUNDLES_DIRNAME,
    CHUNK,
    CURRENT_LINK,
    DEFAULT_RETRY_SECONDS,
    EXIT_CONFIG,
    EXIT_FETCH,
    EXIT_OK,
    LOCK_FILE,
    LOCK_WAIT_SECONDS,
    PREVIOUS_LINK,
    RESERVED_TOP_LEVEL,
    BootConfig,
    ConfigError,
    FetchError,
    NotFound,
    Sink,
    check_bundle_path,
    load_config,
    log,
)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def extract_bundle(archive: Path, into: Path) -> list[str]:
    """Extract a tar.gz into the new, empty directory `into`: regular files (0644) and directories (0755)
    only; any link, device or unsafe path refuses the whole archive. Returns the files' paths."""
    files: list[str] = []
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                try:
                    path = check_bundle_path(member.name)
                except ValueError as error:
                    raise FetchError(f"bundle refused: {error}", retryable=False) from None
                target = into / path
                if member.isdir():
                    target.mkdir(mode=0o755, parents=True, exist_ok=True)
                    continue
                if not member.isreg():
                    kind = "link" if member.issym() or member.islnk() else "special file"
                    raise FetchError(f"bundle refused: {member.name!r} is a {kind}; only files and directories", retryable=False)
                target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
                source = tar.extractfile(member)
                assert source is not None  # a regular member always has data
                # O_EXCL|O_NOFOLLOW: a duplicate member or anything already there is an error, never overwritten.
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
                with os.fdopen(fd, "wb") as out:
                    shutil.copyfileobj(source, out, CHUNK)
                    out.flush()
                    os.fsync(out.fileno())
                os.chmod(target, 0o644)  # whatever the umask
                files.append(path)
        # Directories made along the way got the umask's mode; the services (other users) must read them.
        for directory, _, _ in os.walk(into):
            os.chmod(directory, 0o755)
    except (tarfile.TarError, EOFError, OSError) as error:
        raise FetchError(f"bundle refused: cannot extract: {error}", retryable=False) from None
    return files


def _our_link(dest: Path, name: str) -> bool:
    path = dest / name
    return path.is_symlink() and os.readlink(path) == f"{BUNDLES_DIRNAME}/{CURRENT_LINK}/{name}"


def _replace_link(link: Path, target: str) -> None:
    temporary = link.with_name(f".{link.name}.new")
    with contextlib.suppress(FileNotFoundError):
        temporary.unlink()
    os.symlink(target, temporary)
    os.replace(temporary, link)  # rename(2): readers see the old link or the new one, never neither


def install_bundle(config: BootConfig, cloud: Aws | Gcp, deadline: float) -> None:
    dest, sha = config.dest, config.bundle_sha256
    bundles = dest / BUNDLES_DIRNAME
    current = bundles / CURRENT_LINK
    installed = bundles / sha
    previous_target = os.readlink(current) if current.is_symlink() else None
    if installed.is_dir():
        # A directory is renamed to its sha only after a verified download was completely extracted.
        log.info("bundle %s: already on the host, nothing fetched", sha)
    else:
        with tempfile.TemporaryDirectory(dir=bundles, prefix=".fetch-") as scratch:
            archive = Path(scratch) / "bundle.tar.gz"

            def fetch() -> int:
                digest = hashlib.sha256()
                with archive.open("wb") as out:
                    cloud.download(config.bundle_url, _HashingWriter(out, digest))
                size = archive.stat().st_size
                actual = digest.hexdigest()
                if actual != sha:
                    raise FetchError(
                        f"{config.bundle_url}: sha256 mismatch: expected {sha}, got {actual} ({size} bytes);"
                        " the installed bundle is unchanged"
                    )
                return size

            size = with_retries(f"bundle {config.bundle_url}", fetch, deadline)
            log.info("bundle %s: fetched %d bytes, sha256 %s (as expected)", config.bundle_url, size, sha)
            staging = Path(scratch) / "tree"
            staging.mkdir()
            files = extract_bundle(archive, staging)
            os.rename(staging, installed)
            _fsync_dir(bundles)
            log.info("bundle %s: %d files extracted into %s", sha, len(files), installed)

    names = sorted(entry.name for entry in installed.iterdir())
    for name in names:
        if name in RESERVED_TOP_LEVEL:
            raise FetchError(f"bundle refused: top-level {name!r} is reserved on the host", retryable=False)
        path = dest / name
        if path.is_symlink() or path.exists():
            if not _our_link(dest, name):
                raise FetchError(f"bundle refused: {path} exists and is not the bundle's link; move it away first", retryable=False)
        else:
            # Points through `current`: dangles until the swap below when the name is new.
            os.symlink(f"{BUNDLES_DIRNAME}/{CURRENT_LINK}/{name}", path)
    if previous_target not in (None, sha):
        _replace_link(bundles / PREVIOUS_LINK, previous_target)
    _replace_link(current, sha)
    _fsync_dir(bundles)
    for entry in sorted(dest.iterdir()):
        if entry.name not in names and _our_link(dest, entry.name):
            entry.unlink()
            log.info("bundle %s: %s is gone from the bundle; its link is removed", sha, entry.name)
    _fsync_dir(dest)
    # Keep the current and the previous bundle; drop older ones and what a crashed run left behind.
    keep = {sha}
    if (bundles / PREVIOUS_LINK).is_symlink():
        keep.add(os.readlink(bundles / PREVIOUS_LINK))
    for entry in sorted(bundles.iterdir()):
        if entry.is_dir() and not entry.is_symlink() and entry.name not in keep:
            shutil.rmtree(entry)
            log.info("bundle %s: removed %s", sha, entry)
    if previous_target == sha:
        log.info("bundle %s: installed (unchanged)", sha)
    else:
        log.info("bundle %s: installed (was %s)", sha, previous_target or "none")


class _HashingWriter:
    """A binary file wrapper that feeds everything written through a hash."""

    def __init__(self, out: Sink, digest: Any) -> None:
        self._out, self._digest = out, digest

    def write(self, data: bytes) -> object:
        self._digest.update(data)
        return self._out.write(data)


def ensure_secrets_dir(path: Path) -> None:
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    if not stat.S_ISDIR(os.lstat(path).st_mode):
        raise FetchError(f"{path} is not a directory", retryable=False)
    os.chmod(path, 0o700)


def write_secret(path: Path, value: bytes) -> bool:
    """Write atomically with mode 0600; False when the file already held exactly this value."""
    with contextlib.suppress(OSError):
        st = os.lstat(path)
        if stat.S_ISREG(st.st_mode) and path.read_bytes() == value:
            os.chmod(path, 0o600)
            return False
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mkstemp: mode 0600
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(value)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    _fsync_dir(path.parent)
    return True


def install_secrets(config: BootConfig, cloud: Aws | Gcp, deadline: float) -> list[str]:
    """Fetch and write every secret; returns the error of each one that failed (all are tried)."""
    ensure_secrets_dir(config.secrets_dir)
    failures: list[str] = []
    for ref in config.secrets:
        try:
            # A missing optional secret is final at once; a missing required one may still be on its way.
            value, version = with_retries(
                f"secret {ref.name}", functools.partial(cloud.secret, ref), deadline, retry_not_found=not ref.optional
            )
        except NotFound as error:
            if not ref.optional:
                failures.append(f"required secret {ref.name} not found: {error}")
                continue
            log.info("secret %s (%s): not found; optional, skipped", ref.name, ref.id)
            if ref.file.exists():
                ref.file.unlink()  # a stale value must not outlive its secret
                log.info("secret %s: removed the stale %s", ref.name, ref.file)
            continue
        except FetchError as error:
            failures.append(f"secret {ref.name}: {error}")
            continue
        changed = write_secret(ref.file, value)
        log.info(
            "secret %s (%s): version %s, %d bytes, %s %s (0600)",
            ref.name, ref.id, version, len(value), "written to" if changed else "unchanged in", ref.file,
        )
    return failures


@contextlib.contextmanager
def _locked(bundles: Path):  # type: ignore[no-untyped-def]
    """One run at a time (cloud-init and someone re-running it by hand)."""
    with open(bundles / LOCK_FILE, "a") as handle:
        give_up = time.monotonic() + LOCK_WAIT_SECONDS
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > give_up:
                    raise FetchError(f"another run holds {bundles / LOCK_FILE}", retryable=False) from None
                time.sleep(1)
        yield


def run(config: BootConfig, retry_seconds: float) -> int:
    deadline = time.monotonic() + retry_seconds
    log.info(
        "%s %s: bundle %s (sha256 %s), %d secrets into %s",
        config.cloud, config.location, config.bundle_url, config.bundle_sha256, len(config.secrets), config.secrets_dir,
    )
    try:
        cloud: Aws | Gcp = Aws(config.location) if config.cloud == "aws" else Gcp(config.location)
        os.makedirs(config.dest / BUNDLES_DIRNAME, exist_ok=True)
        for directory in (config.dest, config.dest / BUNDLES_DIRNAME):
            os.chmod(directory, 0o755)  # whatever the umask: the services read the bundle through both
        with _locked(config.dest / BUNDLES_DIRNAME):
            install_bundle(config, cloud, deadline)
            failures = install_secrets(config, cloud, deadline)
    except FetchError as error:
        log.error("%s", error)
        return EXIT_FETCH
    except OSError as error:
        log.error("cannot write under %s: %s", config.dest, error)
        return EXIT_FETCH
    for failure in failures:
        log.error("%s", failure)
    if failures:
        return EXIT_FETCH
    log.info("done: bundle %s and %d secrets in place", config.bundle_sha256, len(config.secrets))
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="A VM host's first-boot fetch of its bundle and secrets, with the instance's own identity.")
    parser.add_argument("--config", type=Path, required=True, help="the boot config (JSON), e.g. /etc/gpugate/boot.json")
    parser.add_argument(
        "--retry-seconds", type=float, default=DEFAULT_RETRY_SECONDS,
        help=f"keep retrying failed fetches this long after start (default {DEFAULT_RETRY_SECONDS:.0f})",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="gpugate-hostboot: %(levelname)s %(message)s", stream=sys.stderr)
    # botocore's INFO lines are noise except the one naming where the credentials came from (the instance role).
    for name in ("botocore", "boto3", "urllib3", "s3transfer"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("botocore.credentials").setLevel(logging.INFO)
    if args.retry_seconds < 0:
        log.error("--retry-seconds: must be 0 or more, got %s", args.retry_seconds)
        return EXIT_CONFIG
    try:
        config = load_config(args.config)
    except ConfigError as error:
        log.error("config %s: %s", args.config, error)
        return EXIT_CONFIG
    return run(config, args.retry_seconds)


if __name__ == "__main__":
    sys.exit(main())

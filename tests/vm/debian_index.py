"""Debian 12's package indices from this machine's mirror: which package names exist in which suite and component.

A fast test checks the package names in gpugate's user data against the release the VMs boot (not against
what this machine happens to have installed). `ensure_index()` downloads the indices once (about 20 MB,
verified against the suites' signed InRelease files) and caches a compact copy under `<cache>/vm/index/`;
`cached_index()` only reads that copy, so a test can skip with a clear reason when it is absent.
"""

from __future__ import annotations

import hashlib
import json
import logging
import lzma
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from gpugate.cache import cache_lock

from tests.vm.apt_sources import RELEASE, release_mirror
from tests.vm.disk_image import image_root

log = logging.getLogger(__name__)

ARCH = "amd64"  # the architecture of the cloud VMs gpugate provisions
COMPONENTS: tuple[str, ...] = ("main", "contrib", "non-free", "non-free-firmware")
# The release's suites on the main mirror; backports is optional (a mirror may not carry it).
SUITES: tuple[str, ...] = (RELEASE, f"{RELEASE}-updates", f"{RELEASE}-backports")
OPTIONAL_SUITES: frozenset[str] = frozenset({f"{RELEASE}-backports"})
# What an instance's apt sources enable on the stock Debian 12 cloud images.
DEFAULT_SUITES: tuple[str, ...] = (RELEASE, f"{RELEASE}-updates")
DEFAULT_COMPONENTS: tuple[str, ...] = ("main",)
KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
INDEX_FORMAT_VERSION = 1
HTTP_TIMEOUT_S = 60.0
LOCK_NAME = "debian-index"


class IndexUnavailable(RuntimeError):
    """The indices are not cached and could not be downloaded or verified; the message says why."""


@dataclass(frozen=True)
class PackageHit:
    """Where a name is found: a real package (with its version), or a virtual one some package provides."""

    name: str
    suite: str
    component: str
    version: str
    provided_by: str | None = None  # set when `name` is only a Provides of that package


class DebianIndex:
    """Package names -> versions, per suite and component, as the mirror served them when they were fetched."""

    def __init__(self, data: dict) -> None:
        self.mirror: str = data["mirror"]
        self.fetched: str = data["fetched"]
        self.suites: dict[str, str] = data["suites"]  # suite -> the Date of its InRelease
        self._packages: dict[str, dict[str, dict[str, str]]] = data["packages"]  # suite -> component -> name -> version
        self._provides: dict[str, dict[str, dict[str, str]]] = data["provides"]  # ... -> virtual name -> provider

    def lookup(self, name: str, suites: Sequence[str] = SUITES, components: Sequence[str] = COMPONENTS) -> list[PackageHit]:
        hits: list[PackageHit] = []
        for suite in suites:
            for component in components:
                version = self._packages.get(suite, {}).get(component, {}).get(name)
                if version is not None:
                    hits.append(PackageHit(name, suite, component, version))
                provider = self._provides.get(suite, {}).get(component, {}).get(name)
                if provider is not None and version is None:
                    hits.append(PackageHit(name, suite, component, "", provided_by=provider))
        return hits

    def missing(
        self,
        names: Iterable[str],
        suites: Sequence[str] = DEFAULT_SUITES,
        components: Sequence[str] = DEFAULT_COMPONENTS,
        allow_virtual: bool = False,
    ) -> list[str]:
        """The names apt could not install from these suites and components (virtual names only if allowed)."""
        unknown = [s for s in suites if s not in self.suites]
        if unknown:
            raise ValueError(f"suites {unknown} are not in the index (it has {sorted(self.suites)})")
        absent = []
        for name in names:
            hits = self.lookup(name, suites, components)
            if not any(hit.provided_by is None or allow_virtual for hit in hits):
                absent.append(name)
        return absent


def index_path(cache_dir: Path | None = None) -> Path:
    return image_root(cache_dir) / "index" / f"{RELEASE}-{ARCH}.json"


def cached_index(cache_dir: Path | None = None) -> DebianIndex | None:
    """The cached index for this machine's mirror, or None if it was never fetched (or from another mirror)."""
    path = index_path(cache_dir)
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    if data.get("format") != INDEX_FORMAT_VERSION or data.get("mirror") != release_mirror():
        return None
    return DebianIndex(data)


def ensure_index(cache_dir: Path | None = None, refresh: bool = False) -> DebianIndex:
    """The cached index, downloaded first when missing (or when `refresh`); raises IndexUnavailable."""
    if not refresh and (index := cached_index(cache_dir)) is not None:
        return index
    path = index_path(cache_dir)
    with cache_lock(path.parent, LOCK_NAME):
        if not refresh and (index := cached_index(cache_dir)) is not None:
            return index
        data = _download(release_mirror())
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, sort_keys=True))
        tmp.rename(path)
    return DebianIndex(data)


def _get(url: str) -> bytes | None:
    """The body at `url`, or None on 404; other failures raise IndexUnavailable."""
    try:
        with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as response:
            return response.read()
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        raise IndexUnavailable(f"GET {url}: HTTP {exc.code}") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise IndexUnavailable(f"GET {url}: {exc}") from exc


def _verified_release(mirror: str, suite: str) -> str | None:
    """The signed InRelease of `suite`, checked with the Debian archive keyring; None if the mirror lacks it."""
    url = f"{mirror}/dists/{suite}/InRelease"
    body = _get(url)
    if body is None:
        return None
    with tempfile.NamedTemporaryFile(suffix=".InRelease") as handle:
        handle.write(body)
        handle.flush()
        result = subprocess.run(
            ["gpgv", "--keyring", str(KEYRING), handle.name], capture_output=True, text=True, check=False
        )
    if result.returncode != 0:
        raise IndexUnavailable(f"{url} does not verify against {KEYRING}:\n{result.stderr.strip()}")
    return body.decode()


def _release_field(release: str, field: str) -> str:
    for line in release.splitlines():
        if line.startswith(f"{field}:"):
            return line.partition(":")[2].strip()
    return ""


def _sha256_entries(release: str) -> dict[str, tuple[str, int]]:
    """`SHA256:` section of a Release file: path -> (hash, size)."""
    entries: dict[str, tuple[str, int]] = {}
    in_section = False
    for line in release.splitlines():
        if not line.startswith(" "):
            in_section = line.startswith("SHA256:")
            continue
        if in_section:
            digest, size, name = line.split()
            entries[name] = (digest, int(size))
    return entries


def _parse_packages(text: str) -> tuple[dict[str, str], dict[str, str]]:
    """Packages file -> (name -> version, virtual name -> a package providing it)."""
    packages: dict[str, str] = {}
    provides: dict[str, str] = {}
    for stanza in text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if line and not line[0].isspace():
                name, _, value = line.partition(":")
                fields[name] = value.strip()
        package = fields.get("Package")
        if not package:
            continue
        packages[package] = fields.get("Version", "")
        for provided in fields.get("Provides", "").split(","):
            virtual = provided.split("(")[0].strip()
            if virtual:
                provides.setdefault(virtual, package)
    return packages, provides


def _download(mirror: str) -> dict:
    started = time.monotonic()
    suites: dict[str, str] = {}
    packages: dict[str, dict[str, dict[str, str]]] = {}
    provides: dict[str, dict[str, dict[str, str]]] = {}
    for suite in SUITES:
        release = _verified_release(mirror, suite)
        if release is None:
            if suite in OPTIONAL_SUITES:
                log.info("%s has no %s; leaving it out of the index", mirror, suite)
                continue
            raise IndexUnavailable(f"{mirror}/dists/{suite}/InRelease: not found")
        suites[suite] = _release_field(release, "Date")
        entries = _sha256_entries(release)
        available = _release_field(release, "Components").split()
        packages[suite], provides[suite] = {}, {}
        for component in COMPONENTS:
            if component not in available:
                continue
            relative = f"{component}/binary-{ARCH}/Packages.xz"
            if relative not in entries:
                raise IndexUnavailable(f"{mirror}/dists/{suite}/InRelease lists no {relative}")
            body = _get(f"{mirror}/dists/{suite}/{relative}")
            if body is None:
                raise IndexUnavailable(f"{mirror}/dists/{suite}/{relative}: not found")
            digest, size = entries[relative]
            if hashlib.sha256(body).hexdigest() != digest or len(body) != size:
                raise IndexUnavailable(f"{mirror}/dists/{suite}/{relative} does not match its InRelease hash")
            packages[suite][component], provides[suite][component] = _parse_packages(lzma.decompress(body).decode())
    log.info("fetched the %s package indices from %s in %.1f s", RELEASE, mirror, time.monotonic() - started)
    return {
        "format": INDEX_FORMAT_VERSION,
        "mirror": mirror,
        "fetched": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "suites": suites,
        "packages": packages,
        "provides": provides,
    }


def main() -> None:
    """`python -m tests.vm.debian_index NAME...`: where each name is found (downloads the index if needed)."""
    import sys

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    index = ensure_index()
    for name in sys.argv[1:]:
        hits = index.lookup(name)
        found = ", ".join(
            f"{h.suite}/{h.component} {h.version or '(virtual, provided by ' + str(h.provided_by) + ')'}" for h in hits
        )
        sys.stdout.write(f"{name}: {found or 'NOT FOUND'}\n")


if __name__ == "__main__":
    main()

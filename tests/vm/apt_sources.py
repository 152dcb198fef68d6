"""This machine's Debian apt sources: the mirror the VM image is built from and that its guests install from."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

HOST_SOURCES_DIR = Path("/etc/apt/sources.list.d")
RELEASE = "bookworm"  # Debian 12, the release of the cloud images gpugate's VMs boot


class AptSourcesError(RuntimeError):
    """This machine's apt sources do not name a mirror for the release."""


@dataclass(frozen=True)
class AptSource:
    """One stanza of a `.sources` file or one line of a `.list` file that apt reads (`deb` type only)."""

    uris: tuple[str, ...]
    suites: tuple[str, ...]
    components: tuple[str, ...]
    text: str  # the stanza or line as written, so a copy keeps its options (Signed-By, ...)
    deb822: bool
    origin: Path


def _deb822_stanzas(path: Path) -> list[AptSource]:
    sources: list[AptSource] = []
    for block in path.read_text().split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.splitlines():
            if line.startswith("#") or not line.strip() or line[0].isspace():
                continue  # comments, and continuation lines (Signed-By may hold an inline key)
            name, _, value = line.partition(":")
            fields[name.strip().lower()] = value.strip()
        if "deb" not in fields.get("types", "").split() or fields.get("enabled", "yes").lower() == "no":
            continue
        sources.append(
            AptSource(
                uris=tuple(fields.get("uris", "").split()),
                suites=tuple(fields.get("suites", "").split()),
                components=tuple(fields.get("components", "").split()),
                text=block.strip("\n") + "\n",
                deb822=True,
                origin=path,
            )
        )
    return sources


def _one_line_entries(path: Path) -> list[AptSource]:
    sources: list[AptSource] = []
    for line in path.read_text().splitlines():
        words = line.split("#", 1)[0].split()
        if not words or words[0] != "deb":
            continue
        words = words[1:]
        if words and words[0].startswith("["):  # [arch=amd64 signed-by=...]
            while words and not words[0].endswith("]"):
                words = words[1:]
            words = words[1:]
        if len(words) < 2:
            continue
        sources.append(
            AptSource(
                uris=(words[0],), suites=(words[1],), components=tuple(words[2:]), text=line + "\n",
                deb822=False, origin=path,
            )
        )
    return sources


def host_sources(sources_dir: Path = HOST_SOURCES_DIR) -> list[AptSource]:
    """Every enabled `deb` source apt reads from `sources_dir` (files ending `.sources` or `.list`)."""
    sources: list[AptSource] = []
    for path in sorted(sources_dir.glob("*")):
        if path.suffix == ".sources":
            sources.extend(_deb822_stanzas(path))
        elif path.suffix == ".list":
            sources.extend(_one_line_entries(path))
    return sources


def release_sources(release: str = RELEASE, sources_dir: Path = HOST_SOURCES_DIR) -> list[AptSource]:
    """The host's sources for one Debian release (suites `bookworm`, `bookworm-updates`, `bookworm-security`, ...).

    Third-party repositories (other suite names) are left out: a guest has none of their keys.
    """
    return [
        source
        for source in host_sources(sources_dir)
        if source.suites and all(s == release or s.startswith(f"{release}-") for s in source.suites)
    ]


def release_mirror(release: str = RELEASE, sources_dir: Path = HOST_SOURCES_DIR) -> str:
    """The URI of the mirror that serves the release's own suite (e.g. `http://deb.debian.org/debian`)."""
    for source in release_sources(release, sources_dir):
        if release in source.suites and source.uris:
            return source.uris[0].rstrip("/")
    raise AptSourcesError(
        f"no enabled apt source in {sources_dir} serves suite {release!r}; "
        f"found: {[(s.origin.name, s.suites) for s in host_sources(sources_dir)]}"
    )


def guest_sources_files(release: str = RELEASE, sources_dir: Path = HOST_SOURCES_DIR) -> dict[str, str]:
    """The files to put in a guest's /etc/apt/sources.list.d so it installs from the same mirror as this machine."""
    sources = release_sources(release, sources_dir)
    if not sources:
        raise AptSourcesError(f"no enabled apt source in {sources_dir} for Debian {release}")
    files: dict[str, str] = {}
    deb822 = "\n".join(s.text for s in sources if s.deb822)
    one_line = "".join(s.text for s in sources if not s.deb822)
    if deb822:
        files["host-mirror.sources"] = deb822
    if one_line:
        files["host-mirror.list"] = one_line
    return files

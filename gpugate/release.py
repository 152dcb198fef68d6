"""A release (the pins that decide what runs), its edit into a stack file that keeps every comment, and the promotion log."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from gpugate_runtime import __version__ as runtime_version
from pydantic import BaseModel, ConfigDict, Field
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap

from gpugate.stackfile import NAMESPACE, Stack, find_project
from gpugate.targets import render_bundle

# The pins a promotion copies and a rollback restores, as (config key, field) of a stack file.
# The gpugate runtime version is not among them: the operator package requires the exact runtime
# it renders for (pyproject.toml), so it is decided by the commit, and each release records it.
PIN_KEYS: tuple[tuple[str, str], ...] = (
    (f"{NAMESPACE}:model", "id"),
    (f"{NAMESPACE}:model", "revision"),
    (f"{NAMESPACE}:vllm", "image"),
)
PROMOTION_LOG_NAME = "promotions.jsonl"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Pins(Strict):
    """The values promotion copies from one stack file to another."""

    model_id: str
    model_revision: str
    vllm_image: str

    def rows(self) -> dict[str, str]:
        """The pins by the key path an operator finds them at in the stack file."""
        return {f"{key}.{field}": value for (key, field), value in zip(PIN_KEYS, self.values(), strict=True)}

    def values(self) -> tuple[str, str, str]:
        return (self.model_id, self.model_revision, self.vllm_image)


class Release(Strict):
    """What runs on a stack: its pins, the runtime version of the commit, and the bundle hash they produce."""

    stack: str
    pins: Pins
    runtime_version: str
    bundle_sha256: str
    commit: str | None = Field(None, description="git commit of the checkout the bundle was rendered from")

    @property
    def id(self) -> str:
        """Short id of what is promoted (pins and runtime); the same on staging and prod, whose bundles differ."""
        canonical = json.dumps([*self.pins.values(), self.runtime_version], separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:12]


class ReleaseError(Exception):
    """A stack file that cannot take part in a promotion; says why and what to do."""

    def __init__(self, what: str, todo: str = ""):
        self.what, self.todo = what, todo
        super().__init__(what)


def pins_of(stack: Stack) -> Pins:
    spec = stack.spec
    if spec.model.revision is None or spec.vllm.image is None:
        raise ReleaseError(
            f"{stack.path.name} pins no model revision or no vLLM image digest; only pinned releases are promoted",
            "promote between GPU stacks whose gpugate:model.revision and gpugate:vllm.image are set",
        )
    return Pins(model_id=spec.model.id, model_revision=spec.model.revision, vllm_image=spec.vllm.image)


def promotion_log() -> Path:
    """The project's promotion log, next to its stack files."""
    return find_project().stacks_dir / PROMOTION_LOG_NAME


def git_commit(cwd: Path | None = None) -> str | None:
    """The commit of the project's repository (the working directory's)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd or Path.cwd(), capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def release_of(stack: Stack, commit: str | None = None) -> Release:
    """The release a stack file describes in this checkout."""

    return Release(
        stack=stack.name,
        pins=pins_of(stack),
        runtime_version=runtime_version,
        bundle_sha256=render_bundle(stack).bundle_sha256,
        commit=commit if commit is not None else git_commit(),
    )


# ---- editing pins, keeping every comment and the key order -----------------------------------


def _round_trip() -> YAML:
    yaml = YAML()  # round-trip: comments, order, quoting and flow style survive
    yaml.preserve_quotes = True
    yaml.indent(mapping=2, sequence=4, offset=2)
    yaml.width = 4096
    return yaml


@dataclass(frozen=True)
class PinEdit:
    """A stack file's text with new pins, and the line numbers (1-based) that changed."""

    text: str
    changed_lines: tuple[int, ...]


def with_pins(text: str, pins: Pins, shown: str = "stack file") -> PinEdit:
    """Write `pins` into a stack file's text; every other byte stays as it was.

    ruamel.yaml round-trips the document, and the result is compared with the input line by line:
    if anything but the pin lines differs (a layout ruamel would rewrite), nothing is returned but
    an error, so a promotion never reformats a file behind a reviewer's back.
    """
    yaml = _round_trip()
    document = yaml.load(text)
    config = document.get("config") if isinstance(document, CommentedMap) else None
    pin_lines: set[int] = set()
    for (key, field), value in zip(PIN_KEYS, pins.values(), strict=True):
        section = config.get(key) if isinstance(config, CommentedMap) else None
        if not isinstance(section, CommentedMap) or field not in section:
            raise ReleaseError(f"{shown} has no {key}.{field} to pin", f"add {key}.{field} to {shown} by hand first")
        old = section[field]
        section[field] = type(old)(value) if isinstance(old, str) and type(old) is not str else value
        pin_lines.add(section.lc.value(field)[0] + 1)
    buffer = io.StringIO()
    yaml.dump(document, buffer)
    new = buffer.getvalue()
    old_lines, new_lines = text.splitlines(keepends=True), new.splitlines(keepends=True)
    changed = tuple(i + 1 for i, (a, b) in enumerate(zip(old_lines, new_lines, strict=False)) if a != b)
    if len(old_lines) != len(new_lines) or not set(changed) <= pin_lines:
        raise ReleaseError(
            f"writing pins into {shown} would change more than the pin lines (lines {sorted(set(changed) - pin_lines)})",
            f"edit the pins of {shown} by hand: {', '.join(f'{k}={v}' for k, v in pins.rows().items())}",
        )
    return PinEdit(text=new, changed_lines=changed)


# ---- the promotion log -----------------------------------------------------------------------


class GateRecord(Strict):
    gate: str
    ok: bool
    evidence: str


class LogEntry(Strict):
    """One line of the promotion log: who changed which stack's release, when, from what to what, and why it was allowed."""

    id: int = Field(ge=1)
    action: Literal["promote", "rollback"]
    stack: str
    source: str | None = Field(None, description="the stack whose release was promoted (promote only)")
    at: datetime
    who: str
    commit: str | None = None
    from_release: Release
    to_release: Release
    source_release: Release | None = None
    gates: list[GateRecord] = []
    reverts: int | None = Field(None, description="id of the promotion a rollback undoes")


def read_log(path: Path) -> list[LogEntry]:
    if not path.exists():
        return []
    return [LogEntry.model_validate_json(line) for line in path.read_text().splitlines() if line.strip()]


def append_log(path: Path, entry: LogEntry) -> None:
    """One JSON object per line, appended: a promotion adds exactly one line to review."""
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(entry.model_dump(mode="json", exclude_none=True), sort_keys=True, separators=(",", ":"))
    with path.open("a") as handle:
        handle.write(line + "\n")


def next_id(entries: list[LogEntry]) -> int:
    return max((e.id for e in entries), default=0) + 1


def current_promotion(entries: list[LogEntry], stack: str) -> LogEntry | None:
    """The stack's latest promotion that no rollback has undone: what a rollback goes back from."""
    reverted = {e.reverts for e in entries if e.action == "rollback" and e.stack == stack}
    return next(
        (e for e in reversed(entries) if e.action == "promote" and e.stack == stack and e.id not in reverted), None
    )


def now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)

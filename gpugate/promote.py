"""`gpugate promote`: copy staging's release pins into prod behind gates, with a log that a rollback reads."""

from __future__ import annotations

import difflib
import getpass
import logging
import math
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from gpugate_runtime import __version__ as runtime_version
from gpugate_runtime.contract import metrics as m
from pydantic import BaseModel, ConfigDict
from rich.console import Group
from rich.table import Table
from rich.text import Text

from gpugate.images import ALLOWED as IMAGES_ALLOWED
from gpugate.images import image_problems, stack_images
from gpugate.release import (
    GateRecord,
    LogEntry,
    Pins,
    Release,
    ReleaseError,
    append_log,
    current_promotion,
    git_commit,
    next_id,
    now,
    pins_of,
    read_log,
    release_of,
    with_pins,
)
from gpugate.render.bundle import MANIFEST
from gpugate.smoke import read_report
from gpugate.stackfile import SpecError, Stack, load_stack
from gpugate.targets import render_bundle

log = logging.getLogger(__name__)

DEFAULT_SOAK = "30m"
HTTP_TIMEOUT_S = 10.0
# Points per soak window in the prober query: fine enough to see a one-scrape dip in a short window.
SOAK_POINTS = 240


class Gate(BaseModel):
    """One gate's verdict: what it saw, what it needed, and what to do when it blocks."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    gate: str
    ok: bool
    evidence: str
    threshold: str
    todo: str = ""

    def record(self) -> GateRecord:
        return GateRecord(gate=self.gate, ok=self.ok, evidence=self.evidence)


def parse_duration(text: str) -> float:
    """`90s`, `30m`, `2h`, `1h30m` -> seconds."""
    parts = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", text.strip())
    if not text.strip() or parts is None:
        raise ValueError(f"{text!r} is not a duration; use e.g. 90s, 30m, 2h or 1h30m")
    hours, minutes, seconds = (int(p or 0) for p in parts.groups())
    return float(hours * 3600 + minutes * 60 + seconds)


def in_words(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s" if seconds % 60 else f"{seconds // 60}m"
    return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"


def _clock(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


# ---- the gates ---------------------------------------------------------------------------------


def smoke_gate(source: Release, record: Path | None) -> Gate:
    """The source stack's last smoke passed, and it checked the release being promoted."""
    name = f"{source.stack}-smoke"
    threshold = f"a passing `gpugate smoke --stack {source.stack} --record` for release {source.id} (bundle {source.bundle_sha256[:12]})"
    todo = f"deploy {source.stack} at this commit, run `gpugate smoke --stack {source.stack} --key-file K --record F`, then pass --smoke-record F"
    if record is None:
        return Gate(gate=name, ok=False, evidence="no smoke record given (--smoke-record)", threshold=threshold, todo=todo)
    try:
        report = read_report(record)
    except OSError as err:
        return Gate(gate=name, ok=False, evidence=f"cannot read {record}: {err.strerror}", threshold=threshold, todo=todo)
    except ValueError as err:
        first = str(err).splitlines()[0]
        return Gate(gate=name, ok=False, evidence=f"{record} is not a smoke record: {first}", threshold=threshold, todo=todo)
    seen = report.release
    if report.stack != source.stack or seen is None:
        evidence = f"the record is of stack {report.stack or '(none)'} with no release" if seen is None else f"the record is of stack {report.stack}"
        return Gate(gate=name, ok=False, evidence=evidence, threshold=threshold, todo=todo)
    if (seen.id, seen.bundle_sha256) != (source.id, source.bundle_sha256):
        return Gate(
            gate=name,
            ok=False,
            evidence=f"the record is of release {seen.id} (bundle {seen.bundle_sha256[:12]}, commit {(seen.commit or '?')[:12]}) "
            f"but {source.stack} is now release {source.id} (bundle {source.bundle_sha256[:12]})",
            threshold=threshold,
            todo=todo,
        )
    if not report.ok:
        failed = ", ".join(f"{c.check} ({c.evidence})" for c in report.failed)
        return Gate(
            gate=name,
            ok=False,
            evidence=f"smoke at {report.at:%Y-%m-%dT%H:%M:%SZ} failed: {failed}",
            threshold=threshold,
            todo=f"fix {source.stack} (see the failed checks), redeploy, smoke again with --record",
        )
    return Gate(
        gate=name,
        ok=True,
        evidence=f"{len(report.checks)} checks passed at {report.at:%Y-%m-%dT%H:%M:%SZ} against {report.url}",
        threshold=threshold,
    )


@dataclass
class Soak:
    """Where the source stack's Prometheus and Alertmanager answer, and how long it must have been clean."""

    stack: str
    prometheus_url: str
    alertmanager_url: str
    seconds: float
    http: Callable[[], httpx.Client] = field(default=lambda: httpx.Client(timeout=HTTP_TIMEOUT_S))

    @property
    def window(self) -> str:
        return in_words(self.seconds)

    def reach_todo(self, what: str, url: str) -> str:
        return (
            f"make {self.stack}'s {what} reachable at {url} (it listens on the host's loopback: "
            f"`ssh -L` or an SSM port-forwarding session), or pass --{what.lower()}-url"
        )

    def query(self, client: httpx.Client, path: str, params: dict[str, Any]) -> Any:
        response = client.get(f"{self.prometheus_url}{path}", params=params)
        response.raise_for_status()
        body = response.json()
        if body.get("status") != "success":
            raise httpx.HTTPError(f"Prometheus answered {body.get('errorType')}: {body.get('error')}")
        return body["data"]["result"]


def prober_gate(soak: Soak, end: float | None = None) -> Gate:
    """Every prober check on the source stack passed at every point of the soak window, which its data covers."""
    name = f"{soak.stack}-prober-soak"
    threshold = f"{m.PROBE_SUCCESS} = 1 for every check over the whole last {soak.window}"
    end = end if end is not None else time.time()
    start = end - soak.seconds
    step = max(1.0, math.ceil(soak.seconds / SOAK_POINTS))
    try:
        with soak.http() as client:
            series = soak.query(client, "/api/v1/query_range", {"query": m.PROBE_SUCCESS, "start": start, "end": end, "step": step})
    except (httpx.HTTPError, ValueError, KeyError) as err:
        return Gate(
            gate=name, ok=False, evidence=f"cannot read Prometheus at {soak.prometheus_url}: {err}", threshold=threshold,
            todo=soak.reach_todo("Prometheus", soak.prometheus_url),
        )
    if not series:
        return Gate(
            gate=name, ok=False, evidence=f"no {m.PROBE_SUCCESS} samples in the last {soak.window}", threshold=threshold,
            todo=f"check the prober on {soak.stack} (`gpugate-runtime prober status`) and Prometheus' scrape of it",
        )
    problems: list[str] = []
    first_seen = min(float(s["values"][0][0]) for s in series)
    for s in sorted(series, key=lambda s: s["metric"].get("check", "")):
        check = s["metric"].get("check", "?")
        points = [(float(ts), float(v)) for ts, v in s["values"]]
        failed = [ts for ts, v in points if v < 1]
        if failed:
            problems.append(f"check {check} failed at {_clock(failed[0])} ({len(failed)} of {len(points)} points at 0)")
        gaps = [(a, b) for (a, _), (b, _) in zip(points, points[1:], strict=False) if b - a > 2 * step]
        if gaps:
            a, b = max(gaps, key=lambda g: g[1] - g[0])
            problems.append(f"check {check} has no data for {in_words(b - a)} from {_clock(a)}")
    covered = end - first_seen
    if first_seen > start + 2 * step:
        problems.append(f"prober data covers only {in_words(covered)} of the {soak.window} window")
        todo = f"wait {in_words(soak.seconds - covered)} for the soak to complete, then promote again"
    else:
        todo = f"fix {soak.stack} (see runbooks/ for the failed check), let it soak {soak.window} clean, then promote again"
    if problems:
        return Gate(gate=name, ok=False, evidence="; ".join(problems), threshold=threshold, todo=todo)
    checks = sorted(s["metric"].get("check", "?") for s in series)
    return Gate(gate=name, ok=True, evidence=f"{', '.join(checks)} at 1 for {in_words(covered)}", threshold=threshold)


def alerts_gate(soak: Soak) -> Gate:
    """No alert fired on the source stack during the soak window (Prometheus) and none is active now (Alertmanager)."""
    name = f"{soak.stack}-alerts-soak"
    threshold = f"no alert firing in the last {soak.window}, none active in Alertmanager"
    seen: list[str] = []
    try:
        with soak.http() as client:
            fired = soak.query(client, "/api/v1/query", {"query": f'max_over_time(ALERTS{{alertstate="firing"}}[{int(soak.seconds)}s])'})
    except (httpx.HTTPError, ValueError, KeyError) as err:
        return Gate(
            gate=name, ok=False, evidence=f"cannot read Prometheus at {soak.prometheus_url}: {err}", threshold=threshold,
            todo=soak.reach_todo("Prometheus", soak.prometheus_url),
        )
    for s in fired:
        labels = s["metric"]
        seen.append(f"{labels.get('alertname', '?')} (severity {labels.get('severity', '?')}) fired in the window")
    try:
        with soak.http() as client:
            response = client.get(
                f"{soak.alertmanager_url}/api/v2/alerts", params={"active": "true", "silenced": "false", "inhibited": "false"}
            )
            response.raise_for_status()
            active = response.json()
    except (httpx.HTTPError, ValueError) as err:
        return Gate(
            gate=name, ok=False, evidence=f"cannot read Alertmanager at {soak.alertmanager_url}: {err}", threshold=threshold,
            todo=soak.reach_todo("Alertmanager", soak.alertmanager_url),
        )
    for alert in active:
        labels = alert.get("labels", {})
        seen.append(f"{labels.get('alertname', '?')} active in Alertmanager since {alert.get('startsAt', '?')}")
    if seen:
        runbooks = sorted({s.split(" ", 1)[0] for s in seen})
        return Gate(
            gate=name, ok=False, evidence="; ".join(seen), threshold=threshold,
            todo=f"follow the runbooks of {', '.join(runbooks)} (their runbook_url), fix {soak.stack}, "
            f"and promote after {soak.window} without alerts",
        )
    return Gate(gate=name, ok=True, evidence=f"no alert fired in {soak.window}; Alertmanager has none active", threshold=threshold)


Planner = Callable[[Stack], Any]


def images_gate(candidate: Stack) -> Gate:
    """Every image the target would run, with the new pins, is pinned by a published digest (gpugate/images.py)."""
    name = f"{candidate.name}-images"
    problems = image_problems(candidate.spec)
    if not problems:
        evidence = f"{len(stack_images(candidate.spec))} images pinned by digest"
        return Gate(gate=name, ok=True, evidence=evidence, threshold=IMAGES_ALLOWED)
    return Gate(
        gate=name, ok=False, evidence="; ".join(f"{field}: {problem}" for field, problem in problems), threshold=IMAGES_ALLOWED,
        todo=f"pin each named field in {candidate.path.name} (or the source stack's gpugate:vllm.image) to the digest of a "
        "published image (`crane digest <image>:<tag>`) and say in a comment where it comes from",
    )


def plan_gate(candidate: Stack, planner: Planner) -> Gate:
    """The target stack, with the new pins, passes the offline plan: policy, capacity, user-data size."""
    name = f"{candidate.name}-plan"
    threshold = "no policy violation, the model fits the GPU, user-data within its limit"
    try:
        report = planner(candidate)
    except (ValueError, SpecError) as err:
        return Gate(gate=name, ok=False, evidence=f"the plan could not run: {err}", threshold=threshold,
                    todo=f"run `gpugate plan --stack {candidate.name}` with the new pins and fix what it reports")
    if report.ok:
        fit = f"; {report.capacity.message.split(' (')[0]}" if report.capacity is not None else ""
        return Gate(gate=name, ok=True, evidence=f"plan ok ({'planned' if report.planned else report.note}){fit}", threshold=threshold)
    problems = [f"{v.policy}: {v.message}" for v in report.violations]
    if report.capacity is not None and not report.capacity.fits:
        problems.append(f"capacity: {report.capacity.message}")
    if report.user_data_bytes is not None and report.user_data_bytes > report.user_data_limit_bytes:
        problems.append(f"user-data {report.user_data_bytes:,} bytes > {report.user_data_limit_bytes:,}")
    return Gate(
        gate=name, ok=False, evidence="; ".join(problems) or "plan not ok", threshold=threshold,
        todo=f"run `gpugate plan --stack {candidate.name}` and fix the stack or the release before promoting",
    )


# ---- promotion and rollback ------------------------------------------------------------------


@dataclass
class Change:
    """What a promotion or rollback would write, and why it may."""

    action: str
    stack: Stack
    before: Release
    after: Release
    new_text: str
    changed_lines: tuple[int, ...]
    bundle_diff: dict[str, str]
    gates: list[Gate] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    source: Release | None = None
    reverts: int | None = None

    @property
    def changes_anything(self) -> bool:
        return bool(self.changed_lines)

    @property
    def allowed(self) -> bool:
        return all(g.ok for g in self.gates)


def _candidate(target: Stack, text: str, directory: Path) -> Stack:
    """The target stack file with new pins, loaded from a scratch copy of the same name (same rendered headers)."""
    path = directory / target.path.name
    path.write_text(text)
    return load_stack(path)


def bundle_diff(before: Stack, after: Stack) -> dict[str, str]:
    old, new = render_bundle(before).files, render_bundle(after).files
    diffs = {}
    for path in sorted(set(old) | set(new)):
        a, b = old.get(path, b""), new.get(path, b"")
        if a != b and path != MANIFEST:
            lines = difflib.unified_diff(
                a.decode(errors="replace").splitlines(keepends=True),
                b.decode(errors="replace").splitlines(keepends=True),
                f"a/{path}", f"b/{path}", n=1,
            )
            diffs[path] = "".join(lines)
    return diffs


def plan_promotion(
    source: Stack,
    target: Stack,
    smoke_record: Path | None,
    soak: Soak,
    planner: Planner,
    end: float | None = None,
) -> Change:
    """Everything `gpugate promote --from S --to T` decides, without writing anything."""
    commit = git_commit()
    source_release = release_of(source, commit)
    before = release_of(target, commit)
    edit = with_pins(target.path.read_text(), source_release.pins, target.path.name)
    with tempfile.TemporaryDirectory(prefix="gpugate-promote-") as scratch:
        candidate = _candidate(target, edit.text, Path(scratch))
        after = release_of(candidate, commit)
        diff = bundle_diff(target, candidate)
        gates = [
            smoke_gate(source_release, smoke_record),
            prober_gate(soak, end),
            alerts_gate(soak),
            images_gate(candidate),
            plan_gate(candidate, planner),
        ]
    return Change(
        action="promote", stack=target, before=before, after=after, new_text=edit.text, changed_lines=edit.changed_lines,
        bundle_diff=diff, gates=gates, source=source_release,
    )


def plan_rollback(target: Stack, log_path: Path) -> Change:
    """Everything `gpugate promote --rollback --stack T` decides: back to the pins before T's last promotion."""
    entries = read_log(log_path)
    current = current_promotion(entries, target.name)
    if current is None:
        raise ReleaseError(
            f"{log_path.name} has no promotion of {target.name} left to roll back",
            f"edit the pins of {target.path.name} by hand (see docs/promotion.md) and commit them",
        )
    pins = pins_of(target)
    if pins != current.to_release.pins:
        raise ReleaseError(
            f"{target.path.name} pins {_pin_text(pins)}, but promotion #{current.id} wrote {_pin_text(current.to_release.pins)}: "
            "the file was changed outside `gpugate promote`",
            f"restore {target.path.name} from git, or edit its pins by hand to the release you want",
        )
    commit = git_commit()
    before = release_of(target, commit)
    edit = with_pins(target.path.read_text(), current.from_release.pins, target.path.name)
    with tempfile.TemporaryDirectory(prefix="gpugate-rollback-") as scratch:
        candidate = _candidate(target, edit.text, Path(scratch))
        after = release_of(candidate, commit)
        diff = bundle_diff(target, candidate)
    notes = [f"rolls back promotion #{current.id} ({current.at:%Y-%m-%dT%H:%M:%SZ}, by {current.who})"]
    if current.from_release.runtime_version != runtime_version:
        notes.append(
            f"the previous release ran gpugate-runtime {current.from_release.runtime_version}; this checkout renders "
            f"{runtime_version}: the pins are restored, the runtime is not — deploy {target.name} from commit "
            f"{current.from_release.commit or '(see the log)'} to restore it too"
        )
    return Change(
        action="rollback", stack=target, before=before, after=after, new_text=edit.text, changed_lines=edit.changed_lines,
        bundle_diff=diff, notes=notes, reverts=current.id,
    )


def _pin_text(pins: Pins) -> str:
    return ", ".join(f"{k}={v}" for k, v in pins.rows().items())


def who_am_i() -> str:
    actor = os.environ.get("GITHUB_ACTOR")
    if actor:
        run = os.environ.get("GITHUB_RUN_ID")
        return f"{actor} (GitHub Actions run {run})" if run else actor
    try:
        email = subprocess.run(["git", "config", "user.email"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        email = ""
    return email or getpass.getuser()


def apply(change: Change, log_path: Path, who: str) -> LogEntry:
    """Write the new pins (atomically) and append the record; the caller checked the gates."""
    path = change.stack.path
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(change.new_text)
    os.replace(tmp, path)
    entry = LogEntry(
        id=next_id(read_log(log_path)),
        action=change.action,  # type: ignore[arg-type]
        stack=change.stack.name,
        source=change.source.stack if change.source else None,
        at=now(),
        who=who,
        commit=change.after.commit,
        from_release=change.before,
        to_release=change.after,
        source_release=change.source,
        gates=[g.record() for g in change.gates],
        reverts=change.reverts,
    )
    append_log(log_path, entry)
    return entry


# ---- the command ------------------------------------------------------------------------------


def change_view(change: Change) -> Group:
    parts: list[Any] = [Text.from_markup(f"[bold]{change.action} {change.stack.name}[/] ({change.stack.path})")]
    if change.gates:
        gates = Table("gate", "result", "evidence", "threshold", title="gates", title_justify="left")
        for g in change.gates:
            gates.add_row(g.gate, "[green]pass[/]" if g.ok else "[bold red]BLOCKED[/]", Text(g.evidence), Text(g.threshold))
        parts.append(gates)
        for g in change.gates:
            if not g.ok:
                parts.append(Text(f"BLOCKED by {g.gate}: {g.evidence} (needs: {g.threshold})", style="bold red"))
                parts.append(Text(f"  what to do: {g.todo}"))
    pins = Table("pin", f"{change.stack.name} now", "after", title="pins", title_justify="left")
    for (key, old), new in zip(change.before.pins.rows().items(), change.after.pins.values(), strict=True):
        pins.add_row(key, old, Text(new, style="bold") if new != old else Text(new))
    pins.add_row("gpugate-runtime", change.before.runtime_version, change.after.runtime_version)
    pins.add_row("bundle sha256", change.before.bundle_sha256[:16], change.after.bundle_sha256[:16])
    pins.add_row("release", change.before.id, change.after.id)
    parts.append(pins)
    if change.bundle_diff:
        parts.append(Text(f"bundle diff ({len(change.bundle_diff)} files):", style="bold"))
        parts.append(Text("".join(change.bundle_diff.values())))
    for note in change.notes:
        parts.append(Text(f"note: {note}", style="yellow"))
    return Group(*parts)


def change_json(change: Change, applied: LogEntry | None) -> dict[str, Any]:
    return {
        "action": change.action,
        "stack": change.stack.name,
        "allowed": change.allowed,
        "changes": change.changes_anything,
        "applied": applied is not None,
        "log_entry": applied.id if applied else None,
        "gates": [g.model_dump() for g in change.gates],
        "before": change.before.model_dump(mode="json"),
        "after": change.after.model_dump(mode="json"),
        "source": change.source.model_dump(mode="json") if change.source else None,
        "changed_lines": list(change.changed_lines),
        "bundle_diff": change.bundle_diff,
        "notes": change.notes,
    }

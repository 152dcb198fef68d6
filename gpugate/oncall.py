"""`gpugate alerts --stack S`: the alerts firing in a stack's Alertmanager, with their live value and the first steps of their runbook."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from gpugate_runtime.contract.host import LOOPBACK, Ports
from pydantic import BaseModel, ConfigDict
from rich.console import Console
from rich.table import Table
from rich.text import Text

from gpugate.spec import GatewaySpec, Target
from gpugate.stackfile import REPO_ROOT

RUNBOOKS_DIR = REPO_ROOT / "runbooks"
ALERTS_API = "/api/v2/alerts"
FIRST_STEPS = 3
TIMEOUT_S = 10.0
SEVERITY_ORDER = {"page": 0, "ticket": 1}
# Runbooks write the stack as `--stack S` (and `pulumi up -s S`); the view puts the real name in.
_STACK_PLACEHOLDER = re.compile(r"(--stack|-s) S\b")
_SECTION = re.compile(r"^## +(.+?)\s*$")
_NUMBERED = re.compile(r"^(\d+)\. +(.*)$")
_LINK = re.compile(r"\[([^\]]+)\]\([^)]+\)")


class FiringAlert(BaseModel):
    """One alert as on call needs it: what, how bad, since when, how much, and what to do first."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    alertname: str
    severity: str
    state: str  # active | suppressed | unprocessed (Alertmanager's)
    since: datetime
    value: str
    summary: str
    description: str
    labels: dict[str, str]
    runbook_url: str
    runbook_file: str | None
    first_steps: list[str]


class AlertmanagerUnreachable(Exception):
    """The Alertmanager API did not answer; the message says where it was asked and what to try."""


def default_alertmanager_url(spec: GatewaySpec) -> str:
    """The Alertmanager of a host listens on loopback at internal_base + 4: on a local stack this machine;
    for a cloud stack the same port once an SSH tunnel forwards it here."""
    return f"http://{LOOPBACK}:{Ports(spec.ports.internal_base).alertmanager}"


def tunnel_hint(spec: GatewaySpec, stack: str = "NAME") -> str:
    port = Ports(spec.ports.internal_base).alertmanager
    if spec.target is Target.LOCAL:
        return f"is the local stack up? `gpugate status --stack {stack}`; its Alertmanager listens on {LOOPBACK}:{port}"
    if spec.target is Target.KUBERNETES:
        namespace = spec.kubernetes.namespace if spec.kubernetes else "NAMESPACE"
        return (
            f"forward the cluster's Alertmanager to this machine, e.g. `kubectl port-forward -n {namespace} "
            f"svc/ALERTMANAGER {port}:9093`, or pass --alertmanager-url"
        )
    return (
        f"open an SSH tunnel to the gateway host first: `ssh -N -L {port}:{LOOPBACK}:{port} USER@HOST` "
        f"(the host is `pulumi stack output ssh_host -s {stack}`), or pass --alertmanager-url"
    )


def fetch_alerts(base_url: str, include_suppressed: bool = False, timeout: float = TIMEOUT_S) -> list[dict[str, Any]]:
    """Active alerts from Alertmanager's API v2; silenced and inhibited ones only when asked for."""
    params = {
        "active": "true",
        "unprocessed": "true",
        "silenced": str(include_suppressed).lower(),
        "inhibited": str(include_suppressed).lower(),
    }
    url = base_url.rstrip("/") + ALERTS_API
    try:
        response = httpx.get(url, params=params, timeout=timeout, trust_env=False)
        response.raise_for_status()
        data = response.json()
    except httpx.HTTPStatusError as exc:
        raise AlertmanagerUnreachable(f"{url} answered HTTP {exc.response.status_code}") from None
    except httpx.HTTPError as exc:
        raise AlertmanagerUnreachable(f"cannot reach Alertmanager at {url}: {exc}") from None
    except ValueError:
        raise AlertmanagerUnreachable(f"{url} did not answer JSON: is it an Alertmanager?") from None
    if not isinstance(data, list):
        raise AlertmanagerUnreachable(f"{url} did not answer a list of alerts: is it an Alertmanager (API v2)?")
    return data


def runbook_sections(text: str) -> dict[str, str]:
    """`## Heading` -> the section's text, for a runbook's Markdown."""
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        heading = _SECTION.match(line)
        if heading:
            current = sections.setdefault(heading.group(1), [])
        elif current is not None:
            current.append(line)
    return {name: "\n".join(lines).strip("\n") for name, lines in sections.items()}


def mitigation_steps(text: str) -> list[str]:
    """The numbered steps of a runbook's Mitigation section, each as one line: its words up to its
    code block, then the block's first command."""
    section = runbook_sections(text).get("Mitigation", "")
    steps: list[tuple[list[str], list[str]]] = []
    in_code = False
    for raw in section.splitlines():
        line = raw.strip()
        if line.startswith("```"):
            in_code = not in_code
            continue
        if in_code:
            if steps and line:
                steps[-1][1].append(line)
            continue
        numbered = _NUMBERED.match(line)
        if numbered and not raw.startswith(" "):
            steps.append(([numbered.group(2)], []))
        elif steps and line and not steps[-1][1]:
            steps[-1][0].append(line)  # a step's words end where its command begins
    rendered = []
    for words, code in steps:
        step = _LINK.sub(r"\1", " ".join(words))
        if code:
            step = f"{step} `{code[0]}`"
        rendered.append(step)
    return rendered


def runbook_for(runbook_url: str, alertname: str, runbooks_dir: Path = RUNBOOKS_DIR) -> Path | None:
    """The runbook file in this checkout that an alert's runbook_url names."""
    name = runbook_url.rstrip("/").rsplit("/", 1)[-1] if runbook_url else ""
    if not name.endswith(".md"):
        name = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "-", alertname).lower() + ".md"
    path = runbooks_dir / name
    return path if path.is_file() else None


def _since(text: str) -> datetime:
    # Alertmanager writes nanoseconds; Python parses at most microseconds.
    trimmed = re.sub(r"(\.\d{6})\d+", r"\1", text).replace("Z", "+00:00")
    try:
        return datetime.fromisoformat(trimmed).astimezone(UTC)
    except ValueError:
        return datetime.fromtimestamp(0, UTC)


def firing_alerts(raw: list[dict[str, Any]], stack: str, runbooks_dir: Path = RUNBOOKS_DIR) -> list[FiringAlert]:
    """Alertmanager's alerts with their runbook's first steps, pages first, then the oldest first."""
    alerts = []
    for item in raw:
        labels = {str(k): str(v) for k, v in (item.get("labels") or {}).items()}
        annotations = {str(k): str(v) for k, v in (item.get("annotations") or {}).items()}
        alertname = labels.get("alertname", "?")
        runbook_url = annotations.get("runbook_url", "")
        path = runbook_for(runbook_url, alertname, runbooks_dir)
        steps = mitigation_steps(path.read_text()) if path else []
        alerts.append(
            FiringAlert(
                alertname=alertname,
                severity=labels.get("severity", ""),
                state=str((item.get("status") or {}).get("state", "active")),
                since=_since(str(item.get("startsAt", ""))),
                value=annotations.get("value") or annotations.get("description", ""),
                summary=annotations.get("summary", ""),
                description=annotations.get("description", ""),
                labels=labels,
                runbook_url=runbook_url,
                runbook_file=str(path) if path else None,
                first_steps=[_STACK_PLACEHOLDER.sub(rf"\1 {stack}", s) for s in steps[:FIRST_STEPS]],
            )
        )
    return sorted(alerts, key=lambda a: (SEVERITY_ORDER.get(a.severity, 9), a.since, a.alertname))


def _ago(since: datetime, now: datetime) -> str:
    seconds = max(0, int((now - since).total_seconds()))
    if seconds < 120:
        return f"{seconds}s ago"
    if seconds < 2 * 3600:
        return f"{seconds // 60}m ago"
    if seconds < 2 * 86400:
        return f"{seconds // 3600}h {seconds % 3600 // 60}m ago"
    return f"{seconds // 86400}d ago"


def render_alerts(console: Console, stack: str, url: str, alerts: list[FiringAlert], now: datetime) -> None:
    if not alerts:
        console.print(f"[green]✓[/] no alerts firing on stack [bold]{stack}[/] ({url})", highlight=False)
        return
    table = Table("severity", "alert", "since", "value", "summary", title=f"{stack} — {len(alerts)} firing ({url})")
    colors = {"page": "bold red", "ticket": "yellow"}
    for a in alerts:
        state = "" if a.state == "active" else f" ({a.state})"
        table.add_row(
            f"[{colors.get(a.severity, 'white')}]{a.severity or '?'}[/]",
            a.alertname + state,
            f"{a.since:%Y-%m-%d %H:%M} UTC ({_ago(a.since, now)})",
            a.value,
            a.summary,
        )
    console.print(table)
    for a in alerts:
        console.print(Text.assemble("\n", (a.alertname, "bold"), f" — {a.description}"), highlight=False)
        if a.first_steps:
            console.print("  first steps:", highlight=False)
            for number, step in enumerate(a.first_steps, 1):
                console.print(f"    {number}. {step}", highlight=False, markup=False)
        else:
            console.print("  (no runbook in this checkout: open the link)", highlight=False)
        console.print(f"  runbook: {a.runbook_url}", highlight=False, markup=False)

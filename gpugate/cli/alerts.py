"""`gpugate alerts`: what fires in a stack's Alertmanager, with each runbook's first steps."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Annotated

import typer
from rich.console import Console

from gpugate.cli.options import ExitCode, JsonOpt, StackOpt, load_or_exit
from gpugate.oncall import (
    AlertmanagerUnreachable,
    default_alertmanager_url,
    fetch_alerts,
    firing_alerts,
    render_alerts,
    tunnel_hint,
)


def alerts_command(
    stack: StackOpt,
    as_json: JsonOpt = False,
    alertmanager_url: Annotated[
        str | None,
        typer.Option(
            "--alertmanager-url",
            help="the stack's Alertmanager; default: 127.0.0.1:<internal_base+4> (a local stack, or an SSH tunnel to a cloud host)",
        ),
    ] = None,
    include_suppressed: Annotated[bool, typer.Option("--all", help="also show silenced and inhibited alerts")] = False,
) -> None:
    """List the alerts firing in a stack's Alertmanager, with the first steps of each one's runbook.

    Severity, since when, the live value and the first steps of each alert's runbook. Exits 0 when none
    fire, 1 when some do (or Alertmanager cannot be reached), 2 on a bad stack file."""
    out, err = Console(soft_wrap=True), Console(stderr=True, soft_wrap=True)
    loaded = load_or_exit(stack)
    url = alertmanager_url or default_alertmanager_url(loaded.spec)
    try:
        raw = fetch_alerts(url, include_suppressed)
    except AlertmanagerUnreachable as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False)
        err.print("[bold]what to do:[/] ", end="")
        err.print(tunnel_hint(loaded.spec, loaded.name), highlight=False, markup=False)
        raise typer.Exit(ExitCode.CHECK_FAILED) from None
    alerts = firing_alerts(raw, loaded.name)
    if as_json:
        report = {"stack": loaded.name, "alertmanager": url, "alerts": [a.model_dump(mode="json") for a in alerts]}
        out.print_json(json.dumps(report))
    else:
        render_alerts(out, loaded.name, url, alerts, datetime.now(UTC))
    raise typer.Exit(ExitCode.CHECK_FAILED if alerts else ExitCode.OK)

"""The `gpugate` command: one verb per operator task, a table for people and --json for machines.

The command-line layer is the top of gpugate's layers (runtime contract <- bundle rendering <- targets
<- infra <- command line): the only one that imports everything below, infra/ included.
"""

from __future__ import annotations

import logging
import sys
from typing import Annotated

import typer

from gpugate import __version__
from gpugate.cli import alerts, bundle, dashboard, keys, local, plan, promote, run, smoke
from gpugate.cli.options import console

app = typer.Typer(
    name="gpugate",
    help="Run a self-hosted, OpenAI-compatible LLM gateway from code: render, validate, plan and operate stacks.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="log debug details")] = False,
    version: Annotated[bool, typer.Option("--version", help="print the version and exit")] = False,
) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if version:
        console.print(f"gpugate {__version__}")
        raise typer.Exit()


app.command("stacks")(bundle.stacks)
app.command("render")(bundle.render)
app.command("validate")(bundle.validate)
app.command("up")(local.up)
app.command("down")(local.down)
app.command("status")(local.status)
app.command("logs")(local.logs)
app.add_typer(keys.app, name="keys")
app.command("plan")(plan.plan_command)
app.command("smoke")(smoke.smoke_command)
app.command("promote")(promote.promote_command)
app.command("dashboard")(dashboard.dashboard_command)
app.command("alerts")(alerts.alerts_command)
# Runbook tasks take their own options; each task's --help is its own, so `run` has none.
app.command("run", context_settings=run.RUN_CONTEXT_SETTINGS, add_help_option=False)(run.run_command)


def main_entry() -> None:  # pragma: no cover - console script entry
    sys.exit(app())

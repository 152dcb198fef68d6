"""`gpugate-runtime prober`: run the synthetic checks, as a service or once."""

from __future__ import annotations

import asyncio
import logging
from typing import Annotated

import typer
from rich.console import Console

from gpugate_runtime.cli.options import settings_or_exit
from gpugate_runtime.contract.exits import ExitCode
from gpugate_runtime.prober import Prober, serve, status_table
from gpugate_runtime.prober_settings import ProberSettings

app = typer.Typer(help="Synthetic checks of this gateway host.", no_args_is_help=True, add_completion=False)


def _configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@app.command("serve")
def serve_command() -> None:
    """Run every check each interval; serve /metrics and /status on 127.0.0.1 (settings: GPUGATE_PROBER_*)."""
    settings = settings_or_exit(ProberSettings, "the prober's")
    _configure_logging(settings.log_level)
    asyncio.run(serve(settings))


@app.command("status")
def status_command(
    json_out: Annotated[bool, typer.Option("--json", help="print the run as JSON")] = False,
) -> None:
    """Run every check once now; exit 0 if all that apply pass, 1 otherwise."""
    settings = settings_or_exit(ProberSettings, "the prober's")
    _configure_logging("error")  # the table says what failed; warnings would repeat it
    run = asyncio.run(Prober(settings).run_once())
    if json_out:
        typer.echo(run.model_dump_json(indent=2))
    else:
        Console().print(status_table(run))
    if not run.ok:
        raise typer.Exit(ExitCode.CHECK_FAILED)

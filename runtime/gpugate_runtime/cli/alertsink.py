"""`gpugate-runtime alertsink`: the local alert channel."""

from __future__ import annotations

import logging

import typer

from gpugate_runtime.alertsink import ALERTS_PATH, build_app
from gpugate_runtime.cli.options import settings_or_exit
from gpugate_runtime.contract.host import LOOPBACK
from gpugate_runtime.prober_settings import AlertSinkSettings
from gpugate_runtime.quietserver import loopback_server

log = logging.getLogger("gpugate_runtime.alertsink")

app = typer.Typer(
    help="The local alert channel (Alertmanager webhook -> alert log).", no_args_is_help=True, add_completion=False
)


@app.callback()
def main() -> None:
    """The local alert channel."""


@app.command("serve")
def serve_command() -> None:
    """Append each notification Alertmanager POSTs to 127.0.0.1/alerts to the alert log (GPUGATE_ALERTSINK_*)."""
    settings = settings_or_exit(AlertSinkSettings, "the alert sink's")
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.info("alert sink on http://%s:%d%s -> %s", LOOPBACK, settings.port, ALERTS_PATH, settings.path)
    loopback_server(build_app(settings), settings.port, settings.log_level).run()

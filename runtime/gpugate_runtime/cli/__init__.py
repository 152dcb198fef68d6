"""`gpugate-runtime`: the host CLI that gathers the runtime's commands (keys, authz, launch, prober, alertsink)."""

from __future__ import annotations

import typer

from gpugate_runtime import __version__
from gpugate_runtime.cli import alertsink, authz, keys, launch, prober, router

app = typer.Typer(
    help="gpugate's host runtime: client keys, the auth service, the vLLM launcher, the prober, the alert sink, the router.",
    no_args_is_help=True,
    add_completion=False,
)
app.add_typer(keys.app, name="keys")
app.add_typer(authz.app, name="authz")
app.add_typer(launch.app, name="launch")
app.add_typer(prober.app, name="prober")
app.add_typer(alertsink.app, name="alertsink")
app.add_typer(router.app, name="router")


def _version(value: bool) -> None:
    if value:
        typer.echo(__version__)
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="print the version and exit"),
) -> None:
    """gpugate's host runtime: client keys, the auth service, the vLLM launcher, the prober, the alert sink, the router."""

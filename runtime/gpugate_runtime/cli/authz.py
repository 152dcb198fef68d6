"""`gpugate-runtime authz`: serve Caddy's forward_auth checks."""

from __future__ import annotations

import typer
from prometheus_client import disable_created_metrics

from gpugate_runtime.authz import Authz
from gpugate_runtime.cli.options import settings_or_exit
from gpugate_runtime.contract.host import LOOPBACK
from gpugate_runtime.decisionlog import configure_logging
from gpugate_runtime.settings import AuthzSettings

app = typer.Typer(help="The forward_auth service Caddy asks about every API request.", no_args_is_help=True, add_completion=False)


@app.callback()
def main() -> None:
    """The forward_auth service Caddy asks about every API request."""


@app.command()
def serve() -> None:
    """Serve /authz and /metrics on 127.0.0.1 (settings: GPUGATE_AUTHZ_* and the env file)."""
    settings = settings_or_exit(AuthzSettings, "authz")
    configure_logging(settings)
    disable_created_metrics()
    import uvicorn  # noqa: PLC0415 - start-up cost only for the service, not for `--help`

    from gpugate_runtime.quietserver import QuietServer  # noqa: PLC0415 - same: it imports uvicorn

    config = uvicorn.Config(
        Authz(settings),
        host=LOOPBACK,
        port=settings.port,
        http="httptools",
        loop="uvloop",
        lifespan="on",
        access_log=False,
        log_config=None,
        server_header=False,
        date_header=False,
        # Longer than Caddy's upstream keep-alive (2 min), so Caddy never reuses a connection we just closed.
        timeout_keep_alive=180,
    )
    QuietServer(config).run()

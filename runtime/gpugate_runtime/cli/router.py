"""`gpugate-runtime router`: serve the route table (local tiers, external providers) behind Caddy."""

from __future__ import annotations

import logging

import typer
from prometheus_client import disable_created_metrics
from pydantic import ValidationError

from gpugate_runtime.cli.options import bad_input, settings_or_exit
from gpugate_runtime.contract.host import LOOPBACK
from gpugate_runtime.router_settings import RouterSettings
from gpugate_runtime.routetable import RouteTable

log = logging.getLogger("gpugate_runtime.router")

app = typer.Typer(
    help="The router between Caddy and the local tiers / external providers.", no_args_is_help=True, add_completion=False
)


@app.callback()
def main() -> None:
    """The router between Caddy and the local tiers / external providers."""


@app.command()
def serve() -> None:
    """Serve /v1/chat/completions, /v1/completions and /v1/models on 127.0.0.1, routed by each key's policy
    (settings: GPUGATE_ROUTER_* and the env file; the table: GPUGATE_ROUTER_TABLE)."""
    settings = settings_or_exit(RouterSettings, "the router's")
    try:
        table = RouteTable.load(settings.table)
    except (OSError, ValidationError) as exc:
        bad_input(f"the route table {settings.table} cannot be used: {exc}")
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    disable_created_metrics()
    import uvicorn  # noqa: PLC0415 - start-up cost only for the service, not for `--help`

    from gpugate_runtime.quietserver import QuietServer  # noqa: PLC0415 - same: it imports uvicorn
    from gpugate_runtime.router import Router  # noqa: PLC0415 - same: it imports httpx

    router = Router(table, settings.log_file, settings.vllm_key_file)
    log.info("router on http://%s:%d: %d tiers, %d providers, %d models", LOOPBACK, settings.port, len(table.tiers),
             len(table.providers), len(table.models))  # fmt: skip
    config = uvicorn.Config(
        router,
        host=LOOPBACK,
        port=settings.port,
        http="httptools",
        loop="uvloop",
        lifespan="on",
        access_log=False,  # privacy: request lines never reach a log
        log_config=None,
        server_header=False,
        date_header=False,
        timeout_keep_alive=180,  # longer than Caddy's upstream keep-alive, as authz's
    )
    QuietServer(config).run()

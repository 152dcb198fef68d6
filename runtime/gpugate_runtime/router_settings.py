"""Settings of the router, read from the environment and the rendered env file."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from gpugate_runtime.contract import defaults
from gpugate_runtime.contract.host import ROUTE_TABLE, VM_LAYOUT, Ports

_DEFAULT_PORTS = Ports(defaults.INTERNAL_PORT_BASE)


class RouterSettings(BaseSettings):
    """The router between Caddy and the local tiers / external providers. The renderer writes each field
    as GPUGATE_ROUTER_<FIELD>."""

    model_config = SettingsConfigDict(env_prefix="GPUGATE_ROUTER_", extra="forbid", frozen=True)

    port: int = Field(_DEFAULT_PORTS.router, ge=1024, le=65535, description="loopback port Caddy proxies the public API to")
    table: Path = Field(VM_LAYOUT.bundle_file(ROUTE_TABLE), description="the route table (tiers, providers, models)")
    log_file: Path = Field(VM_LAYOUT.route_log, description="one RouteRecord JSON line per request (metadata only)")
    vllm_key_file: Path = Field(VM_LAYOUT.vllm_key_file, description="the internal key the local tiers take")
    log_level: Literal["debug", "info", "warning", "error"] = "info"

"""Settings of the health prober and the local alert sink, read from the environment and the rendered env file."""

from __future__ import annotations

from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import AnyHttpUrl, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from gpugate_runtime.contract import defaults
from gpugate_runtime.contract.host import LOOPBACK, VM_LAYOUT, Ports

# A rendered env file always names the ports; the defaults only serve a bare `prober status` on a default host.
_DEFAULT_PORTS = Ports(defaults.INTERNAL_PORT_BASE)


class ProberSettings(BaseSettings):
    """The synthetic checks of one gateway host. The renderer writes each field as GPUGATE_PROBER_<FIELD>."""

    model_config = SettingsConfigDict(env_prefix="GPUGATE_PROBER_", extra="forbid", frozen=True)

    port: int = Field(_DEFAULT_PORTS.prober, ge=1024, le=65535, description="loopback port of /metrics and /status")
    public_url: AnyHttpUrl = Field(description="the gateway's public https URL, as clients use it")
    model: str = Field(min_length=1, description="the served model name /v1/models must list")
    vllm_health_url: AnyHttpUrl = Field(
        AnyHttpUrl(f"http://{LOOPBACK}:{_DEFAULT_PORTS.vllm}/health"), description="vLLM's /health on loopback"
    )
    key_file: Path = Field(VM_LAYOUT.prober_key_file, description="the prober's own client key (named `prober`)")
    ca_file: Path | None = Field(None, description="CA bundle the public certificate must chain to; none: system trust")
    tls_host: str | None = Field(
        None, description="host name the certificate must carry (SNI and Host); default: the public URL's host"
    )
    interval_seconds: float = Field(15, gt=0, le=3600, description="pause between two runs of every check")
    timeout_seconds: float = Field(10, gt=0, le=300, description="longest any one check may take")
    expect_gpu: bool = Field(False, description="a host without a visible NVIDIA GPU fails the gpu check")
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("ca_file", "tls_host", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        # An env file line `GPUGATE_PROBER_CA_FILE=` means "not set" (system trust), not the path "".
        return None if value == "" else value

    @field_validator("public_url")
    @classmethod
    def _https_only(cls, url: AnyHttpUrl) -> AnyHttpUrl:
        if url.scheme != "https":
            raise ValueError("the prober watches the TLS endpoint clients use: public_url must be https://")
        return url

    @property
    def public_base(self) -> str:
        """The public URL without a trailing slash, ready to append `/v1/...`."""
        return str(self.public_url).rstrip("/")

    @property
    def public_address(self) -> tuple[str, int]:
        parts = urlsplit(str(self.public_url))
        return parts.hostname or "", parts.port or 443

    @property
    def server_name(self) -> str:
        """The name the certificate is checked against and sent as SNI."""
        return self.tls_host or self.public_address[0]


class AlertSinkSettings(BaseSettings):
    """The local alert channel. The renderer writes each field as GPUGATE_ALERTSINK_<FIELD>."""

    model_config = SettingsConfigDict(env_prefix="GPUGATE_ALERTSINK_", extra="forbid", frozen=True)

    port: int = Field(_DEFAULT_PORTS.alert_sink, ge=1024, le=65535, description="loopback port Alertmanager posts to")
    path: Path = Field(VM_LAYOUT.alert_log, description="the JSON-lines file each notification is appended to")
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="largest notification accepted (413 above)")
    log_level: Literal["debug", "info", "warning", "error"] = "info"

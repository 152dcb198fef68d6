"""Settings of the host runtime services, read from the environment and the rendered env file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, TypeVar

from dotenv import dotenv_values
from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from gpugate_runtime.contract import defaults
from gpugate_runtime.contract.host import VM_LAYOUT, Ports
from gpugate_runtime.contract.routing import RoutePolicy

# Names the rendered env file (layout.runtime_env); supervisord and the CLI pass it to every service.
ENV_FILE_VAR = "GPUGATE_ENV_FILE"

# Defaults come from the contract, as the spec's do (gpugate.spec.KeyLimits, PortsSpec); a rendered env
# file always sets every field, the defaults serve a runtime command run by hand on a default host.
_DEFAULT_PORTS = Ports(defaults.INTERNAL_PORT_BASE)


class AuthzSettings(BaseSettings):
    """The forward_auth service. Every field is a plain scalar or path: the renderer writes them as
    GPUGATE_AUTHZ_<FIELD>=value into the bundle's env file."""

    model_config = SettingsConfigDict(env_prefix="GPUGATE_AUTHZ_", extra="forbid", frozen=True)

    port: int = Field(_DEFAULT_PORTS.authz, ge=1024, le=65535, description="loopback port (Caddy forward_auth and /metrics)")
    key_store: Path = Field(VM_LAYOUT.key_store, description="the key store JSON written by `keys`")
    log_file: Path = Field(VM_LAYOUT.authz_log, description="one JSON line per decision")
    access_log: Path = Field(
        VM_LAYOUT.access_log,
        description="Caddy's JSON access log, tailed to release concurrency slots; default: access.log next to log_file",
    )
    default_rpm: int = Field(defaults.KEY_RPM, ge=1, le=1_000_000, description="requests per minute of a key without its own")
    default_max_concurrent: int = Field(defaults.KEY_MAX_CONCURRENT, ge=1, le=1_000_000, description="requests in flight of a key without its own")
    max_body_bytes: int = Field(defaults.KEY_MAX_BODY_KIB * 1024, ge=1, description="largest request body (413 above)")
    reload_interval_seconds: float = Field(0.5, gt=0, le=10, description="how often the key store is checked for changes")
    inflight_ttl_seconds: float = Field(
        900, gt=0, description="an in-flight slot whose access-log entry never arrives is released after this"
    )
    access_log_poll_seconds: float = Field(
        0.05, gt=0, le=5,
        description="how often new access-log lines are read while a request holds a slot, and the longest a decision line waits to be written",
    )  # fmt: skip
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # Key scopes and spend (docs/keys.md). Left unset (None), the rendered env file stays as it was.
    route_log: Path | None = Field(
        None, description="the router's route log, followed to account spend; None: route.log next to log_file"
    )
    spend_store: Path | None = Field(None, description="single-host spend store; None: spend.json next to key_store")
    default_route_policy: RoutePolicy | None = Field(
        None, description="route policy of a key without its own default; None: local-first"
    )
    redis_url: str | None = Field(
        None,
        pattern=r"^rediss?://[^@/:]+(:[0-9]+)?(/[0-9]+)?$",
        description=(
            "Redis shared by every authz replica for limits and spend (redis://host:port/db, no credentials); "
            "None: this process alone"
        ),
    )
    redis_password_file: Path | None = Field(None, description="file holding the Redis password (AUTH), when it has one")

    @model_validator(mode="before")
    @classmethod
    def _access_log_next_to_log_file(cls, data: Any) -> Any:
        # Caddy writes access.log into the same log directory the renderer gives authz's own log.
        if isinstance(data, dict) and "access_log" not in data and "log_file" in data:
            data = {**data, "access_log": Path(data["log_file"]).parent / VM_LAYOUT.access_log.name}
        return data

    @property
    def route_log_path(self) -> Path:
        return self.route_log or self.log_file.parent / VM_LAYOUT.route_log.name

    @property
    def spend_store_path(self) -> Path:
        return self.spend_store or self.key_store.parent / VM_LAYOUT.spend_store.name


class KeysSettings(BaseSettings):
    """The `keys` command: where the store is and the defaults of a new key."""

    model_config = SettingsConfigDict(env_prefix="GPUGATE_KEYS_", extra="forbid", frozen=True)

    store: Path = Field(VM_LAYOUT.key_store, description="the key store JSON authz serves")
    expires_days: int = Field(defaults.KEY_EXPIRES_DAYS, ge=1, le=3650, description="validity of a new key, days")
    rotation_overlap_hours: int = Field(defaults.KEY_ROTATION_OVERLAP_HOURS, ge=0, le=720, description="how long a rotated-out key stays valid")


S = TypeVar("S", bound=BaseSettings)


def env_file() -> Path | None:
    """$GPUGATE_ENV_FILE, else the VM's rendered env file when present, else none."""
    named = os.environ.get(ENV_FILE_VAR)
    if named:
        return Path(named)
    return VM_LAYOUT.runtime_env if VM_LAYOUT.runtime_env.is_file() else None


def load_settings(cls: type[S], path: Path | None = None, **overrides: Any) -> S:
    """Build settings from overrides > process environment > env file > defaults.

    The env file is shared by every runtime service, so only the entries with this class's prefix
    are read from it; an unknown name with the prefix is still an error (a typo, not another service's).
    """
    prefix = cls.model_config["env_prefix"]
    values: dict[str, Any] = {}
    if path is not None:
        for name, value in dotenv_values(path).items():
            if name.startswith(prefix) and name not in os.environ and value is not None:
                values[name[len(prefix) :].lower()] = value
    values.update(overrides)
    return cls(**values)

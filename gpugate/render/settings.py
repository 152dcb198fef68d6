"""The runtime services' settings for a host or a pod, written as the env file they read."""

from __future__ import annotations

from pathlib import Path

from gpugate_runtime.contract.host import Ports
from gpugate_runtime.prober_settings import AlertSinkSettings, ProberSettings
from gpugate_runtime.settings import AuthzSettings, KeysSettings
from pydantic_settings import BaseSettings

from gpugate.render.templates import render_template
from gpugate.spec import GatewaySpec

# Seconds an in-flight slot outlives the longest stream: Caddy writes the stream's access-log line
# (which frees the slot) a moment after it ends it.
INFLIGHT_TTL_MARGIN_SECONDS = 30


def public_url(spec: GatewaySpec) -> str:
    port = "" if spec.ports.https == 443 else f":{spec.ports.https}"
    return f"https://{spec.domain}{port}"


def keys_settings(spec: GatewaySpec, key_store: Path) -> KeysSettings:
    """What `keys` commands on a stack's host use: its store, and the stack's expiry and rotation overlap."""
    return KeysSettings(
        store=key_store, expires_days=spec.limits.expires_days, rotation_overlap_hours=spec.limits.rotation_overlap_hours
    )


def runtime_settings(
    spec: GatewaySpec,
    ports: Ports,
    *,
    key_store: Path,
    authz_log: Path | str,
    access_log: Path,
    vllm_health_url: str,
    prober_key_file: Path,
    ca_file: Path | None,
    expect_gpu: bool,
    alert_log: Path,
    route_log: Path | None = None,
    shared_limits: tuple[str, Path] | None = None,
) -> list[BaseSettings]:
    """The runtime services' settings from the spec, built with their own settings models so that a
    name or a value the runtime would refuse cannot be rendered; where files live is the target's.
    No secrets: those are files. `shared_limits` is (redis_url, password file) where replicas share a store;
    `route_log` where it is not next to authz's own log."""
    return [
        AuthzSettings(
            port=ports.authz,
            key_store=key_store,
            log_file=authz_log,
            access_log=access_log,
            default_rpm=spec.limits.rpm,
            default_max_concurrent=spec.limits.max_concurrent,
            max_body_bytes=spec.limits.max_body_kib * 1024,
            # Caddy ends every response by max_stream_seconds, so a slot outlives its stream: a running
            # stream never loses its slot to the TTL, which only frees slots whose log line was lost.
            inflight_ttl_seconds=spec.timeouts.max_stream_seconds + INFLIGHT_TTL_MARGIN_SECONDS,
            route_log=route_log,
            # A key without a default of its own takes the stack's (only where the stack routes: elsewhere the
            # setting stays unset and the bundle as it was).
            default_route_policy=spec.routing.default_policy if spec.routes else None,
            redis_url=shared_limits[0] if shared_limits else None,
            redis_password_file=shared_limits[1] if shared_limits else None,
        ),
        keys_settings(spec, key_store),
        ProberSettings(
            port=ports.prober,
            public_url=public_url(spec),
            model=spec.model.served_name,
            vllm_health_url=vllm_health_url,
            key_file=prober_key_file,
            ca_file=ca_file,
            expect_gpu=expect_gpu,
        ),
        AlertSinkSettings(port=ports.alert_sink, path=alert_log),
    ]


def settings_env(services: list[BaseSettings]) -> dict[str, str]:
    """PREFIX_FIELD=value for every set field of each runtime settings model, as the services read them."""
    env: dict[str, str] = {}
    for settings in services:
        prefix = settings.model_config["env_prefix"]
        for name, value in settings.model_dump(mode="json").items():
            if value is not None:
                env[f"{prefix}{name.upper()}"] = str(value)
    return env


def env_file(settings: dict[str, str], header: str, secrets_dir: Path) -> bytes:
    """The env file every runtime service reads (`runtime/gpugate.env`)."""
    return render_template("common/gpugate.env.j2", header=header, settings=settings, secrets_dir=secrets_dir)

"""The files every host of a stack reads, whatever runs its processes (local supervisord, a VM's systemd)."""

from __future__ import annotations

from pathlib import Path

from gpugate_runtime.contract.host import (
    ALERT_RULES,
    ALERTMANAGER_CONFIG,
    CADDYFILE,
    LAUNCH_SPEC,
    LOOPBACK,
    PROMETHEUS_CONFIG,
    RUNTIME_ENV,
)
from gpugate_runtime.contract.services import CADDY_ROOT_CA, VLLM, HostFacts, Service, by_name, credential_path
from gpugate_runtime.launchspec import LaunchSpec

from gpugate.render.alerts import rule_groups
from gpugate.render.bundle import dump_yaml, header
from gpugate.render.caddy import caddyfile, host_topology, public_bind
from gpugate.render.monitoring import alertmanager_config, prometheus_config
from gpugate.render.routes import launch_file, router_files
from gpugate.render.settings import env_file, runtime_settings, settings_env
from gpugate.stackfile import Stack


def vllm_key_file(facts: HostFacts, table: tuple[Service, ...]) -> Path:
    """Where vLLM's launcher reads the internal key on this host."""
    vllm = by_name(table)[VLLM]
    (key,) = vllm.credentials
    return credential_path(vllm, key, facts)


def prober_ca_file(facts: HostFacts, table: tuple[Service, ...]) -> Path | None:
    """Where the prober finds Caddy's internal root certificate on this host; None when a public CA signs the site."""
    prober = by_name(table)["prober"]
    root = next((c for c in prober.credentials if c.name == CADDY_ROOT_CA), None)
    return credential_path(prober, root, facts) if root else None


def host_files(
    stack: Stack, facts: HostFacts, table: tuple[Service, ...], launch: LaunchSpec, *, expect_gpu: bool
) -> dict[str, bytes]:
    """The files a host's services read: the Caddyfile, vLLM's launch spec, Prometheus and its rules,
    Alertmanager and the runtime env file. Each service finds its credentials where the table says
    this host hands them over."""
    spec, layout, ports = stack.spec, facts.layout, facts.ports
    named = by_name(table)
    prober = named["prober"]
    prober_key = next(c for c in prober.credentials if c.name != CADDY_ROOT_CA)
    alertmanager = named["alertmanager"]
    alert_credential = next(
        (credential_path(alertmanager, c, facts) for c in alertmanager.credentials if c.name == "alert_credential"), None
    )
    settings = settings_env(
        runtime_settings(
            spec,
            ports,
            key_store=layout.key_store,
            authz_log=layout.authz_log,
            access_log=layout.access_log,
            vllm_health_url=f"http://{LOOPBACK}:{ports.vllm}/health",
            prober_key_file=credential_path(prober, prober_key, facts),
            ca_file=prober_ca_file(facts, table),
            expect_gpu=expect_gpu,
            alert_log=layout.alert_log,
        )
    )
    text = header(stack)
    upstream, metrics = host_topology(table, ports)
    routed, router = {}, None
    if facts.router:
        routed, router_settings, router = router_files(spec, facts, table, launch)
        settings |= settings_env([router_settings])
    files = {
        CADDYFILE: caddyfile(spec, ports, layout, text, upstream, metrics, bind=public_bind(named["caddy"]), router=router),
        LAUNCH_SPEC: launch_file(launch),
        **routed,
        PROMETHEUS_CONFIG: dump_yaml(prometheus_config(spec, ports, layout, table), text),
        ALERT_RULES: dump_yaml(rule_groups(spec), text),
        ALERTMANAGER_CONFIG: dump_yaml(alertmanager_config(spec, ports, layout, alert_credential), text),
        RUNTIME_ENV: env_file(settings, text, layout.secrets),
    }
    return files

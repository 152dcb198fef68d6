"""Where things live on a gateway host: paths and loopback ports, one source of truth.

The operator side renders configs with these values and the runtime services read
the same ones, so a path or a port is never written twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

LOOPBACK = "127.0.0.1"

# Offsets from a stack's internal port base; every internal service listens on loopback only.
PORT_OFFSETS: dict[str, int] = {
    "vllm": 0,
    "authz": 1,
    "prober": 2,
    "prometheus": 3,
    "alertmanager": 4,
    "caddy_metrics": 5,
    "alert_sink": 6,
    "router": 7,
}

# A stack's local tiers beyond its first model: tier i's vLLM listens on base + TIER_PORT_OFFSET + i.
TIER_PORT_OFFSET = 10
MAX_TIERS = 8

SERVICES = ("vllm", "authz", "caddy", "prober", "prometheus", "alertmanager")

# Files of a bundle (paths under the host's etc/gpugate): the renderer writes them, the services read them.
CADDYFILE = "caddy/Caddyfile"
LAUNCH_SPEC = "vllm/launch.json"


def tier_launch_spec(tier: str) -> str:
    """The launch spec of an extra tier's vLLM, next to the first model's."""
    return f"vllm/launch-{tier}.json"


PROMETHEUS_CONFIG = "prometheus/prometheus.yml"
ALERT_RULES = "prometheus/rules/gpugate.rules.yml"
ALERTMANAGER_CONFIG = "alertmanager/alertmanager.yml"
RUNTIME_ENV = "runtime/gpugate.env"
# The router's table (stacks that route: several tiers or external providers).
ROUTE_TABLE = "router/routes.json"

# Environment variable names shared by the Caddyfile, the launcher and the service definitions.
ENV_VLLM_KEY = "GPUGATE_VLLM_API_KEY"
KEY_ID_HEADER = "X-Gpugate-Key-Id"
REQUEST_ID_HEADER = "X-Request-Id"

# Go runtime settings for Caddy on every target, measured with bench/gateway_overhead.py
# (docs/performance.md). One P (GOMAXPROCS=1): Go's HTTP client and server hand each proxied
# request between goroutines, and with more Ps that hand-off wakes another OS thread on another
# CPU; with one P it is a goroutine switch. One P serves thousands of requests a second, far more
# than the GPUs behind it. GOGC=400 lets the (small) heap grow 4x between collections, a quarter
# less CPU per request; GOMEMLIMIT makes the collector work harder rather than pass 384 MiB.
CADDY_GO_ENV: dict[str, str] = {"GOMAXPROCS": "1", "GOGC": "400", "GOMEMLIMIT": "384MiB"}


def provider_key_name(provider: str) -> str:
    """An external provider's key as a host secret: its file name, its systemd credential and its boot secret name."""
    return f"provider_{provider}_api_key"


@dataclass(frozen=True)
class Ports:
    """Loopback ports of the internal services, derived from one base."""

    base: int

    def tier(self, index: int) -> int:
        """The loopback port of the vLLM serving a stack's extra tier number `index` (0-based, tiers sorted by name)."""
        if not 0 <= index < MAX_TIERS:
            raise ValueError(f"tier index {index}: allowed 0..{MAX_TIERS - 1}")
        return self.base + TIER_PORT_OFFSET + index

    def __getattr__(self, name: str) -> int:
        try:
            return self.base + PORT_OFFSETS[name]
        except KeyError:
            raise AttributeError(name) from None


@dataclass(frozen=True)
class HostLayout:
    """Directory layout under a root: `/` on a VM, a per-stack state dir for `local`."""

    root: Path

    @property
    def etc(self) -> Path:
        """The deployed bundle (read-only configuration)."""
        return self.root / "etc" / "gpugate"

    @property
    def secrets(self) -> Path:
        """Secret files (mode 0600 in a 0700 directory); never part of a bundle."""
        return self.root / "etc" / "gpugate" / "secrets"

    @property
    def state(self) -> Path:
        return self.root / "var" / "lib" / "gpugate"

    @property
    def logs(self) -> Path:
        return self.root / "var" / "log" / "gpugate"

    @property
    def access_log(self) -> Path:
        """Caddy's metadata-only JSON access log; authz follows it to release concurrency slots."""
        return self.logs / "access.log"

    @property
    def authz_log(self) -> Path:
        """authz's decision log, one JSON line per decision."""
        return self.logs / "authz.log"

    @property
    def route_log(self) -> Path:
        """The router's metadata-only log, one `contract.routing.RouteRecord` JSON line per request;
        authz follows it to account each key family's token and cost spend."""
        return self.logs / "route.log"

    @property
    def spend_store(self) -> Path:
        """Each key family's spend per budget period (single-host stores; replicas share Redis instead)."""
        return self.state / "spend.json"

    @property
    def key_store(self) -> Path:
        return self.state / "keys.json"

    @property
    def vllm_key_file(self) -> Path:
        return self.secrets / "vllm_api_key"

    @property
    def prober_key_file(self) -> Path:
        return self.secrets / "prober_api_key"

    def provider_key_file(self, provider: str) -> Path:
        """An external provider's API key (`gpugate:providers.<name>.api_key`), read by the router only."""
        return self.secrets / provider_key_name(provider)

    @property
    def alert_secret_file(self) -> Path:
        """The alert channel's credential (Slack URL, PagerDuty routing key or webhook token)."""
        return self.secrets / "alert_credential"

    @property
    def caddy_storage(self) -> Path:
        """Caddy's certificates and keys (ACME account, issued certificates, the internal CA)."""
        return self.state / "caddy"

    @property
    def caddy_admin_socket(self) -> Path:
        """Caddy's admin API, a unix socket only Caddy's user can connect to; `reload-proxy` reloads through it."""
        return self.caddy_storage / "admin.sock"

    @property
    def drain_marker(self) -> Path:
        """While this file exists the proxy answers 503 with Retry-After instead of serving the public API."""
        return self.state / "drain"

    @property
    def local_ca_file(self) -> Path:
        """Root certificate of Caddy's internal CA (`tls internal`), which clients of a local stack trust."""
        return self.caddy_storage / "pki" / "authorities" / "local" / "root.crt"

    @property
    def runtime_env(self) -> Path:
        return self.etc / RUNTIME_ENV

    @property
    def alert_log(self) -> Path:
        """Where the local alert sink appends each notification it receives."""
        return self.logs / "alerts.jsonl"

    def bundle_file(self, relpath: str) -> Path:
        return self.etc / relpath


VM_LAYOUT = HostLayout(Path("/"))
# The runtime's virtualenv on VM hosts (user-data creates it; units and runbook tasks run it).
VM_RUNTIME_VENV = Path("/opt/gpugate/venv")
VM_RUNTIME_PYTHON = VM_RUNTIME_VENV / "bin" / "python"
# vLLM's CPU build on a VM without a GPU: its own venv, built from the bundle's hash-locked requirements.
VM_VLLM_VENV = Path("/opt/gpugate/vllm")


"""The Caddyfile: TLS, forward_auth to authz, the public endpoints proxied to vLLM, the metadata-only access log.

One template serves every target; where they differ (how Caddy reaches vLLM, where its metrics site
listens) is a variable, never a rewrite of the rendered text.
"""

from __future__ import annotations

from dataclasses import dataclass

from gpugate_runtime.accesslog import ACCESS_LOG_IDS_FIELD
from gpugate_runtime.authz import BODY_LENGTH_HEADER
from gpugate_runtime.contract.host import ENV_VLLM_KEY, KEY_ID_HEADER, LOOPBACK, REQUEST_ID_HEADER, HostLayout, Ports
from gpugate_runtime.contract.routing import KEY_SCOPE_HEADER
from gpugate_runtime.contract.services import Service, by_name

from gpugate.render.templates import render_template
from gpugate.spec import GatewaySpec

# The request target as it arrives (path, then an optional query), in the one form the gateway
# forwards: "/" or lower-case segments of [a-z0-9_-] joined by single slashes. Every public path
# (/healthz, /v1/models, /v1/chat/completions, /v1/completions) is in this form; a dot segment,
# a percent-escape, a doubled or trailing slash, upper case or a trailing dot is not, and gets 400
# before authz. An RE2 pattern (Caddy's `vars_regexp`); no spaces or braces, so it is one Caddyfile token.
CANONICAL_URI = r"^(/|(/[a-z0-9_-]+)+)(\?.*)?$"


@dataclass(frozen=True)
class PublicRoute:
    """Public endpoints proxied alike: a Caddy matcher name, their paths and how long vLLM may take
    to send response headers on them."""

    name: str
    paths: tuple[str, ...]
    response_header_seconds: int


def public_routes(spec: GatewaySpec) -> tuple[PublicRoute, ...]:
    """The listing answers at once; a completion not streamed sends its headers only when done."""
    return (
        PublicRoute("models", ("/v1/models",), spec.timeouts.upstream_header_seconds),
        PublicRoute("generate", ("/v1/chat/completions", "/v1/completions"), spec.timeouts.max_stream_seconds),
    )


@dataclass(frozen=True)
class Upstream:
    """vLLM as Caddy reaches it: one address, or (`dynamic`) every ready pod behind a DNS name,
    re-resolved every `refresh` so a new replica takes traffic at once, and retried for
    `try_duration` while a leaving one drains."""

    host: str
    port: int
    dynamic: bool = False
    refresh: str = "5s"
    try_duration: str = "5s"


@dataclass(frozen=True)
class MetricsSite:
    """Where Caddy serves its own /metrics: `site` and an optional `bind` address; `routes` are extra
    /path/metrics -> upstream handlers (a pod exposes authz's and the prober's loopback metrics there)."""

    site: str
    bind: str | None = None
    routes: tuple[tuple[str, str], ...] = ()


def metrics_site(caddy: Service, routes: tuple[tuple[str, str], ...] = ()) -> MetricsSite:
    """Caddy's metrics site where the service table says its `metrics` port listens."""
    listen = next(item for item in caddy.listens if item.name == "metrics")
    return MetricsSite(f"http://{listen.address}:{listen.port}", bind=listen.address or None, routes=routes)


def public_bind(caddy: Service) -> str | None:
    """The address Caddy's public sites bind, from the service table's `https` listen; None: every interface."""
    listen = next(item for item in caddy.listens if item.name == "https")
    return listen.address or None


def host_topology(table: tuple[Service, ...], ports: Ports) -> tuple[Upstream, MetricsSite]:
    """A host (local or VM): vLLM on loopback, Caddy's metrics where the table puts them."""
    return Upstream(LOOPBACK, ports.vllm), metrics_site(by_name(table)["caddy"])


def caddyfile(
    spec: GatewaySpec,
    ports: Ports,
    layout: HostLayout,
    header: str,
    upstream: Upstream,
    metrics: MetricsSite,
    bind: str | None = None,
    tls_files: tuple[str, str] | None = None,
    router: Upstream | None = None,
) -> bytes:
    """The Caddyfile; `bind`: the one address its public sites listen on (None: every interface); `tls_files`:
    (certificate, key) files the public site serves, issued by someone else (cert-manager), instead of ACME in Caddy;
    `router`: where the public API goes on a stack that routes (else straight to vLLM)."""
    return render_template(
        "common/Caddyfile.j2",
        spec=spec,
        layout=layout,
        header=header,
        upstream=upstream,
        metrics=metrics,
        public_bind=bind,
        tls_files=tls_files,
        authz_address=f"{LOOPBACK}:{ports.authz}",
        request_id_header=REQUEST_ID_HEADER,
        key_id_header=KEY_ID_HEADER,
        env_vllm_key=ENV_VLLM_KEY,
        body_length_header=BODY_LENGTH_HEADER,
        access_log_ids_field=ACCESS_LOG_IDS_FIELD,
        canonical_uri=CANONICAL_URI,
        public_routes=public_routes(spec),
        router=router,
        key_scope_header=KEY_SCOPE_HEADER,
    )

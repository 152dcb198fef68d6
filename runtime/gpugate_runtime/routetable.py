"""The router's table (`router/routes.json` in a bundle) and its choice of route for one request.

The table says which public models exist, which local tier and which external provider serve each,
and what a provider's tokens cost; `Routes` adds what the router learns while it runs (a tier held
down after a failed connection, the time to first token measured per route) and turns a policy into
the ordered routes to try.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from gpugate_runtime.contract.routing import RoutePolicy

# Weight of the newest time-to-first-token sample in a route's moving average.
EWMA_ALPHA = 0.2


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TierRoute(_Strict):
    """A local vLLM process: its loopback base URL and the model name it serves."""

    url: str = Field(description="base URL, e.g. http://127.0.0.1:8000 (the router adds /v1/...)")
    served_name: str


class ProviderRoute(_Strict):
    """An external OpenAI-compatible API. Its key is a file in the host's secrets dir, never in the table."""

    base_url: str = Field(description="the API's base URL including /v1, e.g. https://api.openai.com/v1")
    key_file: Path
    models: dict[str, str] = Field(description="public model id -> the provider's model name")
    input_usd_per_mtok: float = Field(ge=0)
    output_usd_per_mtok: float = Field(ge=0)

    def cost_usd(self, input_tokens: int, output_tokens: int) -> float:
        return (input_tokens * self.input_usd_per_mtok + output_tokens * self.output_usd_per_mtok) / 1_000_000


class ModelRoute(_Strict):
    """Where one public model can be served: a local tier, a provider, or both."""

    tier: str | None = None
    provider: str | None = None


class RouteTable(_Strict):
    default_policy: RoutePolicy = RoutePolicy.LOCAL_FIRST
    tiers: dict[str, TierRoute]
    providers: dict[str, ProviderRoute] = {}
    models: dict[str, ModelRoute]
    first_byte_timeout_seconds: float = Field(30, gt=0, description="no response headers by then: try the next route")
    connect_timeout_seconds: float = Field(5, gt=0)
    hold_down_seconds: float = Field(5, gt=0, description="a tier that refused a connection is skipped this long")
    probe_interval_seconds: float = Field(1, gt=0, description="how often a held-down tier's /health is asked")
    retry_after_seconds: int = Field(5, ge=1, description="Retry-After of a 503 when no allowed route can serve")

    @classmethod
    def load(cls, path: Path) -> RouteTable:
        return cls.model_validate_json(path.read_bytes())


@dataclass(frozen=True, slots=True)
class Route:
    """One place a request can go: `tier:<name>` or `provider:<name>`."""

    kind: str  # "tier" or "provider"
    name: str
    upstream_model: str

    @property
    def label(self) -> str:
        return f"{self.kind}:{self.name}"

    @property
    def local(self) -> bool:
        return self.kind == "tier"


@dataclass
class Routes:
    """The table plus what the router has measured: tiers held down, each route's TTFT average (seconds)."""

    table: RouteTable
    down_until: dict[str, float] = field(default_factory=dict)
    ttft: dict[str, float] = field(default_factory=dict)

    def tier_up(self, name: str, now: float | None = None) -> bool:
        return (now if now is not None else time.monotonic()) >= self.down_until.get(name, 0.0)

    def hold_down(self, name: str) -> None:
        self.down_until[name] = time.monotonic() + self.table.hold_down_seconds

    def release(self, name: str) -> None:
        self.down_until.pop(name, None)

    def observe_ttft(self, route: Route, seconds: float) -> None:
        old = self.ttft.get(route.label)
        self.ttft[route.label] = seconds if old is None else (1 - EWMA_ALPHA) * old + EWMA_ALPHA * seconds

    def candidates(self, model: str) -> tuple[Route | None, Route | None]:
        """The model's local route and provider route (either may be absent)."""
        entry = self.table.models[model]
        local = None
        if entry.tier is not None:
            local = Route("tier", entry.tier, self.table.tiers[entry.tier].served_name)
        remote = None
        if entry.provider is not None:
            remote = Route("provider", entry.provider, self.table.providers[entry.provider].models[model])
        return local, remote

    def plan(self, model: str, policy: RoutePolicy, latency_objective_ms: int | None = None) -> list[Route]:
        """The routes to try in order. A held-down tier is left out (its provider goes first); an empty
        plan means nothing the policy allows can serve now."""
        return [r for r in self.order(model, policy, latency_objective_ms) if not (r.local and not self.tier_up(r.name))]

    def order(self, model: str, policy: RoutePolicy, latency_objective_ms: int | None = None) -> list[Route]:
        """The policy's order of the model's routes, held-down tiers included: its first is the first choice."""
        local, remote = self.candidates(model)
        if policy is RoutePolicy.LOCAL_ONLY:
            order = [local]
        elif policy is RoutePolicy.CLOUD_FIRST:
            order = [remote, local]
        elif policy is RoutePolicy.COST_OPTIMIZED:
            order = self._cheapest_first(local, remote, latency_objective_ms)
        else:
            order = [local, remote]
        return [route for route in order if route is not None]

    def _cheapest_first(self, local: Route | None, remote: Route | None, objective_ms: int | None) -> list[Route | None]:
        # A local tier costs no tokens: it goes first unless its measured TTFT misses the key's objective
        # while the provider's meets it (an unmeasured route is taken to meet it).
        if local is None or remote is None or objective_ms is None:
            return [local, remote]
        limit = objective_ms / 1000
        local_ok = self.ttft.get(local.label, 0.0) <= limit
        remote_ok = self.ttft.get(remote.label, 0.0) <= limit
        return [remote, local] if (not local_ok and remote_ok) else [local, remote]

    def provider(self, route: Route) -> ProviderRoute:
        return self.table.providers[route.name]

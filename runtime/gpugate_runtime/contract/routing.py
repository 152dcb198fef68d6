"""What the key service and the router tell each other: route policies, a key's scope, one usage record.

authz decides *who* may ask and within which scope (models, route policies, budgets); the router
decides *where* a request goes (a local tier or an external provider) and reports what it cost.
They meet only here: authz hands the scope over in a request header that Caddy copies from its
forward_auth answer (a client's own copy is dropped at the proxy), and the router appends one
`RouteRecord` per request to the route log, which authz follows to account each key's spend.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import Any

# Set by authz on an allowed request (JSON of `KeyScope`); dropped from clients at the proxy.
KEY_SCOPE_HEADER = "X-Gpugate-Key-Scope"
# Sent by a client to ask for a route policy other than its key's default (honoured only within the scope).
ROUTE_POLICY_HEADER = "X-Gpugate-Route-Policy"
# On every routed response: the tier or provider that answered, e.g. `tier:general` or `provider:openai`.
ROUTE_HEADER = "X-Gpugate-Route"


class RoutePolicy(StrEnum):
    """Where a request may go, in which order."""

    LOCAL_FIRST = "local-first"  # the local tier; on failure before the first byte, its mapped provider
    CLOUD_FIRST = "cloud-first"  # the mapped provider; on failure before the first byte, the local tier
    COST_OPTIMIZED = "cost-optimized"  # the cheapest route meeting the key's latency objective, measured
    LOCAL_ONLY = "local-only"  # privacy-pinned: never leaves the host or cluster; 503 + Retry-After when local cannot serve


@dataclass(frozen=True)
class KeyScope:
    """What one key may do. `None` means unrestricted (all models / all policies)."""

    family: str  # the rotation lineage: a rotated key keeps its predecessor's family, and so its spend
    default_policy: RoutePolicy = RoutePolicy.LOCAL_FIRST
    policies: tuple[RoutePolicy, ...] | None = None
    models: tuple[str, ...] | None = None
    latency_objective_ms: int | None = None

    def allows_policy(self, policy: RoutePolicy) -> bool:
        return policy == self.default_policy or self.policies is None or policy in self.policies

    def allows_model(self, model: str) -> bool:
        return self.models is None or model in self.models

    def to_header(self) -> str:
        data: dict[str, Any] = {"family": self.family, "default_policy": str(self.default_policy)}
        if self.policies is not None:
            data["policies"] = [str(p) for p in self.policies]
        if self.models is not None:
            data["models"] = list(self.models)
        if self.latency_objective_ms is not None:
            data["latency_objective_ms"] = self.latency_objective_ms
        return json.dumps(data, separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_header(cls, value: str) -> KeyScope:
        """Parse authz's header; raises ValueError on anything malformed (the router then refuses with 500)."""
        data = json.loads(value)
        if not isinstance(data, dict) or not isinstance(data.get("family"), str):
            raise ValueError(f"{KEY_SCOPE_HEADER} is not a key scope: {value[:80]!r}")
        policies = data.get("policies")
        models = data.get("models")
        objective = data.get("latency_objective_ms")
        return cls(
            family=data["family"],
            default_policy=RoutePolicy(data.get("default_policy", RoutePolicy.LOCAL_FIRST)),
            policies=None if policies is None else tuple(RoutePolicy(p) for p in policies),
            models=None if models is None else tuple(str(m) for m in models),
            latency_objective_ms=None if objective is None else int(objective),
        )


@dataclass(frozen=True)
class RouteRecord:
    """One line of the route log: metadata only, never a prompt or a completion."""

    ts: float  # unix time the response ended
    request_id: str
    key_id: str
    family: str
    model: str  # the public model id the client asked for
    policy: str
    route: str  # what answered: `tier:<name>`, `provider:<name>` or `none` (refused / unavailable)
    status: int
    fallback: bool = False  # answered by a route other than the policy's first choice
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    latency_ms: float = 0.0
    ttft_ms: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        # The fields by name, not dataclasses.asdict: its deep copy was a tenth of the router's time per request.
        return json.dumps({name: getattr(self, name) for name in _RECORD_FIELDS}, separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, line: str) -> RouteRecord:
        return cls(**json.loads(line))


_RECORD_FIELDS = tuple(f.name for f in fields(RouteRecord))

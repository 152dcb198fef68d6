"""Each tier's and provider's state, green / yellow / red, from one scrape of the router's /metrics.

red: a tier the router holds down (it refused a connection; its /health is probed), or a provider whose attempts
have failed since its last success, within the last RECENT_S. yellow: serving, but a request fell back from it or
an attempt on it failed within RECENT_S, or its time to first token averages over SLOW_TTFT_S. green: serving (or
not asked yet). `gpugate status` and the runbook task `status` show these; the alerts keep their own rules.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import StrEnum

from prometheus_client.parser import text_string_to_metric_families

from gpugate_runtime.contract import metrics as m

# How far back a failure or a fallback colours a route.
RECENT_S = 300.0
# The time to first token each tier is held to (issue 17: each tier under 2 s).
SLOW_TTFT_S = 2.0


class State(StrEnum):
    GREEN = "green"
    YELLOW = "yellow"
    RED = "red"


@dataclass(frozen=True)
class RouteHealth:
    route: str  # tier:<name> or provider:<name>
    state: State
    detail: str

    @property
    def kind(self) -> str:
        return self.route.split(":", 1)[0]

    @property
    def name(self) -> str:
        return self.route.split(":", 1)[1]

    def to_dict(self) -> dict[str, str]:
        return {**asdict(self), "state": str(self.state), "kind": self.kind, "name": self.name}


def _samples(text: str) -> dict[str, dict[str, float]]:
    """metric name -> route label -> value, for the router's per-route gauges (tier_up by `tier:<name>`)."""
    wanted = {m.ROUTE_TIER_UP, m.ROUTE_LAST_SUCCESS, m.ROUTE_LAST_FAILURE, m.ROUTE_LAST_FALLBACK, m.ROUTE_TTFT_AVERAGE}
    out: dict[str, dict[str, float]] = {name: {} for name in wanted}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name not in wanted:
                continue
            route = f"tier:{sample.labels['tier']}" if sample.name == m.ROUTE_TIER_UP else sample.labels.get("route", "")
            out[sample.name][route] = sample.value
    return out


def _ago(now: float, when: float) -> str:
    return f"{max(0.0, now - when):.0f} s ago"


def route_health(metrics_text: str, now: float) -> list[RouteHealth]:
    """Every route the router reports, tiers first, each with its state and why (`now`: Unix time)."""
    s = _samples(metrics_text)
    routes = set(s[m.ROUTE_LAST_SUCCESS]) | set(s[m.ROUTE_TIER_UP])
    out = []
    for route in sorted(routes, key=lambda r: (not r.startswith("tier:"), r)):
        success = s[m.ROUTE_LAST_SUCCESS].get(route, 0.0)
        failure = s[m.ROUTE_LAST_FAILURE].get(route, 0.0)
        fallback = s[m.ROUTE_LAST_FALLBACK].get(route, 0.0)
        ttft = s[m.ROUTE_TTFT_AVERAGE].get(route)
        recent_failure = failure > 0 and now - failure <= RECENT_S
        if s[m.ROUTE_TIER_UP].get(route) == 0:
            health = RouteHealth(route, State.RED, f"held down: it refused a connection ({_ago(now, failure)}); its /health is probed")
        elif not route.startswith("tier:") and recent_failure and failure > success:
            seen = f"last success {_ago(now, success)}" if success else "no success yet"
            health = RouteHealth(route, State.RED, f"failing: last attempt failed {_ago(now, failure)}, {seen}")
        elif fallback > 0 and now - fallback <= RECENT_S:
            health = RouteHealth(route, State.YELLOW, f"a request fell back from it {_ago(now, fallback)}")
        elif recent_failure:
            health = RouteHealth(route, State.YELLOW, f"an attempt failed {_ago(now, failure)}")
        elif ttft is not None and ttft > SLOW_TTFT_S:
            health = RouteHealth(route, State.YELLOW, f"time to first token averages {ttft:.2f} s (over {SLOW_TTFT_S:g} s)")
        else:
            health = RouteHealth(route, State.GREEN, f"serving, last answer {_ago(now, success)}" if success else "serving, no request yet")
        out.append(health)
    return out

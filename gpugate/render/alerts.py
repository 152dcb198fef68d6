"""The alert rules, built from a stack's SLO thresholds; one source for VMs, local and Kubernetes."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from gpugate_runtime.authz import Outcome
from gpugate_runtime.contract import metrics as m

from gpugate.spec import GatewaySpec, Target

GROUP = "gpugate"
SEVERITIES = ("page", "ticket")

# Multi-window, multi-burn-rate alerts on the 5xx error budget (Google SRE workbook, ch. 5): a
# burn rate of 14.4 spends 2% of a 30-day budget in an hour, 6 spends 5% in six hours, 3 spends
# 10% in a day. Each long window is paired with a short one, so the alert stops soon after the
# errors do, and a short blip, which barely moves the long window, never fires.
PAGE_BURNS = ((14.4, "1h", "5m"), (6.0, "6h", "30m"))
TICKET_BURNS = ((3.0, "1d", "2h"),)

# A key has been rejected by authz for one of these: someone is sending keys that are not (or no
# longer) valid: a leaked and revoked key in use, or a scan. A request with no key at all is not
# counted: crawlers and health checkers send those, and they say nothing about our keys.
REJECTED_KEY_OUTCOMES = (Outcome.MALFORMED_KEY, Outcome.UNKNOWN_KEY, Outcome.EXPIRED_KEY, Outcome.REVOKED_KEY)

# A key family has spent this share of a budget of its period (docs/keys.md): time to raise the
# budget or warn its owner before its requests get 429 until the period resets.
BUDGET_NEARLY_SPENT_RATIO = 0.9

# vLLM preempts a running request when the KV cache runs out and recomputes it later; a few are
# normal under bursts, a steady stream means the cache is too small for the load.
PREEMPTIONS_PER_MINUTE = 1

# Caddy's internal CA (`tls internal`, the local target) issues 12-hour certificates and renews
# them with a third of their life left; a certificate with under 2 hours left means renewal failed.
INTERNAL_CA_ALERT_SECONDS = 2 * 3600


@dataclass(frozen=True)
class Alert:
    """One alerting rule; `value` is the annotation that shows the live value on its own."""

    name: str
    expr: str
    for_: str
    severity: Literal["page", "ticket"]
    summary: str
    description: str
    value: str

    @property
    def slug(self) -> str:
        """Runbook file name: GatewayHighErrorBudgetBurn -> gateway-high-error-budget-burn."""
        return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "-", self.name).lower()


def error_ratio(window: str) -> str:
    """Share of the gateway's requests answered 5xx over `window`, as Caddy 2.6 counts them.

    Caddy records a response's status in the duration histogram, except when a handler fails (vLLM
    unreachable: 502): that request is counted only in the errors counter. Both series appear
    with their first sample, so a missing one counts as zero rather than silencing the rule.
    """
    errors = (
        f"(sum(rate({m.CADDY_REQUEST_ERRORS}[{window}])) or vector(0))"
        f' + (sum(rate({m.CADDY_REQUEST_DURATION}_count{{code=~"5.."}}[{window}])) or vector(0))'
    )
    return f"({errors}) / sum(rate({m.CADDY_REQUESTS}[{window}]))"


def _burn(burns: tuple[tuple[float, str, str], ...], budget: float) -> str:
    return " or ".join(
        f"({error_ratio(long)} > {rate * budget:g} and {error_ratio(short)} > {rate * budget:g})"
        for rate, long, short in burns
    )


def _percent(ratio: float) -> str:
    return f"{ratio * 100:g}%"


def _p95(histogram: str) -> str:
    return f"histogram_quantile(0.95, sum by (le) (rate({histogram}_bucket[5m])))"


def _down(name: str, job: str, what: str, impact: str, severity: Literal["page", "ticket"], for_: str) -> Alert:
    return Alert(
        name,
        f'up{{job="{job}"}} == 0',
        for_,
        severity,
        f"{what} is not answering",
        f"Prometheus has failed to scrape {job} on {{{{ $labels.instance }}}} for {for_}: {impact}",
        "up = {{ $value }}",
    )


def _gpu_memory_ratio(spec: GatewaySpec) -> str:
    """Used share of each GPU's memory. On a VM the prober reads it through NVML, with nothing more
    to deploy; on Kubernetes the prober runs with the proxy, away from the GPU nodes, and the DCGM
    exporter that the GPU nodes run reports it instead."""
    if spec.target is Target.KUBERNETES:
        return f"{m.DCGM_FB_USED} / ({m.DCGM_FB_USED} + {m.DCGM_FB_FREE})"
    return f"{m.GPU_MEMORY_USED} / {m.GPU_MEMORY_TOTAL}"


def _tls_rule(spec: GatewaySpec) -> tuple[str, str, str]:
    """(threshold seconds, for, words): days for a public CA, hours for Caddy's internal one."""
    if spec.tls.mode == "internal":
        return str(INTERNAL_CA_ALERT_SECONDS), "10m", f"{INTERNAL_CA_ALERT_SECONDS // 3600} hours (internal CA: 12-hour certificates)"
    return str(spec.slo.cert_expiry_days * 86400), "1h", f"{spec.slo.cert_expiry_days} days"


# Share of routed requests answered by another route than their policy's first choice, above which the
# local tiers are failing more than a blip (a restart) explains.
FALLBACK_RATIO = 0.1


def routing_alerts(spec: GatewaySpec) -> list[Alert]:
    """The router's alerts (stacks with tiers or providers): a tier down, a provider failing, many fallbacks."""
    failed = f'sum by (route) (rate({m.ROUTE_ERRORS}{{route=~"provider:.+"}}[5m]))'
    served = f'sum by (route) (rate({m.ROUTE_REQUESTS}{{route=~"provider:.+",outcome="ok"}}[5m]))'
    return [
        Alert(
            "RouteTierDown",
            f"{m.ROUTE_TIER_UP} == 0",
            "1m",
            "page",
            "A local model tier is not serving",
            "The router has held tier {{ $labels.tier }} down for 1m (refused connections, failed health probes): "
            "its local-first traffic goes to the provider, its local-only keys get 503.",
            "tier up = {{ $value }}",
        ),
        Alert(
            "RouteProviderDown",
            f"{failed} > 0 unless {served} > 0",
            "5m",
            "ticket",
            "An external provider fails every request sent to it",
            "{{ $labels.route }} failed {{ $value | humanize }} requests/s and answered none for 5m: "
            "fallbacks to it fail, and its cloud-first keys fall back to the local tier.",
            "{{ $value | humanize }} failures/s",
        ),
        Alert(
            "RouteFallbackRateHigh",
            f"sum(rate({m.ROUTE_FALLBACKS}[10m])) / sum(rate({m.ROUTE_REQUESTS}[10m])) > {FALLBACK_RATIO:g}",
            "10m",
            "ticket",
            f"More than {_percent(FALLBACK_RATIO)} of routed requests fall back",
            "{{ $value | humanizePercentage }} of routed requests were answered by another route than their "
            "policy's first choice over 10m: the first choice is failing, and fallbacks to a provider cost money.",
            "{{ $value | humanizePercentage }}",
        ),
    ]


def alerts(spec: GatewaySpec) -> list[Alert]:
    return _alerts(spec) + (routing_alerts(spec) if spec.routes else [])


def _alerts(spec: GatewaySpec) -> list[Alert]:
    slo = spec.slo
    budget = round(1 - slo.availability, 6)
    tls_seconds, tls_for, tls_words = _tls_rule(spec)
    rejected = "|".join(o.value for o in REJECTED_KEY_OUTCOMES)
    return [
        _down("GatewayDown", "caddy", "The TLS proxy (Caddy)", "clients cannot reach the gateway.", "page", "1m"),
        Alert(
            "VllmDown",
            'up{job="vllm"} == 0',
            "1m",
            "page",
            "vLLM is not answering",
            "Prometheus has failed to scrape vLLM on {{ $labels.instance }} for 1m: every completion fails.",
            "up = {{ $value }}",
        ),
        _down("AuthzDown", "authz", "The auth service (authz)", "every API request is refused.", "page", "1m"),
        _down("ProberDown", "prober", "The prober", "nothing checks the gateway end to end.", "ticket", "5m"),
        Alert(
            "ProberFailing",
            f"min by (check) ({m.PROBE_SUCCESS}) == 0",
            "3m",
            "page",
            "A synthetic check of the gateway keeps failing",
            "The prober's {{ $labels.check }} check has failed on every run for 3 minutes.",
            "{{ $labels.check }} failing",
        ),
        Alert(
            "GatewayHighErrorBudgetBurn",
            _burn(PAGE_BURNS, budget),
            "2m",
            "page",
            f"5xx responses are burning the {_percent(slo.availability)} availability budget fast",
            "{{ $value | humanizePercentage }} of requests failed with a 5xx over the last "
            f"hour or six hours, {PAGE_BURNS[0][0]:g}x or {PAGE_BURNS[1][0]:g}x the {_percent(budget)} the SLO allows.",
            "{{ $value | humanizePercentage }} 5xx",
        ),
        Alert(
            "GatewaySlowErrorBudgetBurn",
            _burn(TICKET_BURNS, budget),
            "15m",
            "ticket",
            f"5xx responses are steadily eating the {_percent(slo.availability)} availability budget",
            "{{ $value | humanizePercentage }} of requests failed with a 5xx over the last day, "
            f"{TICKET_BURNS[0][0]:g}x the {_percent(budget)} the SLO allows.",
            "{{ $value | humanizePercentage }} 5xx",
        ),
        Alert(
            "GatewayHighLatency",
            f"{_p95(m.VLLM_E2E_LATENCY)} > {slo.latency_p95_seconds:g}",
            "10m",
            "ticket",
            f"p95 request latency is above the {slo.latency_p95_seconds:g}s SLO",
            "vLLM's p95 end-to-end request latency over 5 minutes is {{ $value | humanizeDuration }} "
            f"(SLO: {slo.latency_p95_seconds:g}s).",
            "p95 {{ $value | humanizeDuration }}",
        ),
        Alert(
            "GatewayHighTimeToFirstToken",
            f"{_p95(m.VLLM_TTFT)} > {slo.ttft_p95_seconds:g}",
            "10m",
            "ticket",
            f"p95 time to first token is above the {slo.ttft_p95_seconds:g}s SLO",
            "vLLM's p95 time to first token over 5 minutes is {{ $value | humanizeDuration }} "
            f"(SLO: {slo.ttft_p95_seconds:g}s).",
            "p95 {{ $value | humanizeDuration }}",
        ),
        Alert(
            "VllmQueueBacklog",
            f"max by (instance) ({m.VLLM_WAITING}) > {slo.queue_backlog}",
            "5m",
            "ticket",
            f"More than {slo.queue_backlog} requests are waiting in vLLM",
            "{{ $value }} requests are queued in vLLM on {{ $labels.instance }}: "
            f"more than {slo.queue_backlog} for 5 minutes.",
            "{{ $value }} waiting",
        ),
        Alert(
            "VllmKvCacheSaturated",
            f"max by (instance) ({m.VLLM_KV_USAGE}) > {slo.kv_cache_usage:g}",
            "10m",
            "ticket",
            f"vLLM's KV cache is more than {_percent(slo.kv_cache_usage)} full",
            "KV-cache usage on {{ $labels.instance }} is {{ $value | humanizePercentage }}: "
            "new requests wait and running ones get preempted.",
            "{{ $value | humanizePercentage }} of the KV cache",
        ),
        Alert(
            "VllmRequestsPreempted",
            f"sum by (instance) (rate({m.VLLM_PREEMPTIONS}[5m])) * 60 > {PREEMPTIONS_PER_MINUTE}",
            "15m",
            "ticket",
            "vLLM keeps preempting requests for lack of KV cache",
            "vLLM on {{ $labels.instance }} preempts {{ $value | humanize }} requests per minute: "
            "each is recomputed later, so latency grows.",
            "{{ $value | humanize }}/min",
        ),
        Alert(
            "GpuMemoryPressure",
            f"max by (instance, gpu) ({_gpu_memory_ratio(spec)}) > {slo.gpu_memory_usage:g}",
            "10m",
            "ticket",
            f"GPU memory is more than {_percent(slo.gpu_memory_usage)} used",
            "GPU {{ $labels.gpu }} on {{ $labels.instance }} has {{ $value | humanizePercentage }} of its "
            f"memory in use; vLLM itself takes {_percent(spec.vllm.gpu_memory_utilization)}.",
            "{{ $value | humanizePercentage }} used",
        ),
        Alert(
            "TlsCertificateExpiring",
            f"{m.TLS_CERT_NOT_AFTER} - time() < {tls_seconds}",
            tls_for,
            "ticket",
            f"The gateway's TLS certificate expires in under {tls_words}",
            "The certificate the gateway serves expires in {{ $value | humanizeDuration }}; "
            "Caddy renews it by itself, so renewal is failing.",
            "expires in {{ $value | humanizeDuration }}",
        ),
        Alert(
            "ApiKeyRotationOverdue",
            # The newest key of a name: after a rotation the old key stays valid for the overlap
            # window, but the name is no longer overdue.
            f"min by (name) ({m.KEY_AGE_SECONDS}) / 86400 > {spec.limits.rotation_days}",
            "1h",
            "ticket",
            f"An API key is older than the {spec.limits.rotation_days}-day rotation policy",
            "The newest key named {{ $labels.name }} is {{ $value | humanize }} days old: "
            f"rotate it (policy: every {spec.limits.rotation_days} days).",
            "{{ $value | humanize }} days old",
        ),
        Alert(
            "KeyBudgetNearlySpent",
            # max: with replicas sharing Redis every authz reports the same family's ratio.
            f"max by (family, budget, period) ({m.KEY_BUDGET_USED_RATIO}) > {BUDGET_NEARLY_SPENT_RATIO:g}",
            "5m",
            "ticket",
            f"A key family has spent more than {_percent(BUDGET_NEARLY_SPENT_RATIO)} of a budget",
            "Key family {{ $labels.family }} has spent {{ $value | humanizePercentage }} of its {{ $labels.budget }} "
            "budget this {{ $labels.period }} (UTC); at 100% its requests get 429 until the period resets.",
            "{{ $value | humanizePercentage }} of the {{ $labels.budget }} budget",
        ),
        Alert(
            "RejectedKeySpike",
            f'sum(rate({m.AUTHZ_DECISIONS}{{outcome=~"{rejected}"}}[5m])) * 60'
            f" > {slo.rejected_keys_per_minute:g}",
            "5m",
            "ticket",
            "Many requests carry an invalid, expired or revoked API key",
            "{{ $value | humanize }} requests per minute are refused for a bad key "
            f"(threshold {slo.rejected_keys_per_minute:g}): a leaked key still in use, or a scan.",
            "{{ $value | humanize }}/min",
        ),
    ]


# When a component is down, the symptoms it causes (failed checks, 5xx, latency) should not page too.
OUTAGES = ("GatewayDown", "VllmDown", "AuthzDown")
SYMPTOMS = (
    "ProberFailing",
    "GatewayHighErrorBudgetBurn",
    "GatewaySlowErrorBudgetBurn",
    "GatewayHighLatency",
    "GatewayHighTimeToFirstToken",
)


def inhibit_rules() -> list[dict]:
    """Alertmanager's inhibit rules: an outage silences its own symptoms."""
    return [
        {
            "source_matchers": [f'alertname=~"{"|".join(OUTAGES)}"'],
            "target_matchers": [f'alertname=~"{"|".join(SYMPTOMS)}"'],
        }
    ]


def runbook_url(spec: GatewaySpec, alert: Alert) -> str:
    """`<runbook_base_url>/<slug>.md`: the alert's runbook in runbooks/."""
    return f"{str(spec.alerts.runbook_base_url).rstrip('/')}/{alert.slug}.md"


def rule_groups(spec: GatewaySpec) -> dict:
    """The rules as Prometheus reads them (a rule file), which is also the `spec` of a Kubernetes PrometheusRule."""
    rules = [
        {
            "alert": a.name,
            "expr": a.expr,
            "for": a.for_,
            "labels": {"severity": a.severity},
            "annotations": {
                "summary": a.summary,
                "description": a.description,
                "value": a.value,
                "runbook_url": runbook_url(spec, a),
            },
        }
        for a in alerts(spec)
    ]
    return {"groups": [{"name": GROUP, "rules": rules}]}

"""The alert rules, built from a stack's SLO thresholds; one source for VMs, local and Kubernetes."""

from __future__ import annotations

import re
from dataclasses import dataclass

from gpugate_runtime import metricnames as m

from gpugate.spec import GatewaySpec

GROUP = "gpugate"


@dataclass(frozen=True)
class Alert:
    name: str
    expr: str
    for_: str
    severity: str  # page | ticket
    summary: str
    description: str

    @property
    def slug(self) -> str:
        """Runbook file name: GatewayHighErrorBudgetBurn -> gateway-high-error-budget-burn."""
        return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "-", self.name).lower()


def _burn(window: str, spec: GatewaySpec) -> str:
    return (
        f'(sum(rate({m.CADDY_REQUEST_DURATION}_count{{code=~"5.."}}[{window}]))'
        f" / sum(rate({m.CADDY_REQUEST_DURATION}_count[{window}])))"
    )


def alerts(spec: GatewaySpec) -> list[Alert]:
    slo = spec.slo
    budget = round(1 - slo.availability, 6)
    return [
        Alert(
            "GatewayDown",
            'up{job="caddy"} == 0',
            "1m",
            "page",
            "The TLS proxy is not answering",
            "Prometheus cannot scrape Caddy on {{ $labels.instance }}: clients cannot reach the gateway.",
        ),
        Alert(
            "VllmDown",
            'up{job="vllm"} == 0',
            "1m",
            "page",
            "vLLM is not answering",
            "Prometheus cannot scrape vLLM on {{ $labels.instance }}: every completion fails.",
        ),
        Alert(
            "AuthzDown",
            'up{job="authz"} == 0',
            "1m",
            "page",
            "The auth service is not answering",
            "Prometheus cannot scrape authz on {{ $labels.instance }}: every request is refused.",
        ),
        Alert(
            "ProberFailing",
            f"min by (check) ({m.PROBE_SUCCESS}) == 0",
            "3m",
            "page",
            "A synthetic check keeps failing",
            "The {{ $labels.check }} check has failed for 3 minutes.",
        ),
        Alert(
            "GatewayHighErrorBudgetBurn",
            f"{_burn('5m', spec)} > {14.4 * budget:g} and {_burn('1h', spec)} > {14.4 * budget:g}",
            "2m",
            "page",
            f"5xx error budget burning 14x faster than the {slo.availability:.3%} SLO allows",
            "{{ $value | humanizePercentage }} of requests failed in the last 5 minutes.",
        ),
        Alert(
            "GatewayHighLatency",
            f"histogram_quantile(0.95, sum by (le) (rate({m.VLLM_E2E_LATENCY}_bucket[10m]))) > {slo.latency_p95_seconds:g}",
            "10m",
            "ticket",
            f"p95 request latency above {slo.latency_p95_seconds:g}s",
            "p95 end-to-end latency is {{ $value | humanizeDuration }}.",
        ),
        Alert(
            "VllmQueueBacklog",
            f"max({m.VLLM_WAITING}) > {slo.queue_backlog}",
            "5m",
            "ticket",
            f"More than {slo.queue_backlog} requests waiting in vLLM",
            "{{ $value }} requests are queued: add capacity or lower max_num_seqs pressure.",
        ),
        Alert(
            "VllmKvCacheSaturated",
            f"max({m.VLLM_KV_USAGE}) > {slo.kv_cache_usage:g}",
            "10m",
            "ticket",
            f"KV cache above {slo.kv_cache_usage:.0%}",
            "KV-cache usage is {{ $value | humanizePercentage }}; requests will be preempted.",
        ),
        Alert(
            "TlsCertificateExpiring",
            f"({m.TLS_CERT_NOT_AFTER} - time()) / 86400 < {slo.cert_expiry_days}",
            "1h",
            "ticket",
            f"TLS certificate expires in under {slo.cert_expiry_days} days",
            "The certificate expires in {{ $value | humanize }} days.",
        ),
        Alert(
            "ApiKeyRotationOverdue",
            f"{m.KEY_AGE_SECONDS} / 86400 > {spec.limits.rotation_days}",
            "1h",
            "ticket",
            f"An API key is older than {spec.limits.rotation_days} days",
            "Key {{ $labels.key_id }} is {{ $value | humanize }} days old: rotate it.",
        ),
        Alert(
            "RejectedKeySpike",
            f'sum(rate({m.AUTHZ_DECISIONS}{{outcome=~"unknown|malformed|expired|revoked|missing"}}[5m])) * 60'
            f" > {slo.rejected_keys_per_minute:g}",
            "5m",
            "ticket",
            "Many requests with bad keys",
            "{{ $value | humanize }} requests per minute are refused for a bad key: a leak or a scan.",
        ),
    ]


def rule_groups(spec: GatewaySpec) -> dict:
    base = str(spec.alerts.runbook_base_url).rstrip("/")
    rules = [
        {
            "alert": a.name,
            "expr": a.expr,
            "for": a.for_,
            "labels": {"severity": a.severity},
            "annotations": {
                "summary": a.summary,
                "description": a.description,
                "runbook_url": f"{base}/{a.slug}.md",
            },
        }
        for a in alerts(spec)
    ]
    return {"groups": [{"name": GROUP, "rules": rules}]}

"""The monitoring component: ServiceMonitors, the PrometheusRule, the AlertmanagerConfig and dashboard ConfigMaps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gpugate.kubernetes.build import Build
from gpugate.kubernetes.objects import (
    ALERT_ITEM,
    DCGM,
    GATEWAY,
    JOB_LABEL,
    MONITORING_NAMESPACE,
    SECRET_ALERT,
    VLLM,
    labels,
    meta,
)
from gpugate.kubernetes.proxy import metrics_route, pod_services
from gpugate.render.alerts import rule_groups
from gpugate.render.dashboards import dashboard_files


def _monitoring(b: Build) -> list[dict[str, Any]]:
    release = {"release": b.kube.prometheus_release}

    def job(name: str) -> list[dict[str, Any]]:
        # The alert rules select by job, as on a VM (`up{job="vllm"}`).
        return [{"targetLabel": "job", "replacement": name, "action": "replace"}]

    def monitor(name: str, namespace: str, selector: dict[str, str], endpoints: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "apiVersion": "monitoring.coreos.com/v1",
            "kind": "ServiceMonitor",
            "metadata": meta(name, namespace, {**labels(name, b.stack), **release}),
            "spec": {"selector": {"matchLabels": selector}, "endpoints": endpoints},
        }

    metrics_port = "metrics"
    # A vLLM pod spends minutes starting (weights, warm-up) with no /metrics yet: scraping it then
    # would page VllmDown on every scale-up. Only ready pods are scraped; a replica that stops
    # answering leaves the endpoints and Caddy's rotation, and what clients feel is caught by the
    # prober and the error-budget alerts.
    ready_only = [{"sourceLabels": ["__meta_kubernetes_endpoint_ready"], "regex": "true", "action": "keep"}]
    out = [
        monitor(
            VLLM,
            b.ns,
            {JOB_LABEL: "vllm"},
            [{"port": "http", "path": "/metrics", "interval": "15s", "relabelings": ready_only + job("vllm")}],
        ),
        monitor(
            GATEWAY,
            b.ns,
            {JOB_LABEL: "caddy"},
            [
                {
                    "port": metrics_port,
                    "path": service.metrics_path if service.name == "caddy" else metrics_route(service),
                    "interval": "15s",
                    "relabelings": job(service.name),
                }
                for service in pod_services(b.spec)
                if service.metrics_path is not None
            ],
        ),
        monitor(DCGM, b.gpu_ns, {JOB_LABEL: "dcgm"}, [{"port": metrics_port, "path": "/metrics", "interval": "15s", "relabelings": job("dcgm")}]),
        {
            "apiVersion": "monitoring.coreos.com/v1",
            "kind": "PrometheusRule",
            "metadata": meta("gpugate", b.ns, {**labels("gpugate", b.stack), **release}),
            "spec": rule_groups(b.spec),
        },
    ]
    receiver = _alert_receiver(b)
    if receiver is not None:
        out.append(
            {
                "apiVersion": "monitoring.coreos.com/v1alpha1",
                "kind": "AlertmanagerConfig",
                "metadata": meta("gpugate", b.ns, {**labels("gpugate", b.stack), **release}),
                "spec": {
                    "route": {
                        "receiver": "gateway",
                        "groupBy": ["alertname", "severity"],
                        "groupWait": "30s",
                        "groupInterval": "5m",
                        "repeatInterval": b.spec.alerts.repeat_interval,
                    },
                    "receivers": [receiver],
                },
            }
        )
    return out


def _alert_receiver(b: Build) -> dict[str, Any] | None:
    """The stack's alert channel as an AlertmanagerConfig receiver; its credential stays in a Secret."""
    channel = b.spec.alerts.channel
    ref = {"name": SECRET_ALERT, "key": ALERT_ITEM}
    if channel.kind == "slack":
        return {"name": "gateway", "slackConfigs": [{"apiURL": ref, "channel": channel.channel, "sendResolved": True}]}
    if channel.kind == "pagerduty":
        return {
            "name": "gateway",
            "pagerdutyConfigs": [
                {
                    "routingKey": ref,
                    "sendResolved": True,
                    "severity": '{{ if eq .CommonLabels.severity "page" }}critical{{ else }}warning{{ end }}',
                }
            ],
        }
    if channel.kind == "email":
        return {
            "name": "gateway",
            "emailConfigs": [
                {
                    "to": channel.to,
                    "from": channel.sender,
                    "smarthost": channel.smarthost,
                    "authUsername": channel.sender,
                    "authPassword": ref,
                    "sendResolved": True,
                }
            ],
        }
    if channel.kind == "webhook":
        config: dict[str, Any] = {"url": str(channel.url), "sendResolved": True}
        if channel.bearer_token:
            config["httpConfig"] = {"authorization": {"type": "Bearer", "credentials": ref}}
        return {"name": "gateway", "webhookConfigs": [config]}
    return None


def _dashboards(b: Build) -> list[dict[str, Any]]:
    """The on-call dashboards (gpugate/render/dashboards.py), as ConfigMaps kube-prometheus-stack's Grafana
    sidecar loads (it watches every namespace for the label)."""
    out = []
    for path, data in sorted(dashboard_files(b.spec, b.stack).items()):
        name = "gpugate-dashboard-" + Path(path).stem.lower().replace("_", "-")
        tags = {**labels("grafana-dashboard", b.stack), "grafana_dashboard": "1"}
        out.append(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": meta(name[:63], MONITORING_NAMESPACE, tags),
                "data": {Path(path).name: data.decode()},
            }
        )
    return out


def objects(b: Build) -> list[dict[str, Any]]:
    """Every object of the monitoring component."""
    return [*_monitoring(b), *_dashboards(b)]

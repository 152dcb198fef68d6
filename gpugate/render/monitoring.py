"""Prometheus and Alertmanager configuration for one host, built as data from the spec."""

from __future__ import annotations

from pathlib import Path

from gpugate_runtime.alertsink import ALERTS_PATH
from gpugate_runtime.contract.host import ALERT_RULES, LOOPBACK, HostLayout, Ports
from gpugate_runtime.contract.services import Service

from gpugate.render.alerts import inhibit_rules
from gpugate.spec import GatewaySpec


def prometheus_config(spec: GatewaySpec, ports: Ports, layout: HostLayout, table: tuple[Service, ...]) -> dict:
    """Scrapes every service of the host's table that exports metrics (job = service name)."""

    def job(service: Service) -> dict:
        return {
            "job_name": service.name,
            "metrics_path": service.metrics_path,
            "static_configs": [{"targets": [f"{LOOPBACK}:{service.port}"]}],
        }

    return {
        "global": {
            "scrape_interval": spec.monitoring.scrape_interval,
            "evaluation_interval": spec.monitoring.evaluation_interval,
            "external_labels": {"gpugate_stack_domain": spec.domain},
        },
        "rule_files": [str(layout.bundle_file(ALERT_RULES))],
        "alerting": {"alertmanagers": [{"static_configs": [{"targets": [f"{LOOPBACK}:{ports.alertmanager}"]}]}]},
        "scrape_configs": [job(s) for s in table if s.metrics_path is not None],
    }


def alertmanager_config(spec: GatewaySpec, ports: Ports, layout: HostLayout, credential: Path | None = None) -> dict:
    """Routes every alert to the stack's channel; the credential is read from a secret file, never inlined
    (`credential`: where Alertmanager finds it; default the host's secret file)."""
    channel = spec.alerts.channel
    secret = str(credential or layout.alert_secret_file)
    receiver: dict = {"name": "gateway"}
    if channel.kind == "slack":
        receiver["slack_configs"] = [
            {
                "api_url_file": secret,
                "channel": channel.channel,
                "send_resolved": True,
                "title": '{{ .Status | toUpper }}: {{ .CommonLabels.alertname }}',
                "text": "{{ range .Alerts }}{{ .Annotations.summary }}\n{{ .Annotations.description }}\nRunbook: {{ .Annotations.runbook_url }}\n{{ end }}",
            }
        ]
    elif channel.kind == "pagerduty":
        receiver["pagerduty_configs"] = [
            {
                "routing_key_file": secret,
                "send_resolved": True,
                "severity": '{{ if eq .CommonLabels.severity "page" }}critical{{ else }}warning{{ end }}',
                "links": [{"href": "{{ (index .Alerts 0).Annotations.runbook_url }}", "text": "runbook"}],
            }
        ]
    elif channel.kind == "email":
        receiver["email_configs"] = [
            {
                "to": channel.to,
                "from": channel.sender,
                "smarthost": channel.smarthost,
                "auth_username": channel.sender,
                "auth_password_file": secret,
                "send_resolved": True,
            }
        ]
    elif channel.kind == "webhook":
        config: dict = {"url": str(channel.url), "send_resolved": True}
        if channel.bearer_token:
            config["http_config"] = {"authorization": {"type": "Bearer", "credentials_file": secret}}
        receiver["webhook_configs"] = [config]
    else:  # file: the host's alert sink appends each notification to the alert log
        receiver["webhook_configs"] = [
            {"url": f"http://{LOOPBACK}:{ports.alert_sink}{ALERTS_PATH}", "send_resolved": True}
        ]
    return {
        "route": {
            "receiver": "gateway",
            "group_by": ["alertname", "severity"],
            "group_wait": spec.monitoring.group_wait,
            "group_interval": spec.monitoring.group_interval,
            "repeat_interval": spec.alerts.repeat_interval,
        },
        "inhibit_rules": inhibit_rules(),
        "receivers": [receiver],
    }

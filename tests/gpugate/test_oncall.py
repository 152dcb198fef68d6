"""`gpugate alerts`: firing alerts from a real Alertmanager, with severity, since when, the live value and the runbook's first steps."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import typer
from typer.testing import CliRunner

from gpugate.render.alerts import rule_groups
from gpugate.cli.alerts import alerts_command
from gpugate.oncall import mitigation_steps
from gpugate.targets import render_bundle
from gpugate.stackfile import Stack, load_stack
from tests.conftest import edit_stack

ALERTMANAGER = "/usr/bin/prometheus-alertmanager"
STARTUP_TIMEOUT_S = 30
SEEN_TIMEOUT_S = 15


def find_free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class RunningAlertmanager:
    stack: Stack
    stack_file: Path
    url: str

    def post(self, *alerts: dict[str, Any]) -> None:
        response = httpx.post(f"{self.url}/api/v2/alerts", json=list(alerts), timeout=5, trust_env=False)
        assert response.status_code == 200, response.text

    def wait_for(self, count: int) -> None:
        """Until Alertmanager lists `count` alerts (any state): posting is asynchronous."""
        deadline = time.monotonic() + SEEN_TIMEOUT_S
        while time.monotonic() < deadline:
            listed = httpx.get(f"{self.url}/api/v2/alerts", timeout=5, trust_env=False).json()
            if len(listed) >= count and all(a["status"]["state"] != "unprocessed" for a in listed):
                return
            time.sleep(0.2)
        raise AssertionError(f"Alertmanager did not list {count} alerts within {SEEN_TIMEOUT_S}s")


@pytest.fixture
def alertmanager(tmp_path: Path) -> Iterator[RunningAlertmanager]:
    """Real Alertmanager with the local stack's rendered config (routes, inhibit rules), at internal_base + 4."""
    if shutil.which(ALERTMANAGER) is None:
        pytest.fail("prometheus-alertmanager is not installed (./scripts/test installs it)")
    port = find_free_port()
    stack_file = edit_stack("local", tmp_path / "Pulumi.oncall.yaml", lambda c: c["gpugate:ports"].update(internal_base=port - 4))
    stack = load_stack(stack_file)
    config = tmp_path / "alertmanager.yml"
    config.write_bytes(render_bundle(stack).files["alertmanager/alertmanager.yml"])
    log_path = tmp_path / "alertmanager.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [ALERTMANAGER, f"--config.file={config}", f"--storage.path={tmp_path / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address="],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            assert process.poll() is None, log_path.read_text()
            try:
                if httpx.get(f"{url}/-/ready", timeout=1, trust_env=False).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
        yield RunningAlertmanager(stack, stack_file, url)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def rendered(stack: Stack, alertname: str, labels: dict[str, str], value: str, description: str, age: timedelta) -> dict[str, Any]:
    """An alert as Prometheus sends it for one of the stack's rules: its severity, summary and runbook_url from the rule."""
    rule = next(r for r in rule_groups(stack.spec)["groups"][0]["rules"] if r["alert"] == alertname)
    annotations = {**rule["annotations"], "value": value, "description": description}
    return {
        "labels": {"alertname": alertname, **rule["labels"], **labels},
        "annotations": annotations,
        "startsAt": (datetime.now(UTC) - age).isoformat(),
        "generatorURL": "http://127.0.0.1/graph",
    }


def gpugate_alerts(*args: str) -> Any:
    app = typer.Typer()
    app.command()(alerts_command)
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})


def vllm_down(stack: Stack) -> dict[str, Any]:
    return rendered(stack, "VllmDown", {"job": "vllm", "instance": "127.0.0.1:18000"}, "up = 0",
                    "Prometheus has failed to scrape vLLM on 127.0.0.1:18000 for 1m: every completion fails.", timedelta(minutes=7))  # fmt: skip


@pytest.mark.e2e
def test_firing_alerts_come_pages_first_with_since_live_value_and_the_runbooks_first_steps(alertmanager):
    # given a ticket that fired first and a page that fired later
    stack = alertmanager.stack
    alertmanager.post(
        rendered(stack, "VllmQueueBacklog", {"instance": "127.0.0.1:18000"}, "23 waiting", "23 requests are queued.", timedelta(hours=2)),
        vllm_down(stack),
    )
    alertmanager.wait_for(2)
    # when on call asks for them as JSON
    result = gpugate_alerts("--stack", str(alertmanager.stack_file), "--json")
    # then both are listed, the page first, with exit 1 because something fires
    assert result.exit_code == 1, result.output
    report = json.loads(result.output)
    assert report["alertmanager"] == alertmanager.url  # the stack's own port: internal_base + 4
    page, ticket = report["alerts"]
    assert (page["alertname"], page["severity"], page["value"]) == ("VllmDown", "page", "up = 0")
    assert (ticket["alertname"], ticket["severity"], ticket["value"]) == ("VllmQueueBacklog", "ticket", "23 waiting")
    since = datetime.fromisoformat(page["since"])
    assert timedelta(minutes=6) < datetime.now(UTC) - since < timedelta(minutes=8)
    # and the first steps come from runbooks/vllm-down.md's Mitigation, naming this stack
    assert page["runbook_url"].endswith("/vllm-down.md") and page["runbook_file"].endswith("runbooks/vllm-down.md")
    assert len(page["first_steps"]) == 3
    assert page["first_steps"][0].endswith("`gpugate run restart --stack oncall --service vllm`")


@pytest.mark.e2e
def test_the_table_shows_severity_since_value_steps_and_runbook(alertmanager):
    alertmanager.post(vllm_down(alertmanager.stack))
    alertmanager.wait_for(1)
    result = gpugate_alerts("--stack", str(alertmanager.stack_file))
    assert result.exit_code == 1, result.output
    out = result.output
    assert "VllmDown" in out and "page" in out and "up = 0" in out and "(7m ago)" in out
    assert "1. Restart vLLM through the drain" in out and "gpugate run restart --stack oncall --service vllm" in out
    assert "runbook: https://github.com/gpugate/gpugate/blob/main/runbooks/vllm-down.md" in out


@pytest.mark.e2e
def test_a_symptom_of_an_outage_is_inhibited_and_shown_only_with_all(alertmanager):
    # given vLLM down and the prober failing because of it
    stack = alertmanager.stack
    alertmanager.post(
        vllm_down(stack),
        rendered(stack, "ProberFailing", {"check": "completion"}, "completion failing", "The completion check failed.", timedelta(minutes=3)),
    )
    alertmanager.wait_for(2)
    # then by default only the cause is listed (the rendered inhibit rule works) ...
    default = json.loads(gpugate_alerts("--stack", str(alertmanager.stack_file), "--json").output)
    assert [a["alertname"] for a in default["alerts"]] == ["VllmDown"]
    # ... and --all shows the symptom as suppressed
    everything = json.loads(gpugate_alerts("--stack", str(alertmanager.stack_file), "--json", "--all").output)
    states = {a["alertname"]: a["state"] for a in everything["alerts"]}
    assert states == {"VllmDown": "active", "ProberFailing": "suppressed"}


@pytest.mark.e2e
def test_nothing_firing_exits_0(alertmanager):
    result = gpugate_alerts("--stack", str(alertmanager.stack_file))
    assert result.exit_code == 0, result.output
    assert "no alerts firing" in result.output


def test_an_unreachable_alertmanager_of_a_cloud_stack_exits_1_and_explains_the_ssh_tunnel():
    closed = f"http://127.0.0.1:{find_free_port()}"
    result = gpugate_alerts("--stack", "staging", "--alertmanager-url", closed)
    assert result.exit_code == 1
    assert "cannot reach Alertmanager" in result.output
    assert "ssh -N -L 18004:127.0.0.1:18004" in result.output


def test_a_bad_stack_exits_2():
    assert gpugate_alerts("--stack", "no-such-stack").exit_code == 2


def test_mitigation_steps_are_the_numbered_items_with_their_first_command():
    text = """# X

## Diagnosis
1. not this one

## Mitigation
1. Restart it through the
   drain:
   ```bash
   gpugate run restart --stack S --service vllm
   gpugate alerts --stack S
   ```
   Words after the command are not part of the step.
2. Roll back ([rollback-model.md](rollback-model.md)).

## Escalation
Someone.
"""
    assert mitigation_steps(text) == [
        "Restart it through the drain: `gpugate run restart --stack S --service vllm`",
        "Roll back (rollback-model.md).",
    ]

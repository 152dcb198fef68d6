"""Alert delivery end to end: vLLM stopped on a real local stack -> Prometheus -> Alertmanager -> the local alert channel, then the resolution."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
from gpugate_runtime.contract.host import HostLayout
from typer.testing import CliRunner

from gpugate.cli.alerts import alerts_command
from gpugate.stackfile import load_stack
from tests.e2e.local_stack import RunningStack, running_local_stack

pytestmark = pytest.mark.e2e

# Short intervals for this stack only (the spec's `monitoring` section); the rule itself keeps its
# `for: 1m`, so the alert still proves one minute of failed scrapes.
FAST = {"scrape_interval": "2s", "evaluation_interval": "2s", "group_wait": "2s", "group_interval": "5s"}
# 1m `for` + a scrape, an evaluation and group_wait, with room for a busy 2-core machine.
FIRING_TIMEOUT_S = 180
# vLLM's start (about 35 s here) + a scrape, an evaluation and group_interval, with the same room.
RESOLVED_TIMEOUT_S = 300
SUPERVISORCTL_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def stack(tmp_path_factory, vllm_python, smollm_dir) -> Iterator[RunningStack]:
    """One private local stack for the module, scraping and notifying every few seconds."""
    with running_local_stack(tmp_path_factory.mktemp("alert-delivery"), lambda c: c.update({"gpugate:monitoring": dict(FAST)})) as running:
        yield running


def supervisorctl(stack: RunningStack, *args: str) -> str:
    conf = HostLayout(stack.state).etc / "supervisor" / "supervisord.conf"
    result = subprocess.run(
        [str(Path(sys.executable).parent / "supervisorctl"), "-c", str(conf), *args],
        capture_output=True, text=True, timeout=SUPERVISORCTL_TIMEOUT_S,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def notifications(stack: RunningStack) -> list[dict[str, Any]]:
    """Every line the local alert channel (the alert sink) has written."""
    path = HostLayout(stack.state).alert_log
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def wait_for_notification(stack: RunningStack, status: str, after: int, started: float, timeout: float) -> tuple[dict[str, Any], float]:
    """The first VllmDown notification with `status` among lines after the first `after`, and how long
    after `started` (time.monotonic()) it came."""
    while time.monotonic() - started < timeout:
        for record in notifications(stack)[after:]:
            if record["status"] == status and "VllmDown" in record["alertnames"]:
                return record, time.monotonic() - started
        time.sleep(1)
    raise AssertionError(
        f"no {status} VllmDown notification within {timeout:.0f} s; the alert log holds:\n"
        + "\n".join(json.dumps(r["alertnames"]) + " " + r["status"] for r in notifications(stack))
    )


def gpugate_alerts(stack: RunningStack) -> dict[str, Any]:
    app = typer.Typer()
    app.command()(alerts_command)
    result = CliRunner().invoke(app, ["--stack", str(stack.stack_file), "--json"], env={"COLUMNS": "200"})
    assert result.exit_code in (0, 1), result.output
    return json.loads(result.output)


def test_stopped_vllm_pages_the_local_channel_with_its_runbook_and_the_recovery_resolves_it(stack: RunningStack):
    # given a healthy stack, whose vLLM Prometheus has seen up for the last 10 s (on a busy machine a slow
    # /metrics answer is a failed 2 s scrape: an alert pending before the stop would fire early), and what its
    # alert channel holds so far
    deadline = time.monotonic() + 120
    while not stack.prometheus(f'min_over_time(up{{instance="127.0.0.1:{stack.ports["vllm"]}"}}[10s]) == 1'):
        assert time.monotonic() < deadline, "vLLM's scrapes did not stay up for 10 s within 120 s"
        time.sleep(1)
    before = len(notifications(stack))

    # when vLLM is stopped through its supervisor (so that it stays down: no race with auto-restart)
    stopping = time.monotonic()
    supervisorctl(stack, "stop", "vllm")

    # then Alertmanager delivers VllmDown to the local channel, with its severity, live value and runbook
    firing, fired_after = wait_for_notification(stack, "firing", before, stopping, FIRING_TIMEOUT_S)
    alert = next(a for a in firing["alerts"] if a["alertname"] == "VllmDown")
    assert alert["status"] == "firing" and alert["severity"] == "page"
    assert alert["runbook_url"] == "https://github.com/gpugate/gpugate/blob/main/runbooks/vllm-down.md"
    assert alert["annotations"]["value"] == "up = 0"
    assert f"127.0.0.1:{stack.ports['vllm']}" in alert["annotations"]["description"]
    assert fired_after >= 60, f"fired after {fired_after:.0f} s: the rule's `for: 1m` was not honoured"
    print(f"\nVllmDown firing notification {fired_after:.0f} s after vLLM stopped")

    # and the on-call view lists it with the first steps of its runbook, for this stack
    view = gpugate_alerts(stack)
    vllm_down = next(a for a in view["alerts"] if a["alertname"] == "VllmDown")
    assert vllm_down["value"] == "up = 0"
    name = load_stack(stack.stack_file).name
    assert vllm_down["first_steps"][0].endswith(f"`gpugate run restart --stack {name} --service vllm`")

    # when vLLM starts again
    after_firing = len(notifications(stack))
    starting = time.monotonic()
    supervisorctl(stack, "start", "vllm")

    # then the resolved notification arrives too
    resolved, resolved_after = wait_for_notification(stack, "resolved", after_firing, starting, RESOLVED_TIMEOUT_S)
    alert = next(a for a in resolved["alerts"] if a["alertname"] == "VllmDown")
    assert alert["status"] == "resolved"
    assert alert["runbook_url"].endswith("/vllm-down.md")
    print(f"VllmDown resolved notification {resolved_after:.0f} s after vLLM was started again")

"""The local alert sink appends every notification real Alertmanager sends, firing and resolved, with its runbook."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

STARTUP_TIMEOUT_S = 20
DELIVERY_TIMEOUT_S = 30
RUNBOOK = "https://github.com/gpugate/gpugate/blob/main/runbooks/prober-failing.md"
ALERTMANAGER = "/usr/bin/prometheus-alertmanager"


def find_free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(ready: Callable[[], bool], what: str, process: subprocess.Popen, log_path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert process.poll() is None, f"{what}: process exited:\n{log_path.read_text()}"
        assert time.monotonic() < deadline, f"{what}: not after {timeout}s:\n{log_path.read_text()}"
        time.sleep(0.1)


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


def answers(url: str) -> bool:
    try:
        httpx.get(url, timeout=1, trust_env=False)
    except httpx.TransportError:
        return False
    return True


def read_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@dataclass(frozen=True)
class Sink:
    url: str
    path: Path
    log: Path


@pytest.fixture
def sink(tmp_path: Path) -> Iterator[Sink]:
    """`python -m gpugate_runtime alertsink serve` as supervisord runs it, logging into a directory not yet made."""
    port = find_free_port()
    path = tmp_path / "var" / "log" / "gpugate" / "alerts.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUGATE_")} | {
        "GPUGATE_ALERTSINK_PORT": str(port),
        "GPUGATE_ALERTSINK_PATH": str(path),
    }
    log_path = tmp_path / "alertsink.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "gpugate_runtime", "alertsink", "serve"],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: answers(f"{base}/"), "alert sink", process, log_path, STARTUP_TIMEOUT_S)
        yield Sink(url=f"{base}/alerts", path=path, log=log_path)
    finally:
        stop(process)


def notification(status: str = "firing") -> dict[str, Any]:
    """A notification as Alertmanager 0.25 posts it (webhook payload version 4)."""
    now = datetime.now(UTC).isoformat()
    return {
        "version": "4",
        "groupKey": '{}:{alertname="ProberFailing"}',
        "truncatedAlerts": 0,
        "status": status,
        "receiver": "gateway",
        "groupLabels": {"alertname": "ProberFailing"},
        "commonLabels": {"alertname": "ProberFailing", "severity": "page"},
        "commonAnnotations": {"runbook_url": RUNBOOK},
        "externalURL": "http://127.0.0.1:18004",
        "alerts": [
            {
                "status": status,
                "labels": {"alertname": "ProberFailing", "severity": "page", "check": "completion"},
                "annotations": {"summary": "A synthetic check keeps failing", "runbook_url": RUNBOOK},
                "startsAt": now,
                "endsAt": "0001-01-01T00:00:00Z",
                "generatorURL": "http://127.0.0.1:18003/graph",
                "fingerprint": "4b9c1a2b3c4d5e6f",
            }
        ],
    }


@pytest.mark.e2e
def test_notification_is_appended_as_one_json_line_with_its_runbook(sink: Sink) -> None:
    response = httpx.post(sink.url, json=notification(), timeout=5, trust_env=False)

    assert response.status_code == 200
    (line,) = read_lines(sink.path)
    assert line["status"] == "firing"
    assert line["alertnames"] == ["ProberFailing"]
    assert line["severities"] == ["page"]
    assert line["runbook_urls"] == [RUNBOOK]
    assert line["alerts"][0]["labels"]["check"] == "completion"
    assert datetime.fromisoformat(line["received_at"]) > datetime.now(UTC) - timedelta(minutes=1)


@pytest.mark.e2e
def test_each_notification_gets_its_own_line_in_order(sink: Sink) -> None:
    for status in ("firing", "resolved"):
        assert httpx.post(sink.url, json=notification(status), timeout=5, trust_env=False).status_code == 200

    assert [line["status"] for line in read_lines(sink.path)] == ["firing", "resolved"]


@pytest.mark.e2e
def test_body_that_is_not_a_notification_is_refused_and_not_logged(sink: Sink) -> None:
    not_json = httpx.post(sink.url, content=b"{not json", timeout=5, trust_env=False)
    no_alerts = httpx.post(sink.url, json={"status": "firing"}, timeout=5, trust_env=False)

    assert (not_json.status_code, no_alerts.status_code) == (400, 400)
    assert not sink.path.exists()


@pytest.mark.e2e
def test_only_a_post_to_alerts_is_accepted(sink: Sink) -> None:
    get = httpx.get(sink.url, timeout=5, trust_env=False)
    elsewhere = httpx.post(sink.url.replace("/alerts", "/other"), json=notification(), timeout=5, trust_env=False)

    assert (get.status_code, elsewhere.status_code) == (405, 404)
    assert not sink.path.exists()


# -- with real Alertmanager --------------------------------------------------------------------------


@dataclass(frozen=True)
class Alertmanager:
    url: str


@pytest.fixture
def alertmanager(sink: Sink, tmp_path: Path) -> Iterator[Alertmanager]:
    assert shutil.which(ALERTMANAGER), "Alertmanager is required (apt-get install prometheus-alertmanager)"
    port = find_free_port()
    config = tmp_path / "alertmanager.yml"
    # JSON is YAML; group timings of a second keep the test short.
    config.write_text(
        json.dumps(
            {
                "route": {
                    "receiver": "gateway",
                    "group_by": ["alertname", "severity"],
                    "group_wait": "1s",
                    "group_interval": "1s",
                    "repeat_interval": "1h",
                },
                "receivers": [{"name": "gateway", "webhook_configs": [{"url": sink.url, "send_resolved": True}]}],
            }
        )
    )
    log_path = tmp_path / "alertmanager.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [
                ALERTMANAGER,
                f"--config.file={config}",
                f"--storage.path={tmp_path / 'am-data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--cluster.listen-address=",
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        try:
            return httpx.get(f"{base}/-/ready", timeout=1, trust_env=False).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_until(ready, "Alertmanager", process, log_path, STARTUP_TIMEOUT_S)
        yield Alertmanager(url=base)
    finally:
        stop(process)


def post_alert(alertmanager: Alertmanager, starts_at: datetime, ends_at: datetime | None = None) -> None:
    alert: dict[str, Any] = {
        "labels": {"alertname": "ProberFailing", "severity": "page", "check": "completion"},
        "annotations": {"summary": "A synthetic check keeps failing", "runbook_url": RUNBOOK},
        "startsAt": starts_at.isoformat(),
    }
    if ends_at is not None:
        alert["endsAt"] = ends_at.isoformat()
    response = httpx.post(f"{alertmanager.url}/api/v2/alerts", json=[alert], timeout=5, trust_env=False)
    assert response.status_code == 200, response.text


def wait_for_line(sink: Sink, status: str) -> dict[str, Any]:
    deadline = time.monotonic() + DELIVERY_TIMEOUT_S
    while True:
        lines = [line for line in read_lines(sink.path) if line["status"] == status]
        if lines:
            return lines[0]
        assert time.monotonic() < deadline, (
            f"no {status} notification after {DELIVERY_TIMEOUT_S}s:\n{sink.log.read_text()}"
        )
        time.sleep(0.2)


@pytest.mark.e2e
def test_alertmanager_delivers_firing_then_resolved_with_the_runbook(alertmanager: Alertmanager, sink: Sink) -> None:
    started = datetime.now(UTC) - timedelta(minutes=1)

    post_alert(alertmanager, started)
    firing = wait_for_line(sink, "firing")
    post_alert(alertmanager, started, ends_at=datetime.now(UTC) - timedelta(seconds=1))
    resolved = wait_for_line(sink, "resolved")

    for line in (firing, resolved):
        assert line["alertnames"] == ["ProberFailing"]
        assert line["severities"] == ["page"]
        assert line["runbook_urls"] == [RUNBOOK]
        assert line["receiver"] == "gateway"
    assert firing["alerts"][0]["ends_at"].startswith("0001-01-01")
    assert datetime.fromisoformat(resolved["alerts"][0]["ends_at"]) < datetime.now(UTC)
    assert [line["status"] for line in read_lines(sink.path)] == ["firing", "resolved"]

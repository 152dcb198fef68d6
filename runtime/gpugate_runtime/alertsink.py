"""The local alert channel: takes Alertmanager's webhook notifications and appends each as one JSON line."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import typer
import uvicorn
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gpugate_runtime.host import LOOPBACK
from gpugate_runtime.prober_settings import AlertSinkSettings
from gpugate_runtime.quietserver import QuietServer
from gpugate_runtime.settings import env_file, load_settings

log = logging.getLogger(__name__)

ALERTS_PATH = "/alerts"
EXIT_BAD_INPUT = 2


class WebhookAlert(BaseModel):
    """One alert of Alertmanager's webhook payload (version 4)."""

    # Unlike our own models, extra fields are ignored: Alertmanager adds fields between releases,
    # and refusing a notification for one would lose the alert it carries.
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    status: Literal["firing", "resolved"]
    labels: dict[str, str]
    annotations: dict[str, str] = {}
    starts_at: str = Field(alias="startsAt")
    ends_at: str = Field("", alias="endsAt")
    fingerprint: str = ""


class WebhookNotification(BaseModel):
    """Alertmanager's webhook payload: one notification for one group of alerts."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    status: Literal["firing", "resolved"]
    receiver: str = ""
    group_key: str = Field("", alias="groupKey")
    truncated_alerts: int = Field(0, alias="truncatedAlerts")
    alerts: list[WebhookAlert]


def alert_record(notification: WebhookNotification, received_at: datetime) -> dict[str, Any]:
    """The line written for one notification: what on-call reads first, then every alert in full."""

    def distinct(values: list[str]) -> list[str]:
        return sorted({v for v in values if v})

    alerts = notification.alerts
    return {
        "received_at": received_at.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "status": notification.status,
        "receiver": notification.receiver,
        "group_key": notification.group_key,
        "truncated_alerts": notification.truncated_alerts,
        "alertnames": distinct([a.labels.get("alertname", "") for a in alerts]),
        "severities": distinct([a.labels.get("severity", "") for a in alerts]),
        "runbook_urls": distinct([a.annotations.get("runbook_url", "") for a in alerts]),
        "alerts": [
            {
                "status": a.status,
                "alertname": a.labels.get("alertname", ""),
                "severity": a.labels.get("severity", ""),
                "summary": a.annotations.get("summary", ""),
                "runbook_url": a.annotations.get("runbook_url", ""),
                "starts_at": a.starts_at,
                "ends_at": a.ends_at,
                "fingerprint": a.fingerprint,
                "labels": a.labels,
                "annotations": a.annotations,
            }
            for a in alerts
        ],
    }


class AlertLog:
    """An append-only JSON-lines file; each line is written whole and fsync'd before the sender hears OK."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    def append(self, record: dict[str, Any]) -> None:
        data = (json.dumps(record, sort_keys=True, separators=(",", ":")) + "\n").encode()
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)


class AlertSinkApp:
    """ASGI app: `POST /alerts` appends the notification; Alertmanager retries anything but 2xx."""

    def __init__(self, alert_log: AlertLog, max_body_bytes: int) -> None:
        self.alert_log = alert_log
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return
        if scope["path"] != ALERTS_PATH:
            await _respond(send, 404, "not found")
            return
        if scope["method"] != "POST":
            await _respond(send, 405, "method not allowed", allow="POST")
            return
        body = await _read_body(receive, self.max_body_bytes)
        if body is None:
            log.warning("refused a notification larger than %d bytes", self.max_body_bytes)
            await _respond(send, 413, "notification too large")
            return
        try:
            notification = WebhookNotification.model_validate_json(body)
        except ValidationError as exc:
            # Only the error locations: the body is not ours to copy into a log.
            log.warning("refused a body that is not an Alertmanager notification: %s", _error_locations(exc))
            await _respond(send, 400, "not an Alertmanager webhook notification")
            return
        record = alert_record(notification, datetime.now(UTC))
        try:
            await asyncio.to_thread(self.alert_log.append, record)
        except OSError as exc:
            log.error("cannot append to %s: %s", self.alert_log.path, exc)
            await _respond(send, 500, "cannot write the alert log")
            return
        log.info("%s: %s", record["status"], ", ".join(record["alertnames"]) or "(no alertname)")
        await _respond(send, 200, "ok")


def _error_locations(exc: ValidationError) -> str:
    return "; ".join(".".join(str(p) for p in error["loc"]) + f": {error['type']}" for error in exc.errors())


async def _read_body(receive: Callable, limit: int) -> bytes | None:
    """The request body, or None once it grows past `limit`."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


async def _respond(send: Callable, status: int, text: str, **headers: str) -> None:
    body = (text + "\n").encode()
    raw = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode())]
    raw += [(name.encode(), value.encode()) for name, value in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def build_app(settings: AlertSinkSettings) -> AlertSinkApp:
    return AlertSinkApp(AlertLog(settings.path), settings.max_body_bytes)


# -- command line -------------------------------------------------------------------------------

app = typer.Typer(
    help="The local alert channel (Alertmanager webhook -> alert log).", no_args_is_help=True, add_completion=False
)


@app.callback()
def main() -> None:
    """The local alert channel."""


@app.command("serve")
def serve_command() -> None:
    """Append each notification Alertmanager POSTs to 127.0.0.1/alerts to the alert log (GPUGATE_ALERTSINK_*)."""
    try:
        settings = load_settings(AlertSinkSettings, env_file())
    except ValidationError as exc:
        typer.echo(f"error: the alert sink's settings (GPUGATE_ALERTSINK_*) are invalid:\n{exc}", err=True)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.info("alert sink on http://%s:%d%s -> %s", LOOPBACK, settings.port, ALERTS_PATH, settings.path)
    config = uvicorn.Config(
        build_app(settings),
        host=LOOPBACK,
        port=settings.port,
        lifespan="off",
        access_log=False,
        log_level=settings.log_level,
    )
    QuietServer(config).run()


if __name__ == "__main__":
    app()

"""Read-only tasks: the host's status and its logs (metadata only)."""

from __future__ import annotations

import json as jsonlib
from datetime import UTC, datetime
from typing import Any

from fabric import task
from gpugate_runtime.accesslog import ACCESS_LOG_IDS_FIELD
from gpugate_runtime.contract.services import VLLM
from invoke.exceptions import Exit
from rich.console import Console
from rich.table import Table

from runbooks.tasks.host import (
    ACCESS_FIELDS,
    AUTHZ_FIELDS,
    EXIT_BAD_INPUT,
    EXIT_CHECK_FAILED,
    JSON_LOGS,
    MAX_LOG_LINES,
    SERVICE_LOGS,
    Host,
    console,
    last_lines,
    mask,
    say,
    service_logs,
)


@task(auto_shortflags=False, help={"json": "print the report as JSON"})
def status(c, json=False):
    """Show the host's services, drain state, deployed bundle, last prober run and key counts; exit 1 unless healthy.

    Read-only. Healthy means every service runs, the prober's last run passed and the proxy is not draining; on a
    stack that routes, also each tier and provider green / yellow / red from the router's metrics, none red.
    """
    host = Host(c)
    settings = host.prober()
    services = host.services()
    draining = host.exists(host.layout.drain_marker)
    last = host.http_get(f"http://127.0.0.1:{settings.port}/status", timeout=5)[0]
    run = jsonlib.loads(last["body"]) if last.get("status") == 200 else {"checked_at": None, "results": []}
    bundle = host.check(["cat", str(host.layout.etc / "manifest.json")])
    bundle_sha = jsonlib.loads(bundle.stdout).get("bundle_sha256") if bundle.ok else None
    if bundle_sha is None:  # VMs carry the hash in BUNDLE_SHA256 (user-data leaves manifest.json out)
        plain = host.check(["cat", str(host.layout.etc / "BUNDLE_SHA256")])
        bundle_sha = plain.stdout.strip() if plain.ok else None
    counts: dict[str, int] = {"active": 0, "expired": 0, "revoked": 0}
    for key in host.keys():
        counts[key["status"]] = counts.get(key["status"], 0) + 1
    checks = run.get("results", [])
    healthy = all(s["state"] == "RUNNING" for s in services) and bool(checks) and all(x.get("ok") is not False for x in checks) and not draining
    routing = host.router_port() is not None
    routes = host.route_health() if routing else None
    if routing:
        healthy = healthy and routes is not None and all(r.state != "red" for r in routes)
    report = {
        "host": host.where, "stack": host.facts.stack, "bundle_sha256": bundle_sha, "services": services,
        "draining": draining, "prober_checked_at": run.get("checked_at"), "checks": checks, "keys": counts, "healthy": healthy,
    }  # fmt: skip
    if routing:
        report["routes"] = None if routes is None else [r.to_dict() for r in routes]
    if json:
        console.print_json(jsonlib.dumps(report))
    else:
        say(f"host {host.where} · stack {host.facts.stack or '?'} · bundle {bundle_sha[:12] if bundle_sha else 'unknown'}")
        table = Table("service", "state", "pid", "detail")
        for s in services:
            table.add_row(s["name"], s["state"], str(s["pid"] or "-"), s["detail"])
        # A pipe gets rich's 80 columns, which would cut the details; a terminal keeps its own width.
        (console if console.is_terminal else Console(width=160, highlight=False)).print(table)
        say(f"draining: {'yes, since ' + host.check(['cat', str(host.layout.drain_marker)]).stdout.strip() if draining else 'no'}")
        marks = {True: "ok", False: "FAIL", None: "n/a"}
        say(f"prober (last run {run.get('checked_at') or 'none yet'}): " + (", ".join(f"{x['check']} {marks[x.get('ok')]}" for x in checks) or "no results"))
        for x in checks:
            if x.get("ok") is False:
                say(f"  {x['check']}: {x.get('detail', '')}")
        if routing:
            say("routes: " + ("the router's /metrics does not answer" if routes is None else ", ".join(f"{r.route} {r.state}" for r in routes)))
            for r in routes or []:
                if r.state != "green":
                    say(f"  {r.route}: {r.detail}")
        say(f"keys: {counts['active']} active, {counts['expired']} expired, {counts['revoked']} revoked")
        say("healthy" if healthy else "NOT healthy")
    if not healthy:
        raise Exit(code=EXIT_CHECK_FAILED)


@task(
    auto_shortflags=False,
    help={
        "service": f"what to show: {', '.join(JSON_LOGS)} (metadata of each request) or a service's output: {', '.join(SERVICE_LOGS)}"
        ", vllm-<tier> (an extra tier's vLLM)",
        "lines": f"how many of the last lines (1..{MAX_LOG_LINES})",
    },
)
def logs(c, service="access", lines=50):
    """Show the last lines of a log on the host, metadata only: no prompt, completion or key is ever shown.

    `access` (the default) prints time, key id, request id, method, path, status, milliseconds and bytes of each
    request, tab-separated; `authz` each auth decision; a service name its own output, with anything shaped like
    a key masked.
    """
    if service not in (*JSON_LOGS, *SERVICE_LOGS) and not service.startswith(f"{VLLM}-"):
        raise Exit(f"error: no log {service!r}; choose one of: {', '.join((*JSON_LOGS, *SERVICE_LOGS))}", EXIT_BAD_INPUT)
    if not 1 <= lines <= MAX_LOG_LINES:
        raise Exit(f"error: --lines {lines} is out of range; allowed: 1..{MAX_LOG_LINES}", EXIT_BAD_INPUT)
    host = Host(c)
    host.env()
    choices = (*JSON_LOGS, *service_logs(host.names()))
    if service not in choices:
        raise Exit(f"error: no log {service!r} on {host.where}; choose one of: {', '.join(choices)}", EXIT_BAD_INPUT)
    logs_dir = host.layout.logs
    local = host.facts.supervisor == "supervisord"
    if service in JSON_LOGS:
        argv, role = ["tail", "-n", str(lines), str(logs_dir / f"{service}.log")], "root"
    elif local:
        name = "authz.out" if service == "authz-output" else service
        argv, role = ["tail", "-n", str(lines), str(logs_dir / f"{name}.log")], "login"
    else:
        unit = "authz" if service == "authz-output" else service
        if service in ("alertsink", "supervisord"):
            raise Exit(f"error: {service} runs only on a local stack", EXIT_BAD_INPUT)
        argv, role = ["journalctl", "-u", f"gpugate-{unit}.service", "-n", str(lines), "--no-pager", "-o", "short-iso"], "root"
    result = host.check(argv, role)
    if result.failed:
        raise Exit(f"error: cannot read the {service} log on {host.where}: {last_lines(result)}", EXIT_CHECK_FAILED)
    raw = result.stdout.splitlines()
    if service not in JSON_LOGS:
        for line in raw:
            say(mask(line))
        return
    fields = ACCESS_FIELDS if service == "access" else AUTHZ_FIELDS
    say("\t".join(fields))
    skipped = 0
    for line in raw:
        try:
            entry = jsonlib.loads(line)
        except ValueError:
            skipped += 1
            continue
        say("\t".join(_access_row(entry) if service == "access" else [str(entry.get(f, "")) for f in fields]))
    if skipped:
        say(f"({skipped} line(s) that are not JSON were left out)")


def _access_row(entry: dict[str, Any]) -> list[str]:
    key_id, _, request_id = str(entry.get(ACCESS_LOG_IDS_FIELD, "- -")).partition(" ")
    request = entry.get("request") or {}
    when = datetime.fromtimestamp(float(entry.get("ts", 0)), UTC).strftime("%Y-%m-%dT%H:%M:%S")
    path = str(request.get("uri", "")).split("?", 1)[0]
    return [when, key_id, request_id, str(request.get("method", "")), path, str(entry.get("status", "")),
            f"{float(entry.get('duration', 0)) * 1000:.1f}", str(entry.get("size", ""))]  # fmt: skip

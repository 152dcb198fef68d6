"""Fabric tasks that carry out the runbooks on a gateway host over SSH; `gpugate run TASK --stack S` runs them."""

from __future__ import annotations

import base64
import hashlib
import io
import json as jsonlib
import re
import shlex
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from dotenv import dotenv_values
from fabric import Connection, task
from invoke.exceptions import CommandTimedOut, Exit
from invoke.runners import Result
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from rich.console import Console
from rich.table import Table

from gpugate_runtime.contract import metrics as m
from gpugate_runtime.contract.host import VM_RUNTIME_PYTHON as HOST_VM_RUNTIME_PYTHON, HostLayout
from gpugate_runtime.keys import ID_HEX, NAME_PATTERN, NAME_RULE, key_id_of, parse_duration
from gpugate_runtime.prober_settings import ProberSettings

from gpugate.local.gateway import SUPERVISOR_CONF
from gpugate.userdata import SERVICES as SYSTEMD_UNITS

EXIT_CHECK_FAILED, EXIT_BAD_INPUT = 1, 2

# Where cloud-init installs gpugate-runtime on a VM (gpugate/userdata.py, templates/vm/*.service.j2).
VM_RUNTIME_PYTHON = str(HOST_VM_RUNTIME_PYTHON)
CADDYFILE = "caddy/Caddyfile"
# Services `restart` may restart; Caddy is reloaded (`reload-proxy`), never restarted under traffic.
RESTARTABLE = ("vllm", "authz", "prober", "prometheus", "alertmanager", "alertsink")
# Logs of one host: the two JSON logs the runtime writes, then each service's own output.
JSON_LOGS = ("access", "authz")
SERVICE_LOGS = ("vllm", "caddy", "authz-output", "prober", "prometheus", "alertmanager", "alertsink", "supervisord")
MAX_LOG_LINES = 10_000
# Fields a person may see from the access and decision logs: metadata, never a body or a key.
ACCESS_FIELDS = ("time", "key_id", "request_id", "method", "path", "status", "ms", "bytes")
AUTHZ_FIELDS = ("ts", "request_id", "key_id", "outcome", "status", "latency_ms")
KEY_LIKE = (
    (re.compile(rf"\bggk_([0-9a-f]{{{ID_HEX}}})_[0-9a-f]+"), r"ggk_\1_<redacted>"),
    (re.compile(r"(?i)\b(bearer)\s+\S+"), r"\1 <redacted>"),
)
POLL_S = 1.0

Role = Literal["login", "root", "service", "caddy"]
console = Console(highlight=False, soft_wrap=True)

# A reload is trusted only after this many fresh connections (each a TLS handshake) are answered.
VERIFY_CONNECTIONS = 10
VERIFY_TIMEOUT_S = 15

# Run on the host with its runtime interpreter (which has httpx): GET a URL `count` times, each on a
# new connection; print one JSON line with a list of answers.
_HTTP_GET = """
import json, ssl, sys
import httpx
url, timeout, cafile, count = sys.argv[1], float(sys.argv[2]), sys.argv[3], int(sys.argv[4])
verify = ssl.create_default_context(cafile=cafile) if cafile else True
answers = []
for _ in range(count):
    try:
        with httpx.Client(verify=verify, timeout=timeout) as client:
            r = client.get(url)
        answers.append({"status": r.status_code, "retry_after": r.headers.get("retry-after"), "body": r.text})
    except (httpx.HTTPError, OSError) as exc:
        answers.append({"error": f"{type(exc).__name__}: {exc}"})
print(json.dumps(answers))
"""


class GatewayHost(BaseModel):
    """What the tasks know about a gateway host (Fabric config section `gpugate`); defaults describe a cloud VM."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    stack: str = Field("", description="the stack the host belongs to (for messages)")
    root: str = Field("/", description="HostLayout root: / on a VM, the state dir of a local stack")
    supervisor: Literal["systemd", "supervisord"] = "systemd"
    python: str = Field(VM_RUNTIME_PYTHON, description="the host's interpreter with gpugate-runtime")
    supervisorctl: str = Field("supervisorctl", description="supervisorctl of a local stack")
    caddy: str = "/usr/bin/caddy"
    service_user: str | None = Field("gpugate", description="owner of the key store and state; None: the login user")
    caddy_user: str | None = Field("caddy", description="Caddy's user (validate, admin socket); None: the login user")
    become_root: bool = Field(True, description="prefix root's commands with `sudo -n` when the login user is not root")

    @property
    def layout(self) -> HostLayout:
        return HostLayout(Path(self.root))


class Host:
    """A gateway host over one SSH connection: read-only checks always run; changes print instead under --dry-run."""

    def __init__(self, c: Connection) -> None:
        self.c = c
        try:
            self.facts = GatewayHost.model_validate(c.config.get("gpugate") or {})
        except ValidationError as exc:
            raise Exit(f"error: the `gpugate` section of the Fabric config is invalid:\n{exc}", EXIT_BAD_INPUT) from None
        self.layout = self.facts.layout
        self.dry_run = bool(c.config.run.dry)
        self._login_is_root: bool | None = None
        self._env: dict[str, str] | None = None

    @property
    def where(self) -> str:
        return f"{self.c.user}@{self.c.host}:{self.c.port}"

    # ---- running commands ---------------------------------------------------------------

    def _prefix(self, role: Role) -> list[str]:
        user = {"service": self.facts.service_user, "caddy": self.facts.caddy_user}.get(role)
        if user:
            return ["sudo", "-n", "-u", user]
        if role != "login" and self.facts.become_root and not self.login_is_root:
            return ["sudo", "-n"]
        return []

    @property
    def login_is_root(self) -> bool:
        if self._login_is_root is None:
            self._login_is_root = self._run("id -u").stdout.strip() == "0"
        return self._login_is_root

    def command(self, argv: Sequence[str], role: Role = "login") -> str:
        return shlex.join([*self._prefix(role), *argv])

    def _run(self, command: str, timeout: float = 60) -> Result:
        try:
            # No stdin: invoke feeds a stream one byte per 10 ms, so content travels as an argument instead.
            return self.c.run(command, hide=True, warn=True, dry=False, timeout=timeout, in_stream=False)
        except CommandTimedOut:
            raise Exit(f"error: `{command}` on {self.where} did not finish within {timeout:.0f} s", EXIT_CHECK_FAILED) from None

    def check(self, argv: Sequence[str], role: Role = "login", timeout: float = 60) -> Result:
        """A read-only command: it runs in a dry run too; a non-zero exit is returned, not raised."""
        return self._run(self.command(argv, role), timeout)

    def change(self, what: str, argv: Sequence[str], role: Role = "login", timeout: float = 120) -> Result | None:
        """A command that changes the host: under --dry-run it is only printed (None), else run and returned."""
        command = self.command(argv, role)
        if self.dry_run:
            say(f"would {what}:\n    $ {command}")
            return None
        say(f"→ {what}")
        return self._run(command, timeout)

    def write(self, what: str, path: Path, content: str, role: Role) -> Result | None:
        """Write a small text file atomically (a temporary file renamed over it), mode 0644."""
        if self.dry_run:
            say(f"would {what} ({len(content.encode())} bytes)")
            return None
        script = 'umask 022 && printf %s "$1" | base64 -d > "$2.tmp" && mv "$2.tmp" "$2"'
        payload = base64.b64encode(content.encode()).decode()
        say(f"→ {what}")
        return self._run(self.command(["sh", "-c", script, "sh", payload, str(path)], role))

    def must(self, result: Result | None, what: str) -> None:
        if result is not None and result.failed:
            raise Exit(f"error: {what} failed on {self.where}: {_last_lines(result)}", EXIT_CHECK_FAILED)

    # ---- facts about the host -----------------------------------------------------------

    def env(self) -> dict[str, str]:
        """The deployed runtime env file (settings only; secrets are files): also proves a bundle is there."""
        if self._env is None:
            result = self.check(["cat", str(self.layout.runtime_env)])
            if result.failed:
                raise Exit(
                    f"error: no gpugate bundle on {self.where}: {self.layout.runtime_env}: {_last_lines(result)}\n"
                    f"deploy the stack first (local: `gpugate up --stack {self.facts.stack or 'S'}`; cloud: `pulumi up`)",
                    EXIT_CHECK_FAILED,
                )
            self._env = {k: v for k, v in dotenv_values(stream=io.StringIO(result.stdout)).items() if v is not None}
        return self._env

    def prober(self) -> ProberSettings:
        prefix = ProberSettings.model_config["env_prefix"]
        values = {k[len(prefix) :].lower(): v for k, v in self.env().items() if k.startswith(prefix)}
        try:
            return ProberSettings(**values)
        except ValidationError as exc:
            raise Exit(f"error: the prober settings in {self.layout.runtime_env} are invalid:\n{exc}", EXIT_CHECK_FAILED) from None

    def runtime(self, *args: str) -> list[str]:
        """argv of the host's runtime CLI, reading the deployed env file."""
        return ["env", f"GPUGATE_ENV_FILE={self.layout.runtime_env}", self.facts.python, "-m", "gpugate_runtime", *args]

    def http_get(self, url: str, timeout: float = 5, ca_file: Path | None = None, count: int = 1) -> list[dict[str, Any]]:
        """GET a URL from the host itself, `count` times on fresh connections: each {"status", "retry_after", "body"} or {"error"}."""
        argv = [self.facts.python, "-c", _HTTP_GET, url, str(timeout), str(ca_file or ""), str(count)]
        result = self.check(argv, timeout=count * timeout + 30)
        try:
            return jsonlib.loads(result.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            return [{"error": _last_lines(result) or "no answer"}]

    def public_get(self, path: str, timeout: float = 5, count: int = 1) -> list[dict[str, Any]]:
        """GET through the public URL, trusting what the prober trusts."""
        settings = self.prober()
        return self.http_get(settings.public_base + path, timeout, settings.ca_file, count)

    def vllm_health(self) -> bool:
        return self.http_get(str(self.prober().vllm_health_url), timeout=3)[0].get("status") == 200

    def vllm_in_flight(self) -> int | None:
        """Requests vLLM is running or queueing, from its /metrics; None when it does not answer."""
        url = str(self.prober().vllm_health_url).removesuffix("/health") + "/metrics"
        answer = self.http_get(url, timeout=5)[0]
        if answer.get("status") != 200:
            return None
        total = 0.0
        for line in answer["body"].splitlines():
            name = re.split(r"[{ ]", line, maxsplit=1)[0]
            if name in (m.VLLM_RUNNING, m.VLLM_WAITING):
                total += float(line.rsplit(" ", 1)[1])
        return int(total)

    def exists(self, path: Path, role: Role = "login") -> bool:
        return self.check(["test", "-e", str(path)], role).ok

    def sha256(self, path: Path, role: Role = "login") -> str | None:
        result = self.check(["sha256sum", str(path)], role)
        return result.stdout.split()[0] if result.ok and result.stdout.strip() else None

    def keys(self) -> list[dict[str, Any]]:
        result = self.check(self.runtime("keys", "list", "--json", "--store", str(self.layout.key_store)), "service")
        if result.failed:
            raise Exit(f"error: cannot read the key store {self.layout.key_store} on {self.where}: {_last_lines(result)}", EXIT_CHECK_FAILED)
        return jsonlib.loads(result.stdout)

    # ---- services -------------------------------------------------------------------------

    def _supervisorctl(self, *args: str) -> list[str]:
        return [self.facts.supervisorctl, "-c", str(self.layout.etc / SUPERVISOR_CONF), *args]

    def services(self) -> list[dict[str, Any]]:
        """Each service's name, state and pid, as the supervisor sees them."""
        if self.facts.supervisor == "supervisord":
            result = self.check(self._supervisorctl("status"))
            rows = []
            for line in result.stdout.splitlines():
                parts = line.split(None, 2)
                if len(parts) >= 2 and re.fullmatch(r"[A-Z]+", parts[1]):
                    detail = parts[2] if len(parts) > 2 else ""
                    pid = re.search(r"pid (\d+)", detail)
                    rows.append({"name": parts[0], "state": parts[1], "pid": int(pid.group(1)) if pid else 0, "detail": detail})
            if not rows:
                raise Exit(
                    f"error: supervisord of this stack does not answer on {self.where}: {_last_lines(result)}\n"
                    f"start the stack first: gpugate up --stack {self.facts.stack or 'S'}",
                    EXIT_CHECK_FAILED,
                )
            return rows
        units = [f"{unit}.service" for unit in SYSTEMD_UNITS]
        result = self.check(["systemctl", "show", "-p", "Id", "-p", "ActiveState", "-p", "SubState", "-p", "MainPID", *units])
        rows = []
        for block in result.stdout.strip().split("\n\n"):
            props = dict(line.split("=", 1) for line in block.splitlines() if "=" in line)
            if props.get("Id"):
                state = "RUNNING" if props.get("ActiveState") == "active" else props.get("ActiveState", "unknown").upper()
                name = props["Id"].removeprefix("gpugate-").removesuffix(".service")
                rows.append({"name": name, "state": state, "pid": int(props.get("MainPID") or 0), "detail": props.get("SubState", "")})
        if not rows:
            raise Exit(f"error: systemd does not answer on {self.where}: {_last_lines(result)}", EXIT_CHECK_FAILED)
        return rows

    def service(self, name: str) -> dict[str, Any]:
        found = next((s for s in self.services() if s["name"] == name), None)
        if found is None:
            raise Exit(f"error: no service {name!r} on {self.where}", EXIT_BAD_INPUT)
        return found

    def restart_argv(self, name: str) -> tuple[list[str], Role]:
        if self.facts.supervisor == "supervisord":
            return self._supervisorctl("restart", name), "login"
        return ["systemctl", "restart", f"gpugate-{name}.service"], "root"

    # ---- drain -------------------------------------------------------------------------------

    def drain_supported(self) -> bool:
        """The deployed Caddyfile checks the drain marker (bundles before the drain do not)."""
        caddyfile = self.layout.bundle_file(CADDYFILE)
        return self.check(["grep", "-qF", str(self.layout.drain_marker), str(caddyfile)]).ok

    def set_drain(self, reason: str) -> None:
        marker = self.layout.drain_marker
        content = jsonlib.dumps({"since": _now(), "by": reason}) + "\n"
        self.must(self.write(f"set the drain marker {marker}", marker, content, "service"), "setting the drain marker")

    def clear_drain(self) -> None:
        marker = self.layout.drain_marker
        self.must(self.change(f"remove the drain marker {marker}", ["rm", "-f", str(marker)], "service"), "removing the drain marker")


def say(message: str) -> None:
    # As written: rich would expand the tabs of a log line and wrap long ones.
    console.file.write(message + "\n")
    console.file.flush()


def found(message: str) -> None:
    say(f"found: {message}")


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _last_lines(result: Result, lines: int = 6) -> str:
    text = (result.stderr.strip() or result.stdout.strip()) if result is not None else ""
    return "\n".join(text.splitlines()[-lines:]) or f"exit {result.exited}"


def _mask(line: str) -> str:
    for pattern, replacement in KEY_LIKE:
        line = pattern.sub(replacement, line)
    return line


def _wait(predicate, timeout: float, interval: float = POLL_S) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


# ---- tasks ---------------------------------------------------------------------------------------


@task(auto_shortflags=False, help={"json": "print the report as JSON"})
def status(c, json=False):
    """Show the host's services, drain state, deployed bundle, last prober run and key counts; exit 1 unless healthy.

    Read-only. Healthy means every service runs, the prober's last run passed and the proxy is not draining.
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
    report = {
        "host": host.where, "stack": host.facts.stack, "bundle_sha256": bundle_sha, "services": services,
        "draining": draining, "prober_checked_at": run.get("checked_at"), "checks": checks, "keys": counts, "healthy": healthy,
    }  # fmt: skip
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
        say(f"keys: {counts['active']} active, {counts['expired']} expired, {counts['revoked']} revoked")
        say("healthy" if healthy else "NOT healthy")
    if not healthy:
        raise Exit(code=EXIT_CHECK_FAILED)


@task(
    auto_shortflags=False,
    help={
        "service": f"what to show: {', '.join(JSON_LOGS)} (metadata of each request) or a service's output: {', '.join(SERVICE_LOGS)}",
        "lines": f"how many of the last lines (1..{MAX_LOG_LINES})",
    },
)
def logs(c, service="access", lines=50):
    """Show the last lines of a log on the host, metadata only: no prompt, completion or key is ever shown.

    `access` (the default) prints time, key id, request id, method, path, status, milliseconds and bytes of each
    request, tab-separated; `authz` each auth decision; a service name its own output, with anything shaped like
    a key masked.
    """
    if service not in (*JSON_LOGS, *SERVICE_LOGS):
        raise Exit(f"error: no log {service!r}; choose one of: {', '.join((*JSON_LOGS, *SERVICE_LOGS))}", EXIT_BAD_INPUT)
    if not 1 <= lines <= MAX_LOG_LINES:
        raise Exit(f"error: --lines {lines} is out of range; allowed: 1..{MAX_LOG_LINES}", EXIT_BAD_INPUT)
    host = Host(c)
    host.env()
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
        raise Exit(f"error: cannot read the {service} log on {host.where}: {_last_lines(result)}", EXIT_CHECK_FAILED)
    raw = result.stdout.splitlines()
    if service not in JSON_LOGS:
        for line in raw:
            say(_mask(line))
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
    from gpugate_runtime.authz import ACCESS_LOG_IDS_FIELD  # noqa: PLC0415 - the access log's own field name

    key_id, _, request_id = str(entry.get(ACCESS_LOG_IDS_FIELD, "- -")).partition(" ")
    request = entry.get("request") or {}
    when = datetime.fromtimestamp(float(entry.get("ts", 0)), UTC).strftime("%Y-%m-%dT%H:%M:%S")
    path = str(request.get("uri", "")).split("?", 1)[0]
    return [when, key_id, request_id, str(request.get("method", "")), path, str(entry.get("status", "")),
            f"{float(entry.get('duration', 0)) * 1000:.1f}", str(entry.get("size", ""))]  # fmt: skip


@task(auto_shortflags=False, help={"off": "stop draining: serve the public API again"})
def drain(c, off=False):
    """Drain the gateway: the proxy answers 503 with Retry-After on the public API until `drain --off`.

    Requests already in flight finish. Idempotent: draining a draining host (or releasing a serving one)
    changes nothing. `restart` drains by itself; use this for longer maintenance.
    """
    host = Host(c)
    host.env()
    if not host.drain_supported():
        raise Exit(
            f"error: the deployed Caddyfile on {host.where} does not check the drain marker (an older bundle); deploy the current bundle first",
            EXIT_CHECK_FAILED,
        )
    marker = host.layout.drain_marker
    draining = host.exists(marker)
    found(f"the proxy is {'draining' if draining else 'serving'} (marker {marker} {'present' if draining else 'absent'})")
    if off:
        if not draining:
            say("not draining: nothing to do")
            return
        host.clear_drain()
    else:
        if draining:
            say("already draining: nothing to do")
            return
        host.set_drain("gpugate run drain")
    if host.dry_run:
        return
    answer = host.public_get("/healthz")[0]
    want = 200 if off else 503
    if answer.get("status") == want:
        say(f"✓ the proxy answers {want} on /healthz" + (f" with Retry-After: {answer.get('retry_after')}" if not off else ""))
    else:
        say(f"warning: /healthz through the public URL answered {answer.get('status') or answer.get('error')}, expected {want}")


@task(
    auto_shortflags=False,
    help={
        "service": f"which service: {', '.join(RESTARTABLE)} (vllm is drained first)",
        "drain_timeout": "seconds to let requests in flight finish before vLLM restarts",
        "timeout": "seconds to wait for the service to be healthy again",
    },
)
def restart(c, service="vllm", drain_timeout=60.0, timeout=900.0):
    """Restart a service; for vLLM drain first (503 + Retry-After), restart, wait until healthy, then serve again.

    Checks first that the service exists and that the deployed proxy can drain. While vLLM restarts clients get
    503 with Retry-After, never a refused connection; requests in flight get up to --drain-timeout to finish.
    Done when vLLM's /health answers and the prober's checks pass through the public URL. Safe to re-run.
    """
    if service not in RESTARTABLE:
        hint = " (Caddy: use reload-proxy, it reloads without dropping connections)" if service == "caddy" else ""
        raise Exit(f"error: cannot restart {service!r}; choose one of: {', '.join(RESTARTABLE)}{hint}", EXIT_BAD_INPUT)
    host = Host(c)
    host.env()
    before = host.service(service)
    found(f"{service} is {before['state']} (pid {before['pid'] or '-'})")
    drains = service == "vllm"
    already_draining = False
    if drains:
        if not host.drain_supported():
            raise Exit(
                f"error: the deployed Caddyfile on {host.where} cannot drain (an older bundle): a restart would drop requests; deploy the current bundle first",
                EXIT_CHECK_FAILED,
            )
        already_draining = host.exists(host.layout.drain_marker)
        found(f"in flight in vLLM: {host.vllm_in_flight()}; proxy {'already draining (left so afterwards)' if already_draining else 'serving'}")
    argv, role = host.restart_argv(service)
    if host.dry_run:
        if drains and not already_draining:
            host.set_drain("gpugate run restart")
            say(f"would wait up to {drain_timeout:g} s for vLLM's requests in flight to finish")
        host.change(f"restart {service}", argv, role)
        say(f"would wait up to {timeout:g} s until {service} is healthy and the prober's checks pass")
        if drains and not already_draining:
            host.clear_drain()
        return
    started = time.monotonic()
    try:
        if drains:
            if not already_draining:
                host.set_drain("gpugate run restart")
            answer = host.public_get("/healthz")[0]
            if answer.get("status") != 503:
                raise Exit(
                    f"error: the drain marker is set but the proxy still answers {answer.get('status') or answer.get('error')} on /healthz; "
                    f"not restarting (can Caddy's user see {host.layout.drain_marker}?)",
                    EXIT_CHECK_FAILED,
                )
            say(f"✓ draining: the proxy answers 503 with Retry-After: {answer.get('retry_after')}")
            if _wait(lambda: host.vllm_in_flight() in (0, None), drain_timeout):
                say("✓ no request in flight")
            else:
                say(f"warning: {host.vllm_in_flight()} request(s) still in flight after {drain_timeout:g} s; restarting anyway")
        host.must(host.change(f"restart {service}", argv, role, timeout=timeout), f"restarting {service}")
        remaining = lambda: max(1.0, timeout - (time.monotonic() - started))  # noqa: E731
        if service == "vllm":
            if not _wait(host.vllm_health, remaining()):
                raise Exit(f"error: vLLM did not answer /health within {timeout:g} s; see `gpugate run logs --service vllm`", EXIT_CHECK_FAILED)
            say(f"✓ vLLM answers /health after {time.monotonic() - started:.0f} s")
        elif not _wait(lambda: host.service(service)["state"] == "RUNNING", remaining()):
            raise Exit(f"error: {service} is not running {timeout:g} s after the restart", EXIT_CHECK_FAILED)
    finally:
        if drains and not already_draining and not host.dry_run:
            host.clear_drain()
    after = host.service(service)
    probe = lambda: host.check(host.runtime("prober", "status", "--json"), "root", timeout=120).ok  # noqa: E731
    if already_draining:
        say("the proxy stays drained as it was before; `gpugate run drain --off` serves again")
    elif not _wait(probe, max(30.0, timeout - (time.monotonic() - started)), interval=2):
        raise Exit(f"error: {service} restarted (pid {after['pid']}) but the prober's checks still fail; see `gpugate run status`", EXIT_CHECK_FAILED)
    say(f"✓ {service} restarted: pid {before['pid'] or '-'} → {after['pid']}, healthy after {time.monotonic() - started:.0f} s")


@task(
    auto_shortflags=False,
    help={
        "name": "the key name to rotate (see `status` or `gpugate-runtime keys list`)",
        "overlap": "how long the old key stays valid, e.g. 24h (default: the stack's rotation overlap)",
        "expires": "validity of the new key, e.g. 90d (default: the stack's)",
    },
)
def rotate_key(c, name, overlap="", expires=""):
    """Issue a new key for NAME and print it once; NAME's old key keeps working until the overlap ends.

    Checks first that NAME has an active key. Nothing restarts: authz reloads the key store within a second.
    Each run issues a new key (a key is shown only once, so a rerun cannot repeat it); the old key's expiry only
    ever moves earlier, so a second run is safe.
    """
    if not re.fullmatch(NAME_PATTERN, name):
        raise Exit(f"error: {name!r} is not a key name; allowed: {NAME_RULE}", EXIT_BAD_INPUT)
    for option, value in (("--overlap", overlap), ("--expires", expires)):
        if value:
            try:
                parse_duration(value, allow_zero=option == "--overlap")
            except ValueError as exc:
                raise Exit(f"error: {option}: {exc}", EXIT_BAD_INPUT) from None
    host = Host(c)
    host.env()
    active = [k for k in host.keys() if k["name"] == name and k["status"] == "active"]
    if not active:
        raise Exit(f"error: {name!r} has no active key on {host.where}; create one with `gpugate-runtime keys create {name}`", EXIT_BAD_INPUT)
    found(f"{name} has {len(active)} active key(s): " + ", ".join(f"{k['id']} (expires {k['expires_at']})" for k in active))
    argv = host.runtime("keys", "rotate", name, "--json", "--store", str(host.layout.key_store))
    argv += [*(["--overlap", overlap] if overlap else []), *(["--expires", expires] if expires else [])]
    result = host.change(f"issue a new key for {name}", argv, "service")
    if result is None:
        return None
    host.must(result, f"rotating {name}")
    issued = jsonlib.loads(result.stdout)
    say(f"✓ rotated {name}: new key {issued['id']}, expires {issued['expires_at']}")
    for key_id, until in sorted(issued.get("retiring", {}).items()):
        say(f"  old key {key_id} stays valid until {until}")
    say("The new key is shown only now; store it in a secret manager:")
    say(issued["key"])
    return issued["key"]


@task(auto_shortflags=False, help={"key": "the key id (12 hex digits), or the leaked key itself (only its id is used)"})
def revoke_key(c, key):
    """Revoke a key now; authz rejects it within a second. Give its id, or the leaked key itself.

    Checks first that the key exists; revoking a revoked key changes nothing. A full key never leaves this
    machine: only its id is sent to the host.
    """
    key_id = key_id_of(key) or key
    if not re.fullmatch(rf"[0-9a-f]{{{ID_HEX}}}", key_id):
        raise Exit(f"error: {'that' if key.startswith('ggk_') else repr(key)} is neither a key id ({ID_HEX} hex digits) nor a gpugate key", EXIT_BAD_INPUT)
    host = Host(c)
    host.env()
    record = next((k for k in host.keys() if k["id"] == key_id), None)
    if record is None:
        raise Exit(f"error: no key with id {key_id} on {host.where}", EXIT_BAD_INPUT)
    found(f"key {key_id} ({record['name']}) is {record['status']}")
    if record.get("revoked_at"):
        say(f"already revoked at {record['revoked_at']}: nothing to do")
        return
    argv = host.runtime("keys", "revoke", key_id, "--json", "--store", str(host.layout.key_store))
    result = host.change(f"revoke key {key_id} ({record['name']})", argv, "service")
    if result is None:
        return
    host.must(result, f"revoking {key_id}")
    revoked = jsonlib.loads(result.stdout)
    say(f"✓ key {key_id} ({record['name']}) revoked at {revoked['revoked_at']}; authz rejects it within a second")


@task(auto_shortflags=False, help={"caddyfile": "a Caddyfile on this machine to install (e.g. from `gpugate render`); default: reload the deployed one"})
def reload_proxy(c, caddyfile=""):
    """Validate a Caddyfile with `caddy validate`, swap it in atomically and reload Caddy without dropping connections.

    A Caddyfile that fails validation never replaces the deployed one. The one it replaces is kept as
    Caddyfile.previous and put back if Caddy refuses the new config or the gateway stops answering after the
    reload. Without --caddyfile the deployed Caddyfile is validated and reloaded (idempotent).
    """
    new_text = None
    if caddyfile:
        try:
            new_text = Path(caddyfile).read_text()
        except OSError as exc:
            raise Exit(f"error: cannot read {caddyfile}: {exc.strerror}", EXIT_BAD_INPUT) from None
    host = Host(c)
    host.env()
    deployed = host.layout.bundle_file(CADDYFILE)
    candidate = deployed.with_name(".Caddyfile.candidate")
    previous = deployed.with_name("Caddyfile.previous")
    socket = host.layout.caddy_admin_socket
    deployed_sha = host.sha256(deployed)
    if deployed_sha is None:
        raise Exit(f"error: no Caddyfile at {deployed} on {host.where}", EXIT_CHECK_FAILED)
    if not host.check(["test", "-S", str(socket)], "caddy").ok:
        raise Exit(
            f"error: Caddy's admin socket {socket} is missing on {host.where}: Caddy is down, or runs a bundle without it "
            "(restart Caddy once to load the current bundle)",
            EXIT_CHECK_FAILED,
        )
    found(f"deployed Caddyfile {deployed} (sha256 {deployed_sha[:12]}); Caddy's admin socket {socket}")
    reload_argv = [host.facts.caddy, "reload", "--config", str(deployed), "--adapter", "caddyfile", "--address", f"unix/{socket}"]
    if new_text is None:
        valid = host.check([host.facts.caddy, "validate", "--config", str(deployed), "--adapter", "caddyfile"], "caddy")
        if valid.failed:
            raise Exit(f"error: the deployed Caddyfile is invalid; Caddy keeps running its loaded config:\n{_caddy_error(valid)}", EXIT_CHECK_FAILED)
        found("the deployed Caddyfile is valid")
        host.must(host.change("reload Caddy with the deployed Caddyfile", reload_argv, "caddy"), "reloading Caddy")
        if not host.dry_run:
            _verify_proxy(host)
        return
    new_sha = hashlib.sha256(new_text.encode()).hexdigest()
    found(f"candidate {caddyfile} (sha256 {new_sha[:12]}){' is identical to the deployed one' if new_sha == deployed_sha else ''}")
    if host.dry_run:
        say(f"would upload {caddyfile} to {candidate} and check it:\n    $ {host.command([host.facts.caddy, 'validate', '--config', str(candidate), '--adapter', 'caddyfile'], 'caddy')}")
        say(f"would keep {deployed} as {previous}, move {candidate} onto {deployed}, then:\n    $ {host.command(reload_argv, 'caddy')}")
        say(f"on failure would put {previous} back and reload it")
        return
    host.must(host.write(f"upload the candidate to {candidate}", candidate, new_text, "root"), "uploading the candidate")
    valid = host.check([host.facts.caddy, "validate", "--config", str(candidate), "--adapter", "caddyfile"], "caddy")
    if valid.failed:
        host.check(["rm", "-f", str(candidate)], "root")
        raise Exit(f"error: refused: caddy validate rejects {caddyfile}; the deployed Caddyfile is unchanged:\n{_caddy_error(valid)}", EXIT_CHECK_FAILED)
    say("✓ caddy validate accepts the candidate")
    if new_sha != deployed_sha:
        keep = f"cp -p {shlex.quote(str(deployed))} {shlex.quote(str(previous))}.tmp && mv {shlex.quote(str(previous))}.tmp {shlex.quote(str(previous))}"
        host.must(host.change(f"keep the deployed Caddyfile as {previous}", ["sh", "-c", keep], "root"), "keeping the previous Caddyfile")
    host.must(host.change(f"move the candidate onto {deployed}", ["mv", str(candidate), str(deployed)], "root"), "swapping in the candidate")
    reloaded = host.change("reload Caddy", reload_argv, "caddy")
    problem = f"Caddy refused the new config: {_caddy_error(reloaded)}" if reloaded is not None and reloaded.failed else None
    if problem is None and not _verify_proxy(host, strict=False):
        problem = "the gateway did not answer every connection on /healthz after the reload"
    if problem is None:
        say(f"✓ Caddy runs the new Caddyfile; the one before is kept at {previous}")
        return
    say(f"✗ {problem}")
    if new_sha != deployed_sha:
        restore = f"cp -p {shlex.quote(str(previous))} {shlex.quote(str(deployed))}.tmp && mv {shlex.quote(str(deployed))}.tmp {shlex.quote(str(deployed))}"
        host.must(host.change(f"put {previous} back", ["sh", "-c", restore], "root"), "restoring the previous Caddyfile")
        if reloaded is not None and reloaded.ok:
            host.must(host.change("reload Caddy with the previous Caddyfile", reload_argv, "caddy"), "reloading the previous Caddyfile")
    how = "Caddy serves it"
    if not _verify_proxy(host, strict=False):
        # Seen with Caddy 2.6.2: a config that fails to load leaves its listeners open beside the good ones, and
        # about half of the new connections then fail their TLS handshake; no reload closes them, a restart does.
        argv, role = host.restart_argv("caddy")
        host.must(host.change("restart Caddy with the previous Caddyfile (its listeners are damaged)", argv, role), "restarting Caddy")
        _verify_proxy(host)
        how = "Caddy was restarted with it, since the failed load had left its listeners damaged"
    raise Exit(f"error: rolled back: {problem}\nthe previous Caddyfile is in place again and {how}", EXIT_CHECK_FAILED)


def _caddy_error(result: Result) -> str:
    lines = [line for line in (result.stderr + result.stdout).splitlines() if line.startswith("Error:")]
    return "\n".join(lines[-3:]) or _last_lines(result)


def _verify_proxy(host: Host, strict: bool = True) -> bool:
    """Every one of VERIFY_CONNECTIONS fresh connections gets /healthz through the public URL (503 while draining)."""
    draining = host.exists(host.layout.drain_marker)
    want = 503 if draining else 200
    seen: list[Any] = []

    def all_answer() -> bool:
        answers = host.public_get("/healthz", count=VERIFY_CONNECTIONS)
        seen[:] = [a.get("status") or a.get("error") for a in answers]
        return all(a.get("status") == want for a in answers)

    ok = _wait(all_answer, VERIFY_TIMEOUT_S)
    if ok:
        say(f"✓ the gateway answers {want} on /healthz to {VERIFY_CONNECTIONS} new connections{' (draining)' if draining else ''}")
    elif strict:
        raise Exit(f"error: the gateway does not answer {want} on /healthz on every new connection: {seen}", EXIT_CHECK_FAILED)
    else:
        say(f"✗ /healthz on {VERIFY_CONNECTIONS} new connections: {sorted(set(map(str, seen)))}")
    return ok

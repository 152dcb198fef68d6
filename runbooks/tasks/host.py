"""A gateway host as the runbook tasks see it over one SSH connection: facts, commands, services, drain."""

from __future__ import annotations

import base64
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
from fabric import Connection
from gpugate_runtime.contract import metrics as m
from gpugate_runtime.contract.exits import ExitCode
from gpugate_runtime.contract.host import CADDYFILE, VM_RUNTIME_PYTHON, HostLayout, tier_launch_spec
from gpugate_runtime.contract.services import (
    AUTHZ,
    CADDY_SERVICE,
    LOCAL_ONLY,
    NAMES,
    VLLM,
    tier_service,
    unit_name,
)
from gpugate_runtime.keys import ID_HEX
from gpugate_runtime.prober_settings import ProberSettings
from gpugate_runtime.routehealth import RouteHealth, route_health
from gpugate_runtime.router_settings import RouterSettings
from invoke.exceptions import CommandTimedOut, Exit
from invoke.runners import Result
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from rich.console import Console

from gpugate.local.supervisord import SUPERVISOR_CONF

EXIT_CHECK_FAILED, EXIT_BAD_INPUT = ExitCode.CHECK_FAILED, ExitCode.BAD_INPUT

# Logs of one host: the two JSON logs the runtime writes, then each service's own output (authz's
# output is apart from its decision log), then supervisord's own on a local stack.
JSON_LOGS = ("access", "authz")
AUTHZ_OUTPUT = f"{AUTHZ}-output"
SUPERVISORD_LOG = "supervisord"
# An extra tier's launch spec in the deployed bundle (vllm/launch-<tier>.json): the host's tiers are read from these.
_TIER_DIR, _TIER_FILE = tier_launch_spec("\0").rsplit("/", 1)
_TIER_PREFIX, _TIER_SUFFIX = _TIER_FILE.split("\0")


def restartable(names: Sequence[str]) -> tuple[str, ...]:
    """Services `restart` may restart; Caddy is reloaded (`reload-proxy`), never restarted under traffic."""
    return tuple(name for name in names if name != CADDY_SERVICE)


def service_logs(names: Sequence[str]) -> tuple[str, ...]:
    """The service outputs `logs` shows for these services (authz's output apart from its decision log), and supervisord's."""
    return (*(AUTHZ_OUTPUT if name == AUTHZ else name for name in names), SUPERVISORD_LOG)


def with_tiers(tiers: Sequence[str]) -> tuple[str, ...]:
    """The service names of a host with these extra tiers, in the service table's order: each tier's vLLM after the first."""
    return (VLLM, *(tier_service(t) for t in tiers), *(name for name in NAMES if name != VLLM))


def tiers_in(listing: str) -> tuple[str, ...]:
    """The tiers whose launch spec is in a listing (`ls -1`) of the bundle's vLLM directory."""
    names = (n for n in listing.split() if n.startswith(_TIER_PREFIX) and n.endswith(_TIER_SUFFIX))
    return tuple(sorted(n[len(_TIER_PREFIX) : -len(_TIER_SUFFIX)] for n in names if len(n) > len(_TIER_PREFIX + _TIER_SUFFIX)))


# Without a host (help texts, checks before connecting): the services of a stack without tiers.
RESTARTABLE = restartable(NAMES)
SERVICE_LOGS = service_logs(NAMES)
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
    python: str = Field(str(VM_RUNTIME_PYTHON), description="the host's interpreter with gpugate-runtime")
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
        self._tiers: tuple[str, ...] | None = None

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
            raise Exit(f"error: {what} failed on {self.where}: {last_lines(result)}", EXIT_CHECK_FAILED)

    # ---- facts about the host -----------------------------------------------------------

    def env(self) -> dict[str, str]:
        """The deployed runtime env file (settings only; secrets are files): also proves a bundle is there."""
        if self._env is None:
            result = self.check(["cat", str(self.layout.runtime_env)])
            if result.failed:
                raise Exit(
                    f"error: no gpugate bundle on {self.where}: {self.layout.runtime_env}: {last_lines(result)}\n"
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
            return [{"error": last_lines(result) or "no answer"}]

    def public_get(self, path: str, timeout: float = 5, count: int = 1) -> list[dict[str, Any]]:
        """GET through the public URL, trusting what the prober trusts."""
        settings = self.prober()
        return self.http_get(settings.public_base + path, timeout, settings.ca_file, count)

    def tiers(self) -> tuple[str, ...]:
        """The stack's extra model tiers (each a `vllm-<tier>` service), from the deployed bundle's launch specs."""
        if self._tiers is None:
            self._tiers = tiers_in(self.check(["ls", "-1", str(self.layout.bundle_file(_TIER_DIR))]).stdout)
        return self._tiers

    def names(self) -> tuple[str, ...]:
        """This host's services by name: the service table's, with a `vllm-<tier>` for each extra tier."""
        return with_tiers(self.tiers())

    def vllm_health(self, service: str = VLLM) -> bool:
        """Whether a vLLM (the first model's, or `vllm-<tier>`) answers /health on its loopback port."""
        if service == VLLM:
            url = str(self.prober().vllm_health_url)
        else:
            spec = self.check(["cat", str(self.layout.bundle_file(tier_launch_spec(service.removeprefix(f"{VLLM}-"))))])
            try:
                url = f"http://127.0.0.1:{int(jsonlib.loads(spec.stdout)['port'])}/health"
            except (ValueError, KeyError):
                return False
        return self.http_get(url, timeout=3)[0].get("status") == 200

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

    def router_port(self) -> int | None:
        """The router's loopback port from the deployed env file; None on a stack that does not route."""
        port = self.env().get(f"{RouterSettings.model_config['env_prefix']}PORT")
        return int(port) if port else None

    def route_health(self) -> list[RouteHealth] | None:
        """Each tier's and provider's state from the router's /metrics; None when the router does not answer."""
        answer = self.http_get(f"http://127.0.0.1:{self.router_port()}/metrics", timeout=5)[0]
        return route_health(answer["body"], time.time()) if answer.get("status") == 200 else None

    def exists(self, path: Path, role: Role = "login") -> bool:
        return self.check(["test", "-e", str(path)], role).ok

    def sha256(self, path: Path, role: Role = "login") -> str | None:
        result = self.check(["sha256sum", str(path)], role)
        return result.stdout.split()[0] if result.ok and result.stdout.strip() else None

    def keys(self) -> list[dict[str, Any]]:
        result = self.check(self.runtime("keys", "list", "--json", "--store", str(self.layout.key_store)), "service")
        if result.failed:
            raise Exit(f"error: cannot read the key store {self.layout.key_store} on {self.where}: {last_lines(result)}", EXIT_CHECK_FAILED)
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
                    f"error: supervisord of this stack does not answer on {self.where}: {last_lines(result)}\n"
                    f"start the stack first: gpugate up --stack {self.facts.stack or 'S'}",
                    EXIT_CHECK_FAILED,
                )
            return rows
        units = [f"{unit_name(name)}.service" for name in self.names() if name not in LOCAL_ONLY]
        result = self.check(
            ["systemctl", "show", "-p", "Id", "-p", "LoadState", "-p", "ActiveState", "-p", "SubState", "-p", "MainPID", *units]
        )
        rows = []
        for block in result.stdout.strip().split("\n\n"):
            props = dict(line.split("=", 1) for line in block.splitlines() if "=" in line)
            # A service this stack does not run (the router without tiers or providers) has no unit file.
            if props.get("Id") and props.get("LoadState") != "not-found":
                state = "RUNNING" if props.get("ActiveState") == "active" else props.get("ActiveState", "unknown").upper()
                name = props["Id"].removeprefix(unit_name("")).removesuffix(".service")
                rows.append({"name": name, "state": state, "pid": int(props.get("MainPID") or 0), "detail": props.get("SubState", "")})
        if not rows:
            raise Exit(f"error: systemd does not answer on {self.where}: {last_lines(result)}", EXIT_CHECK_FAILED)
        return rows

    def service(self, name: str) -> dict[str, Any]:
        found = next((s for s in self.services() if s["name"] == name), None)
        if found is None:
            raise Exit(f"error: no service {name!r} on {self.where}", EXIT_BAD_INPUT)
        return found

    def restart_argv(self, name: str) -> tuple[list[str], Role]:
        if self.facts.supervisor == "supervisord":
            return self._supervisorctl("restart", name), "login"
        return ["systemctl", "restart", f"{unit_name(name)}.service"], "root"

    # ---- drain -------------------------------------------------------------------------------

    def drain_supported(self) -> bool:
        """The deployed Caddyfile checks the drain marker (bundles before the drain do not)."""
        caddyfile = self.layout.bundle_file(CADDYFILE)
        return self.check(["grep", "-qF", str(self.layout.drain_marker), str(caddyfile)]).ok

    def set_drain(self, reason: str) -> None:
        marker = self.layout.drain_marker
        content = jsonlib.dumps({"since": now(), "by": reason}) + "\n"
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


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def last_lines(result: Result, lines: int = 6) -> str:
    text = (result.stderr.strip() or result.stdout.strip()) if result is not None else ""
    return "\n".join(text.splitlines()[-lines:]) or f"exit {result.exited}"


def mask(line: str) -> str:
    for pattern, replacement in KEY_LIKE:
        line = pattern.sub(replacement, line)
    return line


def wait_for(predicate, timeout: float, interval: float = POLL_S) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)

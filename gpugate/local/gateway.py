"""The local gateway's lifecycle: up, down, status and logs of a `local`-target stack under supervisord."""

from __future__ import annotations

import errno
import json
import logging
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import xmlrpc.client
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import httpx
from gpugate_runtime.contract.host import HostLayout, Ports
from gpugate_runtime.contract.services import ROUTER, SUPERVISOR_UMASK, services
from gpugate_runtime.keys import KeyInputError, KeyStoreError, create_key, read_store, utcnow
from gpugate_runtime.routehealth import RouteHealth, route_health
from gpugate_runtime.settings import KeysSettings
from supervisor.xmlrpc import SupervisorTransport

from gpugate.local.bundle import local_facts, local_layout, render_local
from gpugate.local.model import ensure_model
from gpugate.local.providerkeys import ProviderKeyMissing, install_provider_keys, provider_key_env, write_secret
from gpugate.local.supervisord import SUPERVISOR_CONF
from gpugate.local.vllm_env import LocalEnvError, ensure_vllm_venv
from gpugate.render.bundle import MANIFEST, write_bundle
from gpugate.render.settings import keys_settings, public_url
from gpugate.spec import Target
from gpugate.stackfile import Stack

log = logging.getLogger(__name__)

# Debian packages the local stack runs, by the command each provides.
SYSTEM_COMMANDS = {"caddy": "caddy", "prometheus": "prometheus", "prometheus-alertmanager": "prometheus-alertmanager"}
PROBER_KEY_NAME = "prober"
FIRST_READY_TIMEOUT_S = 600
READY_TIMEOUT_S = 300
LOG_TAIL_LINES = 20


class LocalStackError(Exception):
    """Something stopped `gpugate up`; says what failed, shows the evidence and what to do. `bad_input`: the
    stack or its inputs are wrong (exit 2), not something that failed while running (exit 1)."""

    def __init__(self, what: str, evidence: str = "", todo: str = "", bad_input: bool = False):
        self.what, self.evidence, self.todo, self.bad_input = what, evidence, todo, bad_input
        super().__init__(what)


@dataclass
class UpResult:
    started: bool  # False: it was already running with this bundle (no-op)
    restarted: list[str] = field(default_factory=list)
    url: str = ""
    ca_file: Path | None = None
    client_key: str | None = None  # shown once, only when created by this `up` (first start, or asked for)
    client_key_id: str | None = None
    seconds: float = 0.0


def tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - 64 * 1024))
            return "\n".join(handle.read().decode(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class LocalGateway:
    """One `local`-target stack on this machine."""

    def __init__(self, stack: Stack, layout: HostLayout | None = None):
        if stack.spec.target is not Target.LOCAL:
            raise LocalStackError(
                f"stack {stack.name!r} targets {stack.spec.target}, not local",
                todo=f"use `pulumi up -s {stack.name}` for cloud stacks; `gpugate up` runs stacks whose gpugate:target is local",
            )
        self.stack = stack
        self.spec = stack.spec
        self.layout = layout or local_layout(stack)
        self.table = services(local_facts(stack, self.layout))
        self.ports = Ports(self.spec.ports.internal_base)
        self.conf = self.layout.etc / SUPERVISOR_CONF
        self.bin_dir = Path(sys.executable).parent

    # ---- facts -------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return public_url(self.spec)

    @property
    def ca_file(self) -> Path:
        return self.layout.local_ca_file

    @property
    def socket_path(self) -> Path:
        return self.layout.state / "supervisor.sock"

    @property
    def pidfile(self) -> Path:
        return self.layout.state / "supervisord.pid"

    def log_file(self, program: str) -> Path:
        return self.layout.logs / f"{program}.log"

    def supervisor(self):
        transport = SupervisorTransport(None, None, f"unix://{self.socket_path}")
        return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)

    def supervisord_pid(self) -> int | None:
        try:
            pid = int(self.pidfile.read_text().strip())
            os.kill(pid, 0)
            return pid
        except (OSError, ValueError):
            return None

    def running(self) -> bool:
        if self.supervisord_pid() is None:
            return False
        try:
            return self.supervisor().supervisor.getState()["statename"] == "RUNNING"
        except (OSError, xmlrpc.client.Fault):
            return False

    def processes(self) -> list[dict]:
        if not self.running():
            return []
        return list(self.supervisor().supervisor.getAllProcessInfo())

    # ---- up ----------------------------------------------------------------------------

    def up(self, progress: Callable[[str], None] = lambda s: None, *, new_key: bool = False) -> UpResult:
        """Start or update the stack. A client key is issued on its first start (no active client key in its
        store) or when `new_key` asks for one; otherwise keys are `gpugate keys`' business."""
        start = time.monotonic()
        keys_changed = self._install_provider_keys()
        progress("checking system packages (Caddy, Prometheus, Alertmanager)")
        ensure_system_packages()
        progress("preparing vLLM (CPU build) and the model — first run installs ~3.5 GB, later runs are instant")
        try:
            python = ensure_vllm_venv()
            model_dir = ensure_model(python=python)
        except LocalEnvError as err:
            raise LocalStackError("installing the local vLLM toolchain failed", str(err), "check disk space and the registry, then run `gpugate up` again") from None

        bundle = render_local(self.stack, self.layout, model_dir)
        changed = self._changed_files(bundle.files)
        was_running = self.running()
        if was_running and not changed and not keys_changed:
            self._wait_ready(progress, READY_TIMEOUT_S)
            result = UpResult(started=False, url=self.url, ca_file=self.ca_file)
            self._issue_client_key(result, new_key)
            result.seconds = time.monotonic() - start
            return result

        if not was_running:
            self._check_ports_free()
        self._prepare_dirs_and_secrets()
        progress(f"writing the bundle ({len(bundle.files)} files, sha256 {bundle.bundle_sha256[:12]}) to {self.layout.etc}")
        write_bundle(bundle, self.layout.etc)

        restarted: list[str] = []
        if not was_running:
            progress("starting services under supervisord")
            self._start_supervisord()
        else:
            # The router reads each provider's key once: a new key on file takes a restart.
            restarted = self._apply_changes(changed, {ROUTER} if keys_changed else set())
            why = f"{len(changed)} changed file(s)" + (f" and the key of {', '.join(keys_changed)}" if keys_changed else "")
            progress(f"restarted {', '.join(restarted) or 'nothing'} for {why}")

        self._ensure_prober_key()
        try:
            self._wait_ready(progress, FIRST_READY_TIMEOUT_S if not was_running else READY_TIMEOUT_S)
        except LocalStackError:
            if not was_running:
                self.down()  # nothing is left half-running
            raise
        result = UpResult(started=not was_running, restarted=restarted, url=self.url, ca_file=self.ca_file)
        self._issue_client_key(result, new_key)
        result.seconds = time.monotonic() - start
        return result

    def _changed_files(self, files: dict[str, bytes]) -> set[str]:
        try:
            deployed = json.loads((self.layout.etc / MANIFEST).read_text())["files"]
        except (OSError, ValueError, KeyError):
            return set(files)
        current = json.loads(files[MANIFEST])["files"]
        return {p for p in set(current) | set(deployed) if current.get(p) != deployed.get(p)}

    def _apply_changes(self, changed: set[str], also: set[str]) -> list[str]:
        """Restart the services that read a changed bundle file, and those named in `also`."""
        ctl = [str(self.bin_dir / "supervisorctl"), "-c", str(self.conf)]
        restart: set[str] = set(also)
        if SUPERVISOR_CONF in changed:
            # `update` restarts exactly the programs whose definitions changed.
            subprocess.run([*ctl, "update"], check=False, capture_output=True, text=True, timeout=120)
        for path in changed:
            restart.update(s.name for s in self.table if any(path.startswith(prefix) for prefix in s.reads))
        known = {p["name"] for p in self.processes()}
        restart &= known
        if restart:
            subprocess.run([*ctl, "restart", *sorted(restart)], check=False, capture_output=True, text=True, timeout=300)
        return sorted(restart)

    def _check_ports_free(self) -> None:
        busy = []
        for service in self.table:
            for listen in service.listens:
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    try:
                        sock.bind((listen.address or "0.0.0.0", listen.port))
                    except OSError as err:
                        if err.errno == errno.EADDRINUSE:
                            busy.append(f"port {listen.port} ({service.name} {listen.name}) is in use{_who_listens(listen.port)}")
                        else:
                            raise
        if busy:
            raise LocalStackError(
                "ports the local stack needs are busy",
                "\n".join(busy),
                f"stop what uses them, or change gpugate:ports (https, http, internal_base) in {self.stack.path.name}",
            )

    def _install_provider_keys(self) -> list[str]:
        """Each external provider's key from the environment to its file (see gpugate/local/providerkeys.py),
        checked before anything is installed or started; returns the providers whose key changed."""
        try:
            return install_provider_keys(self.spec.providers, self.layout, self.stack.name, os.environ)
        except ProviderKeyMissing as err:
            raise LocalStackError(
                str(err),
                "\n".join(err.lines),
                f"a provider's key is never in the stack file in plain text; give it in {', '.join(map(provider_key_env, err.providers))}",
                bad_input=True,
            ) from None

    def _prepare_dirs_and_secrets(self) -> None:
        for directory in (self.layout.state, self.layout.logs, self.layout.etc, self.layout.caddy_storage):
            directory.mkdir(parents=True, exist_ok=True)
        self.layout.secrets.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.layout.secrets, 0o700)
        if not self.layout.vllm_key_file.exists():
            write_secret(self.layout.vllm_key_file, secrets.token_urlsafe(32))

    def _start_supervisord(self) -> None:
        # supervisord opens its own log before it applies the umask= of its config: start it under that umask.
        proc = subprocess.run(
            [str(self.bin_dir / "supervisord"), "-c", str(self.conf)], capture_output=True, text=True, timeout=60,
            umask=SUPERVISOR_UMASK,
        )
        if proc.returncode != 0:
            raise LocalStackError("supervisord did not start", proc.stdout + proc.stderr, "see the message above")
        deadline = time.monotonic() + 30
        while not self.running():
            if time.monotonic() > deadline:
                raise LocalStackError("supervisord did not come up", tail(self.layout.logs / "supervisord.log"))
            time.sleep(0.2)

    def keys_settings(self) -> KeysSettings:
        """The `keys` settings this stack's env file gives its host commands (its store, its expiry and overlap)."""
        return keys_settings(self.spec, self.layout.key_store)

    def create_key(self, name: str) -> tuple[str, str]:
        """A new client key in this stack's store: (plaintext shown once, key id)."""
        settings = self.keys_settings()
        try:
            issued = create_key(settings.store, name, expires=timedelta(days=settings.expires_days))
        except (KeyInputError, KeyStoreError) as err:
            raise LocalStackError(f"creating the client key {name!r} failed", str(err)) from None
        return issued.token, issued.record.id

    def active_client_keys(self) -> int:
        """How many keys other than the prober's own are active in the store."""
        try:
            keys = read_store(self.layout.key_store).keys
        except KeyStoreError as err:
            raise LocalStackError("the key store cannot be read", str(err), f"fix or move {self.layout.key_store}") from None
        now = utcnow()
        return sum(1 for k in keys if k.name != PROBER_KEY_NAME and k.status(now) == "active")

    def _issue_client_key(self, result: UpResult, new_key: bool) -> None:
        # Only the first start (or an explicit ask) mints: each key is shown once, so minting on every
        # restart would leave a trail of active keys nobody holds.
        if new_key or self.active_client_keys() == 0:
            result.client_key, result.client_key_id = self.create_key(f"quickstart-{time.strftime('%Y%m%d-%H%M%S')}")

    def _ensure_prober_key(self) -> None:
        if self.layout.prober_key_file.exists():
            return
        key, _ = self.create_key(PROBER_KEY_NAME)
        write_secret(self.layout.prober_key_file, key)

    def _wait_ready(self, progress: Callable[[str], None], timeout: float) -> None:
        """Wait until every program runs and the prober reports every applicable check green."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            failed = [p for p in self.processes() if p["statename"] == "FATAL"]
            if failed:
                name = failed[0]["name"]
                raise LocalStackError(
                    f"service {name} failed to start ({failed[0]['statename']})",
                    tail(self.log_file(name)),
                    f"fix what the log says, then `gpugate up` again; full log: gpugate logs {name}",
                )
            checks = self.probe_status()
            waiting = [c["check"] for c in checks if c.get("ok") is False] if checks else ["prober"]
            message = "waiting for: " + ", ".join(waiting) if waiting else "all checks green"
            if message != last:
                progress(message)
                last = message
            if checks and not waiting:
                return
            time.sleep(1)
        raise LocalStackError(
            f"the gateway did not get healthy within {timeout:.0f} s",
            "\n".join(f"--- {p}\n{tail(self.log_file(p), 8)}" for p in ("vllm", "caddy", "authz", "prober")),
            "read the logs above; `gpugate logs vllm` shows vLLM's start-up",
        )

    def probe_status(self) -> list[dict]:
        try:
            response = httpx.get(f"http://127.0.0.1:{self.ports.prober}/status", timeout=2)
            response.raise_for_status()
            data = response.json()
            return data["results"] if isinstance(data, dict) else data
        except (httpx.HTTPError, ValueError, KeyError):
            return []

    def route_health(self) -> list[RouteHealth] | None:
        """Each tier's and provider's state from the router's /metrics; None when the stack does not route
        or the router does not answer."""
        if not self.spec.routes:
            return None
        try:
            response = httpx.get(f"http://127.0.0.1:{self.ports.router}/metrics", timeout=2)
            response.raise_for_status()
        except httpx.HTTPError:
            return None
        return route_health(response.text, time.time())

    # ---- down --------------------------------------------------------------------------

    def down(self, timeout: float = 60) -> list[int]:
        """Stop every process of the stack; keys, secrets, caches and data stay. Returns the pids stopped."""
        pid = self.supervisord_pid()
        if pid is None:
            return []
        pids = [p["pid"] for p in self.processes() if p["pid"]] + [pid]
        try:
            self.supervisor().supervisor.shutdown()
        except (OSError, xmlrpc.client.Fault):
            os.kill(pid, 15)
        deadline = time.monotonic() + timeout
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        for leftover in (p for p in pids if _alive(p)):
            log.warning("process %d did not stop in %ds; killing it", leftover, timeout)
            os.kill(leftover, 9)
        return pids


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False


def _who_listens(port: int) -> str:
    if shutil.which("ss") is None:
        return ""
    out = subprocess.run(["ss", "-Hltnp", f"sport = :{port}"], capture_output=True, text=True).stdout.strip()
    return f" by {out.split('users:')[-1].strip()}" if "users:" in out else ""


def ensure_system_packages() -> None:
    """Install the Debian packages the local stack runs, if any is missing (root or sudo)."""
    missing = [pkg for pkg, cmd in SYSTEM_COMMANDS.items() if shutil.which(cmd) is None]
    if not missing:
        return
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    if sudo and shutil.which("sudo") is None:
        raise LocalStackError(
            f"missing Debian packages: {', '.join(missing)}",
            todo=f"as root: apt-get install -y {' '.join(missing)}",
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in ([*sudo, "apt-get", "update", "-qq"], [*sudo, "apt-get", "install", "-y", "-qq", *missing]):
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=900)
        if proc.returncode != 0:
            raise LocalStackError(
                f"installing {', '.join(missing)} failed", tail_text(proc.stdout + proc.stderr),
                f"install them by hand: apt-get install -y {' '.join(missing)}",
            )


def tail_text(text: str, lines: int = LOG_TAIL_LINES) -> str:
    return "\n".join(text.splitlines()[-lines:])

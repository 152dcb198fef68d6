"""`gpugate run TASK --stack S`: find a stack's gateway host and run a runbook task (runbooks/tasks/) on it over SSH."""

from __future__ import annotations

import getpass
import inspect
import json
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import paramiko
import typer
from fabric import Config, Connection
from invoke import Collection
from invoke.exceptions import Exit, ParseError
from invoke.parser import Parser, ParserContext
from rich.console import Console

from gpugate.cli.options import ExitCode, OptionalStackOpt, load_or_exit
from gpugate.local.bundle import local_layout
from gpugate.spec import Target
from gpugate.stackfile import Stack, find_project
from runbooks.tasks import ns as TASKS
from runbooks.tasks.host import GatewayHost

# Mount with these: the task's own arguments follow TASK, and `--help` is answered per task.
RUN_CONTEXT_SETTINGS: dict[str, Any] = {"allow_extra_args": True, "ignore_unknown_options": True}
EXIT_CHECK_FAILED, EXIT_BAD_INPUT = ExitCode.CHECK_FAILED, ExitCode.BAD_INPUT
SSH_PORT = 22
CONNECT_TIMEOUT_S = 15
PULUMI_TIMEOUT_S = 120

err_console = Console(stderr=True, soft_wrap=True, highlight=False)
out_console = Console(soft_wrap=True, highlight=False)


class RunError(Exception):
    """`gpugate run` cannot start the task: says why and what to do; carries the exit code."""

    def __init__(self, message: str, code: int = EXIT_BAD_INPUT):
        self.code = code
        super().__init__(message)


@dataclass(frozen=True)
class SshTarget:
    """Where a task runs: the SSH address, how to get there, and what the tasks need to know about the host."""

    host: str
    user: str | None
    port: int | None
    proxy_command: str | None
    facts: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    @property
    def address(self) -> str:
        return f"{self.user + '@' if self.user else ''}{self.host}{':' + str(self.port) if self.port else ''}"


def task_collection() -> Collection:
    """The runbook tasks (runbooks/tasks/), as Fabric's `fab -r runbooks -c tasks` loads them."""
    return TASKS


def split_host(text: str) -> tuple[str | None, str, int | None]:
    """`[user@]host[:port]` -> (user, host, port)."""
    user, _, rest = text.rpartition("@")
    host, port = rest, None
    if rest.count(":") == 1:
        host, _, port_text = rest.partition(":")
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise RunError(f"--host {text!r}: {port_text!r} is not a port; use [user@]host[:port]")
        port = int(port_text)
    if not host:
        raise RunError(f"--host {text!r} names no host; use [user@]host[:port]")
    return user or None, host, port


def host_facts(stack: Stack) -> dict[str, Any]:
    """The `gpugate` Fabric config the tasks read: where the stack's files are on its host and how it is supervised."""
    if stack.spec.target is Target.LOCAL:
        python = str(Path(sys.prefix) / "bin" / "python")
        facts = GatewayHost(
            stack=stack.name, root=str(local_layout(stack).root), supervisor="supervisord", python=python,
            supervisorctl=str(Path(python).parent / "supervisorctl"), service_user=None, caddy_user=None, become_root=False,
        )  # fmt: skip
    else:
        facts = GatewayHost(stack=stack.name)
    return facts.model_dump(mode="json")


def pulumi_outputs(stack: Stack) -> dict[str, Any]:
    """`pulumi stack output --json -s S` run in the project (the Pulumi CLI and the stack's backend login are needed)."""
    pulumi = shutil.which("pulumi")
    if pulumi is None:
        raise RunError(
            f"stack {stack.name!r} runs on {stack.spec.target}: its host is the Pulumi output `ssh_host`, but the Pulumi CLI "
            f"is not installed here; install it, or name the host with --host [user@]host[:port]"
        )
    try:
        proc = subprocess.run(
            [pulumi, "stack", "output", "--json", "-s", stack.name], cwd=find_project().root, capture_output=True, text=True, timeout=PULUMI_TIMEOUT_S
        )
    except subprocess.TimeoutExpired:
        raise RunError(f"`pulumi stack output --json -s {stack.name}` did not answer in {PULUMI_TIMEOUT_S} s", EXIT_CHECK_FAILED) from None
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        raise RunError(f"`pulumi stack output --json -s {stack.name}` failed:\n{tail}\nname the host with --host instead", EXIT_CHECK_FAILED)
    try:
        outputs = json.loads(proc.stdout)
    except ValueError:
        raise RunError(f"`pulumi stack output --json -s {stack.name}` printed no JSON", EXIT_CHECK_FAILED) from None
    return outputs if isinstance(outputs, dict) else {}


def resolve_target(stack: Stack, host: str | None = None, user: str | None = None) -> SshTarget:
    """The SSH target of a stack: this machine for `local`, the Pulumi output `ssh_host` for aws/gcp, or --host."""
    target = stack.spec.target
    if target is Target.KUBERNETES:
        raise RunError(
            f"stack {stack.name!r} runs on Kubernetes: the runbook tasks run on VM hosts over SSH; "
            "use kubectl against the stack's cluster instead"
        )
    host_user, host_name, port = split_host(host) if host else (None, "", None)
    if host_user and user and host_user != user:
        raise RunError(f"--host names user {host_user!r} and --user {user!r}; give one")
    login = user or host_user
    facts = host_facts(stack)
    if host:
        return SshTarget(host_name, login or (getpass.getuser() if target is Target.LOCAL else None), port, None, facts, "--host")
    if target is Target.LOCAL:
        return SshTarget("127.0.0.1", login or getpass.getuser(), None, None, facts, "local stack: this machine")
    outputs = pulumi_outputs(stack)
    ssh_host = outputs.get("ssh_host")
    if not ssh_host:
        raise RunError(f"stack {stack.name!r} has no `ssh_host` output (not deployed yet?); name the host with --host", EXIT_CHECK_FAILED)
    proxy = outputs.get("ssh_proxy_command") or None
    if proxy:  # ssh(1) expands these tokens; paramiko takes the command as it is
        proxy = proxy.replace("%h", str(ssh_host)).replace("%p", str(SSH_PORT)).replace("%r", login or getpass.getuser()).replace("%%", "%")
    return SshTarget(str(ssh_host), login, None, proxy, facts, f"pulumi stack output of {stack.name}")


def connect(target: SshTarget, identity: Path | None, known_hosts: Path | None, dry_run: bool):
    """A Fabric connection that refuses host keys it does not know (~/.ssh/known_hosts, plus --known-hosts)."""

    config = Config(overrides={"gpugate": target.facts, "run": {"dry": dry_run}})
    connect_kwargs: dict[str, Any] = {"key_filename": [str(identity)]} if identity else {}
    conn = Connection(
        target.host, user=target.user, port=target.port, config=config, connect_timeout=CONNECT_TIMEOUT_S,
        connect_kwargs=connect_kwargs, gateway=target.proxy_command,
    )  # fmt: skip
    conn.client.set_missing_host_key_policy(paramiko.RejectPolicy())
    if known_hosts:
        conn.client.get_host_keys().load(str(known_hosts))
    return conn


def parse_task_args(name: str, task, args: list[str]) -> dict[str, Any]:
    """The task's keyword arguments from the words after TASK, parsed as Fabric's `fab` would."""

    context = ParserContext(name=name, args=task.get_arguments())
    try:
        result = Parser(contexts=[context]).parse_argv([name, *args])
    except ParseError as exc:
        raise RunError(f"{exc}\nsee: gpugate run {name} --help") from None
    if len(result) != 1 or result[0].name != name:
        raise RunError(f"unexpected arguments for {name}: {' '.join(args)}\nsee: gpugate run {name} --help")
    return result[0].as_kwargs


def task_help(name: str, task) -> str:
    arguments = task.get_arguments()
    words = [a.name.upper() if a.positional else f"[--{a.name}{' VALUE' if a.takes_value else ''}]" for a in arguments]
    lines = [
        f"Usage: gpugate run {name} --stack S [--host H] [--user U] [--identity FILE] [--known-hosts FILE] [--dry-run] {' '.join(words)}",
        "",
        inspect.getdoc(task.body) or "",
        "",
    ]
    if arguments:
        lines.append("Arguments:")
        for a in arguments:
            label = a.name.upper() if a.positional else f"--{a.name}{' VALUE' if a.takes_value else ''}"
            default = "" if a.positional or a.default in (None, "", False) else f" (default: {a.default})"
            lines.append(f"  {label:<24} {(a.help or '').strip()}{default}")
        lines.append("")
    lines.append("--dry-run runs the read-only checks and prints every change instead of making it.")
    return "\n".join(lines)


def overview(collection) -> str:
    lines = [
        "Usage: gpugate run TASK --stack S [--host [USER@]HOST[:PORT]] [--user U] [--identity FILE] [--known-hosts FILE] [--dry-run] [TASK ARGS]",
        "",
        "Run a runbook task on the stack's gateway host over SSH. The host comes from the stack: a local stack is",
        "this machine (SSH to 127.0.0.1 as you), an aws/gcp stack the Pulumi output ssh_host; --host overrides it.",
        "Unknown host keys are refused: keep them in ~/.ssh/known_hosts or pass --known-hosts.",
        "",
        "Tasks (gpugate run TASK --help for each):",
    ]
    for name in sorted(collection.task_names):
        first = (inspect.getdoc(collection[name].body) or "").splitlines()[0]
        lines.append(f"  {name:<14} {first}")
    return "\n".join(lines)


def _explain_ssh_error(exc: BaseException, target: SshTarget) -> str:
    where = target.address
    if isinstance(exc, paramiko.BadHostKeyException):
        return f"the host key of {where} does not match the one in known_hosts: refusing to connect (possible impersonation)"
    if isinstance(exc, paramiko.AuthenticationException):
        return f"{where} refused the login ({exc}); pass --identity FILE or --user, or load the key into your ssh agent"
    if isinstance(exc, paramiko.SSHException) and "not found in known_hosts" in str(exc):
        port = target.port or SSH_PORT
        return (
            f"the host key of {where} is unknown: refusing to connect. Check its fingerprint, then add it to "
            f"~/.ssh/known_hosts (e.g. `ssh-keyscan -p {port} {target.host}`), or pass --known-hosts FILE"
        )
    return f"cannot reach {where}: {type(exc).__name__}: {exc}"


def run_task(name: str, args: list[str], target: SshTarget, identity: Path | None, known_hosts: Path | None, dry_run: bool) -> Any:
    """Parse the task's arguments, connect and run it; errors become RunError with the task's exit code."""
    collection = task_collection()
    if name not in collection.task_names:
        raise RunError(f"no task {name!r}; tasks: {', '.join(sorted(collection.task_names))}")
    task = collection[name]
    kwargs = parse_task_args(name, task, args)
    conn = connect(target, identity, known_hosts, dry_run)
    try:
        return task(conn, **kwargs)
    except Exit as exc:
        if exc.message:
            err_console.print(str(exc.message), markup=False)
        raise RunError("", exc.code) from None
    except (paramiko.SSHException, socket.error, EOFError) as exc:
        raise RunError(_explain_ssh_error(exc, target), EXIT_CHECK_FAILED) from None
    finally:
        conn.close()


def run_command(
    ctx: typer.Context,
    task: Annotated[str | None, typer.Argument(metavar="TASK", help="status, logs, drain, restart, rotate-key, revoke-key, reload-proxy")] = None,
    stack: OptionalStackOpt = None,
    host: Annotated[str | None, typer.Option("--host", "-H", help="[user@]host[:port] instead of the stack's host")] = None,
    user: Annotated[str | None, typer.Option("--user", "-u", help="SSH login (default: you on a local stack, else ~/.ssh/config)")] = None,
    identity: Annotated[Path | None, typer.Option("--identity", "-i", help="SSH private key file")] = None,
    known_hosts: Annotated[Path | None, typer.Option("--known-hosts", help="extra known_hosts file to trust host keys from")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="run the read-only checks, print every change instead of making it")] = False,
) -> None:
    """Run a runbook task (status, logs, drain, restart, rotate-key, revoke-key, reload-proxy) on a stack's host over SSH."""
    args = list(ctx.args)
    try:
        collection = task_collection()
        if task in (None, "--help", "-h") or (task is None and "--help" in args):
            out_console.print(overview(collection), markup=False)
            raise typer.Exit(0 if task else EXIT_BAD_INPUT)
        if task not in collection.task_names:
            raise RunError(f"no task {task!r}; tasks: {', '.join(sorted(collection.task_names))}")
        if "--help" in args or "-h" in args:
            out_console.print(task_help(task, collection[task]), markup=False)
            raise typer.Exit(0)
        if stack is None:
            raise RunError(f"give the stack: gpugate run {task} --stack S")
        parse_task_args(task, collection[task], args)  # bad task arguments fail before any connection
        loaded = load_or_exit(stack)
        target = resolve_target(loaded, host, user)
        mode = " (dry run: nothing changes)" if dry_run else ""
        err_console.print(f"running {task} on {target.address or target.host} — {target.source}{mode}", markup=False)
        run_task(task, args, target, identity, known_hosts, dry_run)
    except RunError as err:
        if str(err):
            err_console.print(f"error: {err}", markup=False)
        raise typer.Exit(err.code) from None

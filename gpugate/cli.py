"""The `gpugate` command: one verb per operator task, a table for people and --json for machines."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from gpugate import __version__
from gpugate.stackfile import SpecError, Stack, load_stack, stack_names

app = typer.Typer(
    name="gpugate",
    help="Run a self-hosted, OpenAI-compatible LLM gateway from code: render, validate, plan and operate stacks.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)

EXIT_OK, EXIT_CHECK_FAILED, EXIT_BAD_INPUT = 0, 1, 2

StackOpt = Annotated[str, typer.Option("--stack", "-s", help="stack name (stacks/Pulumi.<name>.yaml) or a stack file path")]
JsonOpt = Annotated[bool, typer.Option("--json", help="machine-readable output")]


def load_or_exit(name: str) -> Stack:
    """Load a stack; a bad stack file ends the command with exit 2 and every problem, no traceback."""
    try:
        return load_stack(name)
    except SpecError as err:
        err_console.print(f"[bold red]error:[/] stack {name!r} is not valid:")
        for problem in err.problems:
            err_console.print(f"  {problem}", highlight=False, markup=False)
        raise typer.Exit(EXIT_BAD_INPUT) from None


@app.callback()
def main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="log debug details")] = False,
    version: Annotated[bool, typer.Option("--version", help="print the version and exit")] = False,
) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if version:
        console.print(f"gpugate {__version__}")
        raise typer.Exit()


@app.command()
def stacks(as_json: JsonOpt = False) -> None:
    """List the stacks in stacks/ with their target, domain and model."""
    rows = []
    failed = False
    for name in stack_names():
        try:
            spec = load_stack(name).spec
            rows.append({"stack": name, "target": str(spec.target), "domain": spec.domain, "model": spec.model.served_name})
        except SpecError as err:
            failed = True
            rows.append({"stack": name, "target": "invalid", "domain": "", "model": str(err.problems[0])})
    if as_json:
        console.print_json(json.dumps(rows))
    else:
        table = Table("stack", "target", "domain", "model")
        for row in rows:
            table.add_row(*row.values())
        console.print(table)
    raise typer.Exit(EXIT_BAD_INPUT if failed else EXIT_OK)


@app.command()
def render(
    stack: StackOpt,
    out: Annotated[Path, typer.Option("--out", "-o", help="directory to write the bundle into")],
) -> None:
    """Render a stack's bundle (every config file its hosts run, plus manifest.json) into OUT.

    Deterministic: the same commit and stack file give byte-identical files. No secret is written.
    """
    from gpugate.render import render_bundle, write_bundle  # noqa: PLC0415 - keep --help fast

    loaded = load_or_exit(stack)
    bundle = render_bundle(loaded)
    written = write_bundle(bundle, out)
    console.print(
        f"rendered {len(written)} files for stack [bold]{loaded.name}[/] ({loaded.spec.target}) into {out}\n"
        f"bundle sha256 {bundle.bundle_sha256}"
    )


@app.command()
def validate(
    stack: Annotated[str | None, typer.Option("--stack", "-s", help="stack to validate")] = None,
    all_stacks: Annotated[bool, typer.Option("--all", help="validate every stack in stacks/")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Render and check every file with the tool that will consume it (caddy, promtool, amtool, cloud-init, ...).

    Prints one verdict line per file; exits 1 if any check fails, 2 if a stack file is invalid.
    """
    from gpugate.validate import ToolMissing, validate_stack  # noqa: PLC0415

    if (stack is None) == (not all_stacks):
        err_console.print("[bold red]error:[/] give exactly one of --stack NAME or --all")
        raise typer.Exit(EXIT_BAD_INPUT)
    names = stack_names() if all_stacks else [stack]
    loaded = [load_or_exit(n) for n in names]
    verdicts = []
    for item in loaded:
        try:
            verdicts += validate_stack(item)
        except ToolMissing as err:
            err_console.print(f"[bold red]error:[/] {err}")
            raise typer.Exit(EXIT_CHECK_FAILED) from None
    if as_json:
        console.print_json(json.dumps([v.__dict__ for v in verdicts]))
    else:
        for v in verdicts:
            mark = "[green]PASS[/]" if v.ok else "[bold red]FAIL[/]"
            console.print(f"{mark}  {v.stack:<10} {v.file:<40} {v.tool}", highlight=False)
            if v.detail and not v.ok:
                for line in v.detail.splitlines():
                    console.print(f"      {line}", highlight=False, markup=False)
        failed = sum(not v.ok for v in verdicts)
        console.print(f"{len(verdicts) - failed} passed, {failed} failed")
    raise typer.Exit(EXIT_CHECK_FAILED if any(not v.ok for v in verdicts) else EXIT_OK)


def _mount_commands() -> None:
    """Commands whose code lives in their own modules."""
    from gpugate.dashboards import dashboard_command  # noqa: PLC0415
    from gpugate.oncall import alerts_command  # noqa: PLC0415
    from gpugate.plan import plan_command  # noqa: PLC0415
    from gpugate.promote import promote_command  # noqa: PLC0415
    from gpugate.runtasks import RUN_CONTEXT_SETTINGS, run_command  # noqa: PLC0415
    from gpugate.smoke import smoke_command  # noqa: PLC0415

    app.command("plan")(plan_command)
    app.command("smoke")(smoke_command)
    app.command("promote")(promote_command)
    app.command("dashboard")(dashboard_command)
    app.command("alerts")(alerts_command)
    # Runbook tasks take their own options; each task's --help is its own, so `run` has none.
    app.command("run", context_settings=RUN_CONTEXT_SETTINGS, add_help_option=False)(run_command)


_mount_commands()


def run() -> None:  # pragma: no cover - console script entry
    sys.exit(app())


# ---- the local stack ---------------------------------------------------------------------

LocalStackOpt = Annotated[str, typer.Option("--stack", "-s", help="a stack whose gpugate:target is local")]


def _local_or_exit(name: str):
    from gpugate.local.gateway import LocalGateway, LocalStackError  # noqa: PLC0415

    try:
        return LocalGateway(load_or_exit(name))
    except LocalStackError as err:
        _fail(err, EXIT_BAD_INPUT)


def _fail(err, code: int = EXIT_CHECK_FAILED):
    err_console.print(f"[bold red]error:[/] {err.what}")
    if err.evidence:
        err_console.print(err.evidence, highlight=False, markup=False)
    if err.todo:
        err_console.print(f"[bold]what to do:[/] {err.todo}", highlight=False)
    raise typer.Exit(code)


@app.command()
def up(stack: LocalStackOpt = "local") -> None:
    """Bring up a local stack on this machine: install what is missing, render, start, wait until healthy.

    A second `up` with nothing changed is a no-op that reports the running stack; a changed stack
    file re-renders and restarts only the services whose files changed.
    """
    from gpugate.local.gateway import LocalStackError  # noqa: PLC0415

    gateway = _local_or_exit(stack)
    try:
        with console.status("starting", spinner="dots") as status:
            def progress(message: str) -> None:
                status.update(message)
                console.print(f"[dim]·[/] {message}", highlight=False)

            result = gateway.up(progress)
    except LocalStackError as err:
        _fail(err)
    if not result.started and not result.restarted:
        console.print(f"[green]✓[/] stack [bold]{gateway.stack.name}[/] is already up and healthy at {result.url} (nothing changed)")
    elif not result.started:
        console.print(f"[green]✓[/] stack [bold]{gateway.stack.name}[/] updated; restarted: {', '.join(result.restarted)}")
    else:
        console.print(f"[green]✓[/] stack [bold]{gateway.stack.name}[/] is up in {result.seconds:.0f} s")
    console.print(f"  endpoint  {result.url}/v1", highlight=False)
    console.print(f"  CA file   {result.ca_file}   (Caddy's local CA: trust it or pass it to your client)", highlight=False)
    console.print(f"  status    gpugate status --stack {gateway.stack.name}", highlight=False)
    if result.client_key:
        model = gateway.spec.model.served_name
        console.print(f"\n[bold]A new client key[/] ({result.client_key_id}) — shown once, store it now:\n  {result.client_key}\n", highlight=False)
        console.print("curl:", style="bold")
        console.print(
            f"  curl --cacert {result.ca_file} {result.url}/v1/chat/completions \\\n"
            f"    -H 'Authorization: Bearer {result.client_key}' -H 'Content-Type: application/json' \\\n"
            f"    -d '{{\"model\": \"{model}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Say hello\"}}], \"max_tokens\": 32}}'",
            highlight=False, markup=False,
        )
        console.print("Python (openai):", style="bold")
        console.print(
            "  import httpx, openai\n"
            f"  client = openai.OpenAI(base_url=\"{result.url}/v1\", api_key=\"{result.client_key}\",\n"
            f"                         http_client=httpx.Client(verify=\"{result.ca_file}\"))\n"
            f"  reply = client.chat.completions.create(model=\"{model}\", messages=[{{\"role\": \"user\", \"content\": \"Say hello\"}}])\n"
            "  print(reply.choices[0].message.content)",
            highlight=False, markup=False,
        )


@app.command()
def down(stack: LocalStackOpt = "local") -> None:
    """Stop every service of a local stack. Keys, secrets, caches and metrics data stay."""
    gateway = _local_or_exit(stack)
    pids = gateway.down()
    if pids:
        console.print(f"[green]✓[/] stack [bold]{gateway.stack.name}[/] stopped ({len(pids)} processes)")
    else:
        console.print(f"stack [bold]{gateway.stack.name}[/] was not running")


@app.command()
def status(stack: LocalStackOpt = "local", as_json: JsonOpt = False) -> None:
    """Per-service state and the prober's checks of a local stack; exit 1 if anything is down or red."""
    gateway = _local_or_exit(stack)
    processes = gateway.processes()
    checks = gateway.probe_status() if processes else []
    report = {
        "stack": gateway.stack.name,
        "running": bool(processes),
        "url": gateway.url,
        "ca_file": str(gateway.ca_file),
        "alert_log": str(gateway.layout.alert_log),
        "services": [{"name": p["name"], "state": p["statename"], "pid": p["pid"], "uptime_s": max(0, p["now"] - p["start"]) if p["pid"] else 0} for p in processes],
        "checks": checks,
    }
    healthy = bool(processes) and all(s["state"] == "RUNNING" for s in report["services"]) and bool(checks) and all(c.get("ok") is not False for c in checks)
    report["healthy"] = healthy
    if as_json:
        console.print_json(json.dumps(report, default=str))
    else:
        if not processes:
            console.print(f"stack [bold]{gateway.stack.name}[/] is not running (start it with `gpugate up --stack {gateway.stack.name}`)")
        else:
            services = Table("service", "state", "pid", "uptime", title=f"{gateway.stack.name} — {gateway.url}")
            for s in report["services"]:
                color = "green" if s["state"] == "RUNNING" else "red"
                services.add_row(s["name"], f"[{color}]{s['state']}[/]", str(s["pid"]), f"{s['uptime_s']} s")
            console.print(services)
            probes = Table("check", "result", "seconds", "detail", title="prober")
            for c in checks:
                mark = {True: "[green]ok[/]", False: "[red]FAIL[/]", None: "[dim]n/a[/]"}[c.get("ok")]
                seconds = c.get("seconds")
                probes.add_row(c.get("check", "?"), mark, f"{seconds:.3f}" if isinstance(seconds, (int, float)) else "", str(c.get("detail", "")))
            console.print(probes)
            console.print(f"alerts delivered to: {gateway.layout.alert_log}", highlight=False)
    raise typer.Exit(EXIT_OK if healthy else EXIT_CHECK_FAILED)


@app.command()
def logs(
    service: Annotated[str, typer.Argument(help="caddy (access log: `access`), authz, vllm, prober, prometheus, alertmanager, alertsink, supervisord")],
    stack: LocalStackOpt = "local",
    lines: Annotated[int, typer.Option("--lines", "-n", min=1, help="how many of the last lines")] = 50,
) -> None:
    """Show the last lines of a local service's log (metadata only: no prompts, no completions, no keys)."""
    from gpugate.local.gateway import tail  # noqa: PLC0415

    gateway = _local_or_exit(stack)
    names = {"access": gateway.layout.logs / "access.log", "authz": gateway.layout.logs / "authz.log"}
    path = names.get(service, gateway.log_file(service))
    if not path.exists():
        known = sorted({p.stem for p in gateway.layout.logs.glob("*.log")} | set(names))
        err_console.print(f"[bold red]error:[/] no log for {service!r}; known: {', '.join(known) or 'none (stack never started)'}")
        raise typer.Exit(EXIT_BAD_INPUT)
    console.print(tail(path, lines), highlight=False, markup=False)

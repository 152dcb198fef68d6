"""`gpugate up / down / status / logs`: a local stack on this machine."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from gpugate_runtime.routehealth import RouteHealth
from rich.table import Table

from gpugate.cli.options import ExitCode, JsonOpt, console, err_console, load_or_exit
from gpugate.local.gateway import LocalGateway, LocalStackError, tail

LocalStackOpt = Annotated[str, typer.Option("--stack", "-s", help="a stack whose gpugate:target is local")]


def _local_or_exit(name: str):
    try:
        return LocalGateway(load_or_exit(name))
    except LocalStackError as err:
        _fail(err, ExitCode.BAD_INPUT)


def _fail(err, code: int = ExitCode.CHECK_FAILED):
    err_console.print(f"[bold red]error:[/] {err.what}")
    if err.evidence:
        err_console.print(err.evidence, highlight=False, markup=False)
    if err.todo:
        err_console.print(f"[bold]what to do:[/] {err.todo}", highlight=False)
    raise typer.Exit(code)


def up(
    stack: LocalStackOpt = "local",
    new_key: Annotated[bool, typer.Option("--new-key", help="issue (and print once) another client key even if the stack has one")] = False,
) -> None:
    """Bring up a local stack on this machine: install what is missing, render, start, wait until healthy.

    A second `up` with nothing changed is a no-op that reports the running stack; a changed stack
    file re-renders and restarts only the services whose files changed. A client key is issued and
    printed once on the stack's first start only (or with --new-key); later, manage keys with
    `gpugate keys create / list / rotate / revoke --stack S`. A stack with external providers
    (gpugate:providers) takes each one's key from GPUGATE_PROVIDER_<NAME>_API_KEY into its state
    dir (needed once; exit 2 naming the variable when a provider has no key).
    """
    gateway = _local_or_exit(stack)
    try:
        with console.status("starting", spinner="dots") as status:
            def progress(message: str) -> None:
                status.update(message)
                console.print(f"[dim]·[/] {message}", highlight=False)

            result = gateway.up(progress, new_key=new_key)
    except LocalStackError as err:
        _fail(err, ExitCode.BAD_INPUT if err.bad_input else ExitCode.CHECK_FAILED)
    if not result.started and not result.restarted:
        console.print(f"[green]✓[/] stack [bold]{gateway.stack.name}[/] is already up and healthy at {result.url} (nothing changed)")
    elif not result.started:
        console.print(f"[green]✓[/] stack [bold]{gateway.stack.name}[/] updated; restarted: {', '.join(result.restarted)}")
    else:
        console.print(f"[green]✓[/] stack [bold]{gateway.stack.name}[/] is up in {result.seconds:.0f} s")
    console.print(f"  endpoint  {result.url}/v1", highlight=False)
    console.print(f"  CA file   {result.ca_file}   (Caddy's local CA: trust it or pass it to your client)", highlight=False)
    console.print(f"  status    gpugate status --stack {gateway.stack.name}", highlight=False)
    if not result.client_key:
        console.print(f"  keys      none issued by this up (the stack has an active key); a new one: gpugate keys create NAME --stack {stack}", highlight=False, markup=False)
    else:
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


def down(stack: LocalStackOpt = "local") -> None:
    """Stop every service of a local stack. Keys, secrets, caches and metrics data stay."""
    gateway = _local_or_exit(stack)
    pids = gateway.down()
    if pids:
        console.print(f"[green]✓[/] stack [bold]{gateway.stack.name}[/] stopped ({len(pids)} processes)")
    else:
        console.print(f"stack [bold]{gateway.stack.name}[/] was not running")


def status(stack: LocalStackOpt = "local", as_json: JsonOpt = False) -> None:
    """Per-service state, the prober's checks and, on a stack that routes, each tier and provider green / yellow / red
    (from the router's metrics: red held down or failing, yellow a fallback or failure in the last 5 minutes or a slow
    first token); exit 1 if anything is down or red."""
    gateway = _local_or_exit(stack)
    processes = gateway.processes()
    checks = gateway.probe_status() if processes else []
    routes = gateway.route_health() if processes else None
    report = {
        "stack": gateway.stack.name,
        "running": bool(processes),
        "url": gateway.url,
        "ca_file": str(gateway.ca_file),
        "alert_log": str(gateway.layout.alert_log),
        "services": [{"name": p["name"], "state": p["statename"], "pid": p["pid"], "uptime_s": max(0, p["now"] - p["start"]) if p["pid"] else 0} for p in processes],
        "checks": checks,
    }
    if gateway.spec.routes:
        report["routes"] = [h.to_dict() for h in routes] if routes is not None else None  # None: the router did not answer
    healthy = bool(processes) and all(s["state"] == "RUNNING" for s in report["services"]) and bool(checks) and all(c.get("ok") is not False for c in checks)
    if gateway.spec.routes:
        healthy = healthy and routes is not None and all(h.state != "red" for h in routes)
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
            if gateway.spec.routes:
                console.print(routes_table(routes))
            console.print(f"alerts delivered to: {gateway.layout.alert_log}", highlight=False)
    raise typer.Exit(ExitCode.OK if healthy else ExitCode.CHECK_FAILED)


def routes_table(routes: list[RouteHealth] | None) -> Table:
    """Each tier and provider with its state, coloured, and why."""
    table = Table("route", "state", "detail", title="routes (from the router's metrics)")
    if routes is None:
        table.add_row("router", "[red]red[/]", "the router's /metrics does not answer")
    for h in routes or []:
        table.add_row(h.route, f"[{h.state}]{h.state}[/]", h.detail)
    return table


def logs(
    service: Annotated[str, typer.Argument(help="caddy (access log: `access`), authz, vllm, prober, prometheus, alertmanager, alertsink, supervisord")],
    stack: LocalStackOpt = "local",
    lines: Annotated[int, typer.Option("--lines", "-n", min=1, help="how many of the last lines")] = 50,
) -> None:
    """Show the last lines of a local service's log (metadata only: no prompts, no completions, no keys)."""
    gateway = _local_or_exit(stack)
    names = {"access": gateway.layout.access_log, "authz": gateway.layout.authz_log}
    path = names.get(service, gateway.log_file(service))
    if not path.exists():
        known = sorted({p.stem for p in gateway.layout.logs.glob("*.log")} | set(names))
        err_console.print(f"[bold red]error:[/] no log for {service!r}; known: {', '.join(known) or 'none (stack never started)'}")
        raise typer.Exit(ExitCode.BAD_INPUT)
    console.print(tail(path, lines), highlight=False, markup=False)

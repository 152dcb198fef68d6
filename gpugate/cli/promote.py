"""`gpugate promote`: a release from one stack to another through its gates, or a rollback."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from gpugate_runtime.contract.host import LOOPBACK, Ports
from rich.console import Console

from gpugate.cli.options import ExitCode
from gpugate.cli.plan import plan
from gpugate.promote import (
    DEFAULT_SOAK,
    LogEntry,
    Soak,
    apply,
    change_json,
    change_view,
    parse_duration,
    plan_promotion,
    plan_rollback,
    who_am_i,
)
from gpugate.release import ReleaseError, promotion_log
from gpugate.stackfile import SpecError, Stack, load_stack


def promote_command(
    source: Annotated[str | None, typer.Option("--from", help="stack whose release is promoted (name or stack file)")] = None,
    target: Annotated[str | None, typer.Option("--to", help="stack that receives it (name or stack file)")] = None,
    rollback: Annotated[bool, typer.Option("--rollback", help="restore the release before --stack's last promotion")] = False,
    stack: Annotated[str | None, typer.Option("--stack", "-s", help="with --rollback: the stack to roll back")] = None,
    apply_change: Annotated[bool, typer.Option("--apply", help="write the pins and the log record; without it, a dry run")] = False,
    smoke_record: Annotated[Path | None, typer.Option("--smoke-record", help="the source stack's `gpugate smoke --record` file")] = None,
    soak: Annotated[str, typer.Option("--soak", help="how long the source's prober and alerts must have been clean, e.g. 30m, 2h")] = DEFAULT_SOAK,
    prometheus_url: Annotated[str | None, typer.Option("--prometheus-url", help="the source stack's Prometheus; default: its loopback port")] = None,
    alertmanager_url: Annotated[str | None, typer.Option("--alertmanager-url", help="the source stack's Alertmanager; default: its loopback port")] = None,
    log_file: Annotated[Path | None, typer.Option("--log", help="the promotion log; default: promotions.jsonl next to the stack files")] = None,
    who: Annotated[str | None, typer.Option("--who", help="who promotes, for the log; default: $GITHUB_ACTOR or git's user.email")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Promote a release (model id and revision, vLLM image digest) from one stack to another, or roll it back.

    Checks the gates — the source's smoke passed for this release, its prober and alerts were clean
    for the soak window, the target's offline plan passes with the new pins — and shows the pin and
    bundle diff. Only with --apply it writes the pins into the target's stack file (every comment and
    other byte kept) and appends a record to the promotion log. `--rollback --stack prod` restores
    the pins from before prod's last promotion the same way. Exits 1 if a gate blocks, 2 on bad input.
    """
    out, err = Console(soft_wrap=True), Console(stderr=True, soft_wrap=True)

    def bad_input(message: str, todo: str = "") -> typer.Exit:
        err.print(f"[bold red]error:[/] {message}", highlight=False)
        if todo:
            err.print(f"[bold]what to do:[/] {todo}", highlight=False)
        return typer.Exit(ExitCode.BAD_INPUT)

    def load(name: str) -> Stack:
        try:
            return load_stack(name)
        except SpecError as problem:
            raise bad_input(f"stack {name!r} is not valid:\n  " + "\n  ".join(map(str, problem.problems))) from None

    log_file = log_file or promotion_log()
    try:
        if rollback:
            if stack is None or source is not None or target is not None:
                raise bad_input("--rollback takes --stack NAME (and not --from/--to)")
            change = plan_rollback(load(stack), log_file)
        else:
            if source is None or target is None or stack is not None:
                raise bad_input("give --from SOURCE --to TARGET (or --rollback --stack NAME)")
            try:
                soak_s = parse_duration(soak)
            except ValueError as problem:
                raise bad_input(f"--soak: {problem}") from None
            src, dst = load(source), load(target)
            if src.path.resolve() == dst.path.resolve():
                raise bad_input("--from and --to are the same stack")
            ports = Ports(src.spec.ports.internal_base)
            soaking = Soak(
                stack=src.name,
                prometheus_url=(prometheus_url or f"http://{LOOPBACK}:{ports.prometheus}").rstrip("/"),
                alertmanager_url=(alertmanager_url or f"http://{LOOPBACK}:{ports.alertmanager}").rstrip("/"),
                seconds=soak_s,
            )
            change = plan_promotion(src, dst, smoke_record, soaking, planner=plan)
    except ReleaseError as problem:
        raise bad_input(problem.what, problem.todo) from None

    applied: LogEntry | None = None
    if apply_change and change.allowed and change.changes_anything:
        applied = apply(change, log_file, who or who_am_i())
    if as_json:
        out.print_json(data=change_json(change, applied))
    else:
        out.print(change_view(change))
        if not change.allowed:
            out.print(f"[bold red]{change.action} blocked[/]: nothing written", highlight=False)
        elif not change.changes_anything:
            out.print(f"{change.stack.name} already runs release {change.after.id}: nothing to {change.action}", highlight=False)
        elif applied is not None:
            out.print(
                f"[green]✓[/] wrote {len(change.changed_lines)} pin lines to {change.stack.path} and record "
                f"#{applied.id} to {log_file}; next: commit both, then `pulumi up -s {change.stack.name}` "
                f"and `gpugate smoke --stack {change.stack.name}`",
                highlight=False,
            )
        else:
            out.print("dry run: nothing written; add --apply to write the pins and the log record", highlight=False)
    raise typer.Exit(ExitCode.OK if change.allowed else ExitCode.CHECK_FAILED)

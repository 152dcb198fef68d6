"""`gpugate stacks / render / validate`: a project's stacks, their bundles, and every file checked by the tool that consumes it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from gpugate.cli.options import ExitCode, JsonOpt, StackOpt, bad_input, console, err_console, load_or_exit
from gpugate.render.bundle import write_bundle
from gpugate.stackfile import ProjectNotFound, SpecError, load_stack, stack_names
from gpugate.targets import render_bundle
from gpugate.validate import ToolMissing, validate_stack


def project_stack_names() -> list[str]:
    """The stacks of the Pulumi project around the working directory; none there ends the command with exit 2."""
    try:
        return stack_names()
    except ProjectNotFound as err:
        bad_input(str(err), err.todo)


def stacks(as_json: JsonOpt = False) -> None:
    """List the stacks of the Pulumi project here (its stackConfigDir) with their target, domain and model."""
    rows = []
    failed = False
    for name in project_stack_names():
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
    raise typer.Exit(ExitCode.BAD_INPUT if failed else ExitCode.OK)


def render(
    stack: StackOpt,
    out: Annotated[Path, typer.Option("--out", "-o", help="directory to write the bundle into")],
) -> None:
    """Render a stack's bundle (every config file its hosts run, plus manifest.json) into OUT.

    Deterministic: the same commit and stack file give byte-identical files. No secret is written.
    """
    loaded = load_or_exit(stack)
    bundle = render_bundle(loaded)
    written = write_bundle(bundle, out)
    console.print(
        f"rendered {len(written)} files for stack [bold]{loaded.name}[/] ({loaded.spec.target}) into {out}\n"
        f"bundle sha256 {bundle.bundle_sha256}"
    )


def validate(
    stack: Annotated[str | None, typer.Option("--stack", "-s", help="stack to validate")] = None,
    all_stacks: Annotated[bool, typer.Option("--all", help="validate every stack of the Pulumi project here")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Render and check every file with the tool that will consume it (caddy, promtool, amtool, cloud-init, ...).

    Prints one verdict line per file, and a WARN line per image pinned by a placeholder digest (which
    `pulumi up` and `gpugate promote` refuse); exits 1 if any check fails, 2 if a stack file is invalid.
    """
    if (stack is None) == (not all_stacks):
        bad_input("give exactly one of --stack NAME or --all")
    names = project_stack_names() if all_stacks else [stack]
    loaded = [load_or_exit(n) for n in names]
    verdicts = []
    for item in loaded:
        try:
            verdicts += validate_stack(item)
        except ToolMissing as err:
            err_console.print(f"[bold red]error:[/] {err}")
            raise typer.Exit(ExitCode.CHECK_FAILED) from None
    if as_json:
        console.print_json(json.dumps([v.__dict__ for v in verdicts]))
    else:
        for v in verdicts:
            mark = "[bold yellow]WARN[/]" if v.warning else "[green]PASS[/]" if v.ok else "[bold red]FAIL[/]"
            console.print(f"{mark}  {v.stack:<10} {v.file:<40} {v.tool}", highlight=False)
            if v.detail and (v.warning or not v.ok):
                for line in v.detail.splitlines():
                    console.print(f"      {line}", highlight=False, markup=False)
        failed, warned = sum(not v.ok for v in verdicts), sum(v.warning for v in verdicts)
        console.print(f"{len(verdicts) - failed - warned} passed, {warned} warnings, {failed} failed")
    raise typer.Exit(ExitCode.CHECK_FAILED if any(not v.ok for v in verdicts) else ExitCode.OK)

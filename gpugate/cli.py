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


def run() -> None:  # pragma: no cover - console script entry
    sys.exit(app())

"""What every `gpugate` command shares: exit codes, the --stack and --json options, consoles, and loading a
stack or ending the command with exit 2 and every problem of it."""

from __future__ import annotations

from typing import Annotated, NoReturn

import typer
from gpugate_runtime.contract.exits import ExitCode
from rich.console import Console

from gpugate.stackfile import ProjectNotFound, SpecError, Stack, load_stack

__all__ = ["ExitCode", "JsonOpt", "StackOpt", "OptionalStackOpt", "console", "err_console", "load_or_exit", "bad_input"]

StackOpt = Annotated[str, typer.Option("--stack", "-s", help="stack name (stacks/Pulumi.<name>.yaml) or a stack file path")]
OptionalStackOpt = Annotated[
    str | None, typer.Option("--stack", "-s", help="stack name (stacks/Pulumi.<name>.yaml) or a stack file path")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="machine-readable output")]

console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)


def bad_input(message: str, todo: str = "") -> NoReturn:
    """End the command: exit 2 with what is wrong and, if known, what to do."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False)
    if todo:
        err_console.print(f"[bold]what to do:[/] {todo}", highlight=False)
    raise typer.Exit(ExitCode.BAD_INPUT)


def load_or_exit(name: str) -> Stack:
    """Load a stack; a bad stack file (or no Pulumi project to find it in) ends the command with exit 2
    and every problem, no traceback."""
    try:
        return load_stack(name)
    except ProjectNotFound as err:
        bad_input(str(err), err.todo)
    except SpecError as err:
        err_console.print(f"[bold red]error:[/] stack {name!r} is not valid:")
        for problem in err.problems:
            err_console.print(f"  {problem}", highlight=False, markup=False)
        raise typer.Exit(ExitCode.BAD_INPUT) from None

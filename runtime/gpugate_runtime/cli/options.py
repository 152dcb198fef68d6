"""What every runtime command shares: loading its settings (or exiting 2 with what is wrong) and common options."""

from __future__ import annotations

from typing import Annotated, NoReturn, TypeVar

import typer
from pydantic import ValidationError
from pydantic_settings import BaseSettings

from gpugate_runtime.contract.exits import ExitCode
from gpugate_runtime.settings import env_file, load_settings

S = TypeVar("S", bound=BaseSettings)

JsonOption = Annotated[bool, typer.Option("--json", help="machine-readable output")]


def bad_input(message: str) -> NoReturn:
    """End the command with exit 2 and `error: <message>` on stderr."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(ExitCode.BAD_INPUT)


def settings_or_exit(cls: type[S], what: str) -> S:
    """`cls` from the process environment and the env file; invalid settings or an unreadable env file
    end the command with exit 2 and a message naming the variables' prefix."""
    prefix = cls.model_config["env_prefix"]
    try:
        return load_settings(cls, env_file())
    except ValidationError as exc:
        bad_input(f"{what} settings ({prefix}* or the env file) are invalid:\n{exc}")
    except OSError as exc:
        bad_input(f"cannot read the env file for {what} settings: {exc}")

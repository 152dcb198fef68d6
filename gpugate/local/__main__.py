"""`python -m gpugate.local ensure`: build the vLLM CPU venv and the local model, print both paths."""

from __future__ import annotations

import logging
import shlex
from pathlib import Path
from typing import Annotated

import typer

from gpugate.local.model import ensure_model
from gpugate.local.vllm_env import LocalEnvError, ensure_vllm_venv

app = typer.Typer(help="Local toolchain for the `local` stack.", no_args_is_help=True, add_completion=False)


@app.callback()
def main() -> None:
    """Local toolchain for the `local` stack."""


@app.command()
def ensure(
    cache_dir: Annotated[
        Path | None, typer.Option(help="cache directory (default: $GPUGATE_CACHE_DIR or ~/.cache/gpugate)")
    ] = None,
) -> None:
    """Build the vLLM CPU venv and the converted model if missing; print both paths as shell assignments.

    Output is `GPUGATE_VLLM_PYTHON=PATH` and `GPUGATE_MODEL_DIR=PATH`, one a line (progress goes to
    stderr), so a script can `eval "$(python -m gpugate.local ensure)"`.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        python = ensure_vllm_venv(cache_dir)
        model = ensure_model(cache_dir, python)
    except LocalEnvError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"GPUGATE_VLLM_PYTHON={shlex.quote(str(python))}")
    typer.echo(f"GPUGATE_MODEL_DIR={shlex.quote(str(model))}")


if __name__ == "__main__":
    app()

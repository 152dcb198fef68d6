"""`gpugate-runtime launch`: check a launch spec's capacity, then exec vLLM."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError

from gpugate_runtime.cli.options import bad_input
from gpugate_runtime.launcher import (
    VLLM_PYTHON_ENV,
    LaunchError,
    build_argv,
    build_env,
    check_args,
    end_leftovers,
    plan_for_spec,
    redacted,
)
from gpugate_runtime.launchspec import LaunchSpec

log = logging.getLogger("gpugate_runtime.launcher")

app = typer.Typer(help="Start vLLM from a launch spec.", no_args_is_help=True, add_completion=False)


@app.callback()
def main() -> None:
    """Start vLLM from a launch spec."""


@app.command()
def run(
    spec: Annotated[Path, typer.Option(help="the launch spec (vllm/launch.json in a bundle)")],
    python: Annotated[
        Path | None, typer.Option(help=f"python of the vLLM install (default: ${VLLM_PYTHON_ENV}, else this python)")
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="print the command and capacity report; start nothing")
    ] = False,
    check: Annotated[bool, typer.Option(help="validate the flags with vLLM's own parser first")] = True,
) -> None:
    """Check the spec's capacity, then replace this process with vLLM (so a supervisor's signals reach vLLM)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    interpreter = python or Path(os.environ.get(VLLM_PYTHON_ENV) or sys.executable)
    try:
        launch = LaunchSpec.read(spec)
        env = build_env(launch)
        report = plan_for_spec(launch)
        argv = build_argv(launch, interpreter)
    except OSError as exc:
        bad_input(f"cannot read {exc.filename or spec}: {exc.strerror}")
    except ValidationError as exc:
        bad_input(f"{spec} is not a valid launch spec:\n{exc}")
    except LaunchError as exc:
        bad_input(str(exc))

    if report is not None:
        log.info(
            "expected KV cache %s tokens, max concurrency %.2fx at max_model_len %s",
            f"{report.kv_tokens:,}",
            report.max_concurrency,
            f"{report.max_model_len:,}",
        )
    if dry_run:
        typer.echo(" ".join(redacted(argv, env)))
        typer.echo(json.dumps(report.model_dump(mode="json") if report else None, indent=2))
    if report is not None and not report.fits:
        bad_input(f"{launch.served_model_name} {report.message}")
    if check and launch.image:
        log.info("argument check skipped: vLLM runs inside %s and checks its own arguments at start", launch.image)
    elif check:
        try:
            check_args(argv, interpreter)
        except LaunchError as exc:
            bad_input(str(exc))
    if dry_run:
        return
    if launch.pgid_file is not None:
        end_leftovers(launch.pgid_file)
    log.info("starting vLLM: %s", " ".join(redacted(argv, env)))
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(argv[0], argv, env)
    except OSError as exc:
        bad_input(f"cannot start vLLM with {argv[0]}: {exc.strerror}")



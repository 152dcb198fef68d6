"""`gpugate-runtime launch`: prepare a host for a launch spec (venv, model), check its capacity, then exec vLLM."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError

from gpugate_runtime.cli.options import bad_input
from gpugate_runtime.contract.exits import ExitCode
from gpugate_runtime.launcher import (
    VLLM_PYTHON_ENV,
    LaunchError,
    build_argv,
    build_env,
    check_args,
    end_leftovers,
    plan_for_spec,
    redacted,
    vllm_interpreter,
)
from gpugate_runtime.launchspec import LaunchSpec
from gpugate_runtime.modelprep import ensure_model
from gpugate_runtime.vllmenv import PrepareError, ensure_venv

log = logging.getLogger("gpugate_runtime.launcher")

app = typer.Typer(help="Prepare a host for vLLM and start it, from a launch spec.", no_args_is_help=True, add_completion=False)


def _logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _read_spec(spec: Path) -> LaunchSpec:
    try:
        return LaunchSpec.read(spec)
    except OSError as exc:
        bad_input(f"cannot read {exc.filename or spec}: {exc.strerror}")
    except ValidationError as exc:
        bad_input(f"{spec} is not a valid launch spec:\n{exc}")


@app.callback()
def main() -> None:
    """Prepare a host for vLLM and start it, from a launch spec."""


@app.command()
def prepare(
    spec: Annotated[Path, typer.Option(help="the launch spec (vllm/launch.json in a bundle)")],
    find_links: Annotated[
        list[str] | None,
        typer.Option(
            "--find-links",
            help="a folder or page of the wheels PyPI does not serve (PyTorch's CPU torch), instead of the one the "
            "lock's header names; repeatable",
        ),
    ] = None,
) -> None:
    """Build what the spec needs and is missing: the vLLM venv from its lock, then the model from its source.

    Returns at once when both are there (a unit's ExecStartPre runs it on every start). Exit 2 on a bad
    spec (or a lock it names that is not there), 1 when a step fails (its output's last lines on stderr).
    """
    _logging()
    launch = _read_spec(spec)
    if launch.venv is None and launch.model_source is None:
        log.info("%s asks for no venv and no model source: nothing to prepare", spec)
        return
    started = time.monotonic()
    try:
        python = None
        if launch.venv is not None:
            lock = launch.venv.lock_file(spec.parent)
            if not lock.is_file():
                bad_input(f"{spec}: venv.lock {launch.venv.lock} is not a file here ({lock})")
            python = ensure_venv(launch.venv.path, lock, find_links=find_links or None)
            log.info("vLLM venv ready: %s", python)
        if launch.model_source is not None and python is not None:
            model = Path(launch.model)
            ensure_model(launch.model_source, model, python, model.parent / "downloads")
            log.info("model ready: %s", model)
    except PrepareError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(ExitCode.CHECK_FAILED) from None
    log.info("prepared in %.1f s", time.monotonic() - started)


@app.command()
def run(
    spec: Annotated[Path, typer.Option(help="the launch spec (vllm/launch.json in a bundle)")],
    python: Annotated[
        Path | None,
        typer.Option(help=f"python of the vLLM install (default: ${VLLM_PYTHON_ENV}, else the spec's venv, else this python)"),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="print the command and capacity report; start nothing")
    ] = False,
    check: Annotated[bool, typer.Option(help="validate the flags with vLLM's own parser first")] = True,
) -> None:
    """Check the spec's capacity, then replace this process with vLLM (so a supervisor's signals reach vLLM)."""
    _logging()
    launch = _read_spec(spec)
    interpreter = vllm_interpreter(launch, python)
    try:
        env = build_env(launch)
        report = plan_for_spec(launch)
        argv = build_argv(launch, interpreter, env)
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



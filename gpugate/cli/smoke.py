"""`gpugate smoke`: check a live gateway from outside, as a client would."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from gpugate.cli.options import ExitCode
from gpugate.render.settings import public_url
from gpugate.smoke import SmokeTarget, report_table, smoke
from gpugate.spec import SloSpec
from gpugate.stackfile import SpecError, Stack, load_stack


def smoke_command(
    url: Annotated[str | None, typer.Option("--url", help="the gateway's public base URL; default: the stack's")] = None,
    key_file: Annotated[Path | None, typer.Option("--key-file", help="file holding a client key (ggk_...) for the smoke requests")] = None,
    stack: Annotated[
        str | None, typer.Option("--stack", "-s", help="stack whose SLOs, model and release apply (name or stack file path)")
    ] = None,
    ca_file: Annotated[Path | None, typer.Option("--ca-file", help="CA certificate to trust (a private CA, e.g. a local stack's)")] = None,
    latency_slo: Annotated[float | None, typer.Option("--latency-slo", min=0.1, help="seconds a chat may take; default: the stack's p95 SLO")] = None,
    model: Annotated[str | None, typer.Option("--model", help="model name to expect and ask; default: the stack's served name")] = None,
    record: Annotated[Path | None, typer.Option("--record", help="write the result (with the stack's release) to this JSON file for `gpugate promote`")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Check a live gateway from outside with the official openai client, as a client would.

    Models listed, a chat and a streamed chat within the latency SLO, a wrong key refused with 401,
    vLLM's own paths (/metrics, /invocations, /v1/load_lora_adapter, /docs) not reachable, TLS valid with HSTS.

    Exits 0 when every check passes, 1 with a table of what failed, 2 on bad input.
    """
    out, err = Console(soft_wrap=True), Console(stderr=True, soft_wrap=True)

    def bad_input(message: str) -> typer.Exit:
        err.print(f"[bold red]error:[/] {message}", highlight=False)
        return typer.Exit(ExitCode.BAD_INPUT)

    loaded: Stack | None = None
    if stack is not None:
        try:
            loaded = load_stack(stack)
        except SpecError as problem:
            raise bad_input(f"stack {stack!r} is not valid:\n  " + "\n  ".join(map(str, problem.problems))) from None
    if record is not None and loaded is None:
        raise bad_input("--record needs --stack: a smoke record names the release it checked")
    if url is None:
        if loaded is None:
            raise bad_input("give --url, or --stack to smoke the stack's public URL")
        url = public_url(loaded.spec)
    if key_file is None:
        raise bad_input("give --key-file: a file holding a client key of this gateway")
    try:
        key = key_file.read_text().strip()
    except OSError as problem:
        raise bad_input(f"cannot read the key file {key_file}: {problem.strerror}") from None
    if not key:
        raise bad_input(f"the key file {key_file} is empty")
    if ca_file is not None and not ca_file.is_file():
        raise bad_input(f"no CA file at {ca_file}")
    slo = loaded.spec.slo if loaded else SloSpec()
    target = SmokeTarget(
        url=url.rstrip("/"),
        key=key,
        ca_file=ca_file,
        model=model or (loaded.spec.model.served_name if loaded else None),
        latency_slo_s=latency_slo or slo.latency_p95_seconds,
        ttft_slo_s=slo.ttft_p95_seconds if loaded else None,
    )
    report = smoke(target, loaded)
    if record is not None:
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(report.model_dump_json(indent=2) + "\n")
    if as_json:
        out.print_json(report.model_dump_json())
    else:
        out.print(report_table(report))
        failed = [c for c in report.checks if c.ok is False]
        not_run = sum(c.ok is None for c in report.checks)
        passed = len(report.checks) - len(failed) - not_run
        out.print(f"{passed} passed, {len(failed)} failed" + (f", {not_run} not run" if not_run else ""))
        for c in failed:
            if c.ok is False:
                out.print(f"FAIL {c.check}: {c.evidence} (expected: {c.threshold})", style="bold red", highlight=False)
        if record is not None:
            out.print(f"recorded in {record}", highlight=False)
    raise typer.Exit(ExitCode.OK if report.ok else ExitCode.CHECK_FAILED)

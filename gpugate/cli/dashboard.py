"""`gpugate dashboard`: the stack's Grafana dashboard, or every panel's PromQL."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from gpugate.cli.options import StackOpt, load_or_exit
from gpugate.render.dashboards import dashboard_files, panel_queries


def dashboard_command(
    stack: StackOpt,
    out: Annotated[Path | None, typer.Option("--out", help="write the JSON to this file instead of stdout")] = None,
    queries: Annotated[bool, typer.Option("--queries", help="list every panel's PromQL instead, one `title<TAB>query` a line")] = False,
) -> None:
    """Print the stack's Grafana dashboard (JSON to import or provision), or with --queries every panel's PromQL."""
    loaded = load_or_exit(stack)
    if queries:
        data = "".join(f"{title}\t{expr}\n" for title, expr in panel_queries(loaded.spec)).encode()
    else:
        data = next(iter(dashboard_files(loaded.spec, loaded.name).values()))
    if out is None:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(data)

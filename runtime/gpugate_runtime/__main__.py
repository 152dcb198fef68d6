"""`python -m gpugate_runtime`: the host CLI."""

from gpugate_runtime.cli import app

app(prog_name="gpugate-runtime")

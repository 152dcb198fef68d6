"""`python -m gpugate` is the `gpugate` command."""

from gpugate.cli import app

app()

"""The `gpugate` CLI with `run` mounted as gpugate/cli.py mounts it (mounted here too until cli.py does)."""

from __future__ import annotations

import sys

from gpugate.cli import app
from gpugate.runtasks import RUN_CONTEXT_SETTINGS, run_command

if "run" not in {command.name for command in app.registered_commands}:
    app.command("run", context_settings=RUN_CONTEXT_SETTINGS, add_help_option=False)(run_command)

if __name__ == "__main__":
    sys.exit(app(prog_name="gpugate"))

"""The shape the architecture promises, checked: imports run one way, and no module outgrows one reader."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MAX_MODULE_LINES = 600


def test_imports_run_one_way_and_no_siblings_import_each_other_in_a_cycle():
    # import-linter reads the contracts from pyproject.toml ([tool.importlinter]): gpugate's layers from the
    # runtime contract up to the command line, the runtime's own layers, and no cycles between siblings.
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint), "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "3 kept, 0 broken" in result.stdout


def test_no_module_outside_tests_is_longer_than_a_reader_holds():
    modules = [p for top in ("gpugate", "runtime", "infra", "runbooks", "bench") for p in (REPO / top).rglob("*.py")]
    assert len(modules) > 50
    long = {str(p.relative_to(REPO)): n for p in modules if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert long == {}, f"split these by what they do: {long}"

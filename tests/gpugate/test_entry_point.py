"""The installed `gpugate` command (the console script of [project.scripts]) runs the verbs a user types: stacks,
dashboard, logs and smoke, each once through the real entry point, in a fresh process; no service is started."""

from __future__ import annotations

import json
import os
from pathlib import Path

from gpugate.render.dashboards import panel_queries
from gpugate.stackfile import load_stack, stack_names
from tests.conftest import GPUGATE_SCRIPT, run_gpugate_script


def env_with(**extra: str) -> dict[str, str]:
    return {**os.environ, "COLUMNS": "200", **extra}


def test_the_console_script_is_installed_and_names_its_entry_point():
    assert GPUGATE_SCRIPT.is_file() and os.access(GPUGATE_SCRIPT, os.X_OK)
    assert "from gpugate.cli import app" in GPUGATE_SCRIPT.read_text()


def test_gpugate_stacks_lists_every_stack_file():
    result = run_gpugate_script("stacks", "--json", env=env_with())
    assert result.returncode == 0, result.stderr
    listed = json.loads(result.stdout)
    assert [row["stack"] for row in listed] == sorted(stack_names()) and len(listed) >= 4
    assert {row["stack"]: row["target"] for row in listed}["local"] == "local"


def test_gpugate_dashboard_queries_prints_every_panels_promql():
    result = run_gpugate_script("dashboard", "--stack", "local", "--queries", env=env_with())
    assert result.returncode == 0, result.stderr
    printed = [tuple(line.split("\t", 1)) for line in result.stdout.splitlines()]
    assert printed == panel_queries(load_stack("local").spec) and len(printed) >= 10


def test_gpugate_logs_shows_the_last_lines_of_a_services_log_and_refuses_an_unknown_one(tmp_path: Path):
    # given a local stack's state dir whose Caddy log has three lines
    logs = tmp_path / "local" / "var" / "log" / "gpugate"
    logs.mkdir(parents=True)
    (logs / "caddy.log").write_text("first\nsecond\nthird\n")
    env = env_with(GPUGATE_STATE_DIR=str(tmp_path))
    # when the last two are asked for, then exactly they are printed
    shown = run_gpugate_script("logs", "--stack", "local", "-n", "2", "caddy", env=env)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.splitlines() == ["second", "third"]
    # and a service without a log exits 2 naming the logs there are
    missing = run_gpugate_script("logs", "--stack", "local", "vllm", env=env)
    assert missing.returncode == 2 and "no log for 'vllm'" in missing.stderr and "caddy" in missing.stderr


def test_gpugate_smoke_against_nothing_listening_exits_1_naming_the_failed_checks(tmp_path: Path):
    # given a key file and a URL where no gateway listens (a port nothing binds: 1)
    key_file = tmp_path / "key"
    key_file.write_text("ggk_" + "0" * 12 + "_" + "0" * 64 + "\n")
    # when smoke checks it, then it exits 1 (checks failed, not bad input) with every check it could not pass
    result = run_gpugate_script(
        "smoke", "--stack", "local", "--url", "https://127.0.0.1:1", "--key-file", str(key_file), "--json", env=env_with(), timeout=120
    )
    assert result.returncode == 1, result.stdout + result.stderr
    checks = {check["check"]: check for check in json.loads(result.stdout)["checks"]}
    assert checks["tls-hsts"]["ok"] is False and "Connection refused" in checks["tls-hsts"]["evidence"]
    assert len(checks) >= 5 and not [name for name, check in checks.items() if check["ok"]]

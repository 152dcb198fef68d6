"""`gpugate run`: finding a stack's host, help for every task, and refusing what it cannot do before touching a host."""

from __future__ import annotations

import inspect
import json
import os
import stat
from pathlib import Path

import pytest

from gpugate.cli.run import resolve_target, task_collection
from gpugate.stackfile import load_stack
from tests.runbooks.conftest import gpugate_run

TASKS = ("status", "logs", "drain", "restart", "rotate-key", "revoke-key", "reload-proxy")
UNROUTABLE = "root@192.0.2.1"  # TEST-NET-1: a connection attempt would hang until the timeout


def test_run_help_lists_every_task_with_its_summary():
    result = gpugate_run("--help")
    assert result.returncode == 0, result.stderr
    for name in TASKS:
        summary = inspect.getdoc(task_collection()[name].body).splitlines()[0]
        assert f"{name}" in result.stdout and summary in result.stdout


@pytest.mark.parametrize("name", TASKS)
def test_task_help_shows_its_docstring_and_arguments_without_a_stack(name):
    task = task_collection()[name]
    result = gpugate_run(name, "--help")
    assert result.returncode == 0, result.stderr
    assert inspect.getdoc(task.body).splitlines()[0] in result.stdout
    for argument in task.get_arguments():
        assert (argument.name.upper() if argument.positional else f"--{argument.name}") in result.stdout


def test_unknown_task_exits_2_naming_the_tasks():
    result = gpugate_run("reboot", "--stack", "local")
    assert result.returncode == 2
    assert "no task 'reboot'" in result.stderr and "rotate-key" in result.stderr


def test_bad_task_argument_exits_2_before_any_connection():
    result = gpugate_run("rotate-key", "--stack", "local", "--host", UNROUTABLE, "team-a", "--overlapp", "1h", timeout=10)
    assert result.returncode == 2
    assert "--overlapp" in result.stderr and "gpugate run rotate-key --help" in result.stderr


def test_missing_positional_argument_exits_2():
    result = gpugate_run("revoke-key", "--stack", "local", "--host", UNROUTABLE, timeout=10)
    assert result.returncode == 2
    assert "'key_id'" in result.stderr


def test_revoke_key_refuses_the_key_itself_in_argv_before_any_connection():
    key = "ggk_0123456789ab_" + "ab" * 32
    result = gpugate_run("revoke-key", "--stack", "local", "--host", UNROUTABLE, key, timeout=10)
    assert result.returncode == 2
    assert "not a key id" in result.stderr and "- < FILE" in result.stderr and key not in result.stderr


def test_kubernetes_stack_is_refused_with_what_to_use_instead():
    result = gpugate_run("status", "--stack", "prod")
    assert result.returncode == 2
    assert "Kubernetes" in result.stderr and "kubectl" in result.stderr


def test_cloud_stack_without_the_pulumi_cli_asks_for_the_host(tmp_path):
    env = {**os.environ, "PATH": str(tmp_path)}  # no pulumi on PATH
    result = gpugate_run("status", "--stack", "staging", env=env)
    assert result.returncode == 2
    assert "ssh_host" in result.stderr and "--host" in result.stderr


def _fake_pulumi(directory: Path, outputs: dict) -> None:
    """A stand-in for the Pulumi CLI (which cannot be installed here): answers `stack output --json`."""
    script = directory / "pulumi"
    script.write_text(
        "#!/bin/sh\n"
        'if [ "$1 $2 $3 $4 $5" = "stack output --json -s staging" ]; then\n'
        f"  cat <<'EOF'\n{json.dumps(outputs)}\nEOF\n"
        "  exit 0\nfi\necho \"unexpected: $*\" >&2\nexit 3\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)


def test_cloud_stack_host_and_proxy_command_come_from_the_pulumi_outputs(tmp_path, monkeypatch):
    _fake_pulumi(tmp_path, {"ssh_host": "i-0abc123", "ssh_proxy_command": "aws ssm start-session --target %h --parameters portNumber=%p"})
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    target = resolve_target(load_stack("staging"), user="ubuntu")
    assert (target.host, target.user, target.port) == ("i-0abc123", "ubuntu", None)
    assert target.proxy_command == "aws ssm start-session --target i-0abc123 --parameters portNumber=22"
    assert target.facts["root"] == "/" and target.facts["supervisor"] == "systemd"


def test_host_option_overrides_the_pulumi_output_and_takes_user_and_port(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no pulumi: --host must be enough
    target = resolve_target(load_stack("staging"), host="admin@203.0.113.7:2222")
    assert (target.host, target.user, target.port, target.proxy_command) == ("203.0.113.7", "admin", 2222, None)


def test_local_stack_is_this_machine_with_its_state_dir_and_supervisord(tmp_path, monkeypatch):
    monkeypatch.setenv("GPUGATE_STATE_DIR", str(tmp_path))
    target = resolve_target(load_stack("local"))
    assert target.host == "127.0.0.1"
    assert target.facts["root"] == str(tmp_path / "local")
    assert target.facts["supervisor"] == "supervisord" and target.facts["service_user"] is None

"""Stacks are found the way `pulumi` finds them: the Pulumi.yaml of the working directory or a parent, and its stackConfigDir."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO, STACKS

GPUGATE = Path(sys.executable).with_name("gpugate")


def gpugate(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """The installed `gpugate` command, as an operator runs it from their own repository."""
    return subprocess.run([str(GPUGATE), *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def operator_repo(root: Path, config_dir: str | None = "stacks") -> Path:
    """A repository of the operator's own: a Pulumi project whose stacks live in `config_dir`."""
    root.mkdir(parents=True)
    project = (REPO / "Pulumi.yaml").read_text()
    if config_dir != "stacks":
        project = project.replace("stackConfigDir: stacks", f"stackConfigDir: {config_dir}" if config_dir else "")
    (root / "Pulumi.yaml").write_text(project)
    stacks = root / (config_dir or "")
    stacks.mkdir(parents=True, exist_ok=True)
    text = (STACKS / "Pulumi.staging.yaml").read_text().replace("llm.staging.gpugate.example.com", "llm.mine.example.org")
    (stacks / "Pulumi.mine.yaml").write_text(text)
    return root


def test_render_finds_the_stack_in_the_pulumi_project_of_the_working_directory(tmp_path):
    repo = operator_repo(tmp_path / "ops")
    result = gpugate("render", "--stack", "mine", "--out", str(tmp_path / "out"), cwd=repo)
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["stack"] == "mine"
    assert b"llm.mine.example.org" in (tmp_path / "out" / "caddy" / "Caddyfile").read_bytes()


def test_a_subdirectory_of_the_project_finds_it_too_and_stack_config_dir_is_honoured(tmp_path):
    repo = operator_repo(tmp_path / "ops", config_dir="environments/prod")
    (repo / "docs" / "deep").mkdir(parents=True)
    listed = gpugate("stacks", "--json", cwd=repo / "docs" / "deep")
    assert listed.returncode == 0, listed.stderr
    assert [row["stack"] for row in json.loads(listed.stdout)] == ["mine"]


def test_without_stack_config_dir_the_stacks_sit_next_to_pulumi_yaml(tmp_path):
    repo = operator_repo(tmp_path / "ops", config_dir=None)
    result = gpugate("render", "--stack", "mine", "--out", str(tmp_path / "out"), cwd=repo)
    assert result.returncode == 0, result.stderr


def test_outside_any_pulumi_project_a_stack_name_exits_2_saying_what_was_looked_for(tmp_path):
    empty = tmp_path / "nowhere"
    empty.mkdir()
    for args in (("render", "--stack", "mine", "--out", str(tmp_path / "out")), ("stacks",), ("validate", "--all")):
        result = gpugate(*args, cwd=empty)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert "Pulumi.yaml" in result.stderr and str(empty) in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_stack_file_path_works_anywhere(tmp_path):
    empty = tmp_path / "nowhere"
    empty.mkdir()
    shutil.copy2(STACKS / "Pulumi.staging.yaml", empty / "Pulumi.staging.yaml")
    result = gpugate("render", "--stack", str(empty / "Pulumi.staging.yaml"), "--out", str(tmp_path / "out"), cwd=empty)
    assert result.returncode == 0, result.stderr

"""`gpugate validate` runs the real consuming tools, and catches a template that breaks."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from gpugate.stackfile import load_stack
from gpugate.validate import image_verdicts
from tests.conftest import REPO, edit_stack, run_gpugate


def test_validate_all_passes_and_names_each_real_tool_per_stack():
    result = run_gpugate("validate", "--all")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    for stack in ("local", "dev", "staging"):
        ran = " ".join(line for line in lines if f" {stack} " in line)
        for tool in ("caddy validate (caddy 2.", "promtool check config", "promtool check rules", "amtool check-config"):
            assert tool in ran, (stack, tool)
    # a cluster's Prometheus and Alertmanager are kube-prometheus-stack's: its bundle is objects
    ran = " ".join(line for line in lines if " prod " in line)
    for tool in ("caddy validate (caddy 2.", "promtool check rules", "kubernetes-validate + CRD models"):
        assert tool in ran, ("prod", tool)
    for vm in ("dev", "staging"):
        ran = " ".join(line for line in lines if f" {vm} " in line)
        assert "cloud-init schema (cloud-init" in ran and "systemd-analyze verify" in ran
    # the CPU stack's hosts build vLLM's venv from the bundle's lock: every file of a bundle has a checker
    assert any(" smoke " in line and "vllm/cpu.lock" in line and "hash-locked requirements" in line for line in lines)
    assert all(line.startswith("PASS") for line in lines if line.startswith(("PASS", "FAIL")))


def _checkout_copy(tmp_path: Path) -> Path:
    """A copy of the code, templates and stacks, as a contributor's working tree."""
    root = tmp_path / "checkout"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for part in ("gpugate", "runtime", "templates", "stacks", "infra", "runbooks"):
        shutil.copytree(REPO / part, root / part, ignore=ignore)
    shutil.copy2(REPO / "Pulumi.yaml", root / "Pulumi.yaml")
    return root


def _validate_in(root: Path, stack: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{root}:{root / 'runtime'}"}
    return subprocess.run(
        [sys.executable, "-m", "gpugate", "validate", "--stack", stack], cwd=root, env=env, capture_output=True, text=True, timeout=300
    )


def test_a_template_change_that_breaks_the_caddyfile_fails_validation(tmp_path):
    # given a contributor's change that leaves a block unclosed in the Caddyfile template
    root = _checkout_copy(tmp_path)
    template = root / "templates" / "common" / "Caddyfile.j2"
    template.write_text(template.read_text() + "\nbroken.example.com {\n\treverse_proxy {\n")
    # when validating
    result = _validate_in(root, "staging")
    # then caddy itself rejects the file, and validate exits 1 naming it
    assert result.returncode == 1, result.stdout
    assert "FAIL  staging    caddy/Caddyfile" in result.stdout
    assert "PASS  staging    prometheus/prometheus.yml" in result.stdout


def test_a_change_that_breaks_an_alert_rule_fails_validation(tmp_path):
    # given an alert expression that is not valid PromQL
    root = _checkout_copy(tmp_path)
    alerts = root / "gpugate" / "render" / "alerts.py"
    alerts.write_text(alerts.read_text().replace("'up{job=\"vllm\"} == 0'", "'up{job=\"vllm\" == 0'", 1))
    result = _validate_in(root, "local")
    assert result.returncode == 1, result.stdout
    assert "FAIL  local      prometheus/rules/gpugate.rules.yml" in result.stdout


def test_validate_needs_exactly_one_of_stack_or_all():
    result = run_gpugate("validate")
    assert result.returncode == 2
    assert "--stack" in result.stderr and "--all" in result.stderr


def test_validate_warns_once_per_placeholder_image_and_still_passes():
    # given prod as committed: its vLLM, Caddy, runtime and DCGM images pinned by placeholder digests
    result = run_gpugate("validate", "--stack", "prod")
    # then validate passes (the files are valid) but prints a WARN line naming each placeholder's field
    assert result.returncode == 0, result.stdout + result.stderr
    warned = [line for line in result.stdout.splitlines() if line.startswith("WARN")]
    fields = ["gpugate:vllm.image", *(f"gpugate:kubernetes.images.{n}" for n in ("caddy", "runtime", "dcgm_exporter"))]
    assert len(warned) == len(fields) == 4
    for field, line in zip(fields, warned, strict=True):
        assert f"Pulumi.prod.yaml {field}" in line
    assert "placeholder digest; allowed: repo@sha256:" in result.stdout and "gpugate promote` refuse it" in result.stdout
    assert "4 warnings, 0 failed" in result.stdout


def test_a_stack_whose_images_are_pinned_gets_no_warning(tmp_path):
    real = "sha256:" + "0123456789abcdef" * 4

    def pinned(config: dict) -> None:
        config["gpugate:vllm"]["image"] = "vllm/vllm-openai@" + real
        for name in config["gpugate:kubernetes"]["images"]:
            config["gpugate:kubernetes"]["images"][name] = config["gpugate:kubernetes"]["images"][name].split("@")[0] + "@" + real

    assert len(image_verdicts(load_stack("prod"))) == 4
    assert image_verdicts(load_stack(edit_stack("prod", tmp_path / "Pulumi.prod.yaml", pinned))) == []

"""The rendered alert rules, tested by the real `promtool test rules`: every alert fires when it should and stays quiet when it should not."""

from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML
import yaml

from gpugate.render.alerts import SEVERITIES, alerts, routing_alerts, rule_groups
from gpugate_runtime.contract.host import ALERT_RULES
from gpugate.targets import render_bundle
from gpugate.stackfile import Stack, load_stack, stack_names
from tests.conftest import edit_stack

HERE = Path(__file__).resolve().parent
RULES_FILE = "gpugate.rules.yml"  # what every test file names in `rule_files`
PROMTOOL_TIMEOUT_S = 120

# The thresholds the test files are written against, pinned here so that tuning a real stack's
# SLOs does not break them. Each test directory renders the rules of one real stack with these.
REFERENCE = {
    "gpugate:slo": {
        "availability": 0.99,
        "latency_p95_seconds": 10,
        "ttft_p95_seconds": 2,
        "queue_backlog": 16,
        "kv_cache_usage": 0.9,
        "gpu_memory_usage": 0.97,
        "cert_expiry_days": 14,
        "rejected_keys_per_minute": 30,
    },
    "gpugate:limits": {"rotation_days": 90},
    "gpugate:vllm": {"gpu_memory_utilization": 0.9},
    "gpugate:alerts": {"runbook_base_url": "https://github.com/gpugate/gpugate/blob/main/runbooks"},
}
# test directory -> the real stack whose rules it tests: a VM with a public CA, the local stack
# with Caddy's internal CA, Kubernetes with GPU memory from DCGM
VARIANTS = {"vm": "staging", "local": "local", "kubernetes": "prod"}
# test directory -> a stack that routes (two tiers, a provider): the router's alerts exist only there
ROUTED = {"routing": "local"}


def routed(config: dict[str, Any]) -> None:
    pin_reference(config)
    config["gpugate:tiers"] = {"fast": {"model": {**config["gpugate:model"], "served_name": "fast"}}}
    config["gpugate:providers"] = {"cloud": {"base_url": "https://api.example.com/v1", "models": {"fast": "small"},
                                             "input_usd_per_mtok": 1, "output_usd_per_mtok": 2}}  # fmt: skip


def every_alert_name() -> set[str]:
    """The alerts of every stack, and those only a routing stack renders."""
    names = {a.name for stack in stack_names() for a in alerts(load_stack(stack).spec)}
    return names | {a.name for a in routing_alerts(load_stack("local").spec)}


def pin_reference(config: dict[str, Any]) -> None:
    for key, values in REFERENCE.items():
        section = config.setdefault(key, {})
        for name, value in values.items():
            section[name] = value


def promtool_test_files() -> list[Path]:
    return sorted(HERE.glob("*/*.test.yml"))


@pytest.fixture(scope="module")
def rules_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Per variant, a directory holding that stack's rendered rules (and, later, the test files)."""
    dirs = {}
    for variant, stack in VARIANTS.items():
        directory = tmp_path_factory.mktemp(variant)
        write_rules(load_stack(edit_stack(stack, directory / f"Pulumi.{stack}.yaml", pin_reference)), directory)
        dirs[variant] = directory
    for variant, stack in ROUTED.items():
        directory = tmp_path_factory.mktemp(variant)
        write_rules(load_stack(edit_stack(stack, directory / f"Pulumi.{stack}.yaml", routed)), directory)
        dirs[variant] = directory
    return dirs


def write_rules(stack: Stack, directory: Path) -> None:
    """The rules exactly as the stack's bundle carries them: a host's rules file, or a cluster's PrometheusRule."""
    files = render_bundle(stack).files
    if ALERT_RULES in files:
        (directory / RULES_FILE).write_bytes(files[ALERT_RULES])
        return
    (rule,) = [p for p in files if p.startswith("kubernetes/") and "/prometheusrule-" in p]
    groups = YAML(typ="safe", pure=True).load(files[rule])["spec"]
    buffer = io.StringIO()
    YAML(typ="safe", pure=True).dump(groups, buffer)
    (directory / RULES_FILE).write_text(buffer.getvalue())


def promtool_test(rules_dir: Path, test_file: Path) -> subprocess.CompletedProcess[str]:
    """Run `promtool test rules` on a copy of the test file placed next to the rendered rules."""
    if shutil.which("promtool") is None:
        pytest.fail("promtool is not installed (./scripts/test installs it: apt-get install prometheus)")
    shutil.copy(test_file, rules_dir / test_file.name)
    return subprocess.run(
        ["promtool", "test", "rules", test_file.name],
        cwd=rules_dir, capture_output=True, text=True, timeout=PROMTOOL_TIMEOUT_S,
    )


def cases(test_file: Path) -> list[tuple[str, bool, str]]:
    """(alertname, fires?, test name) of every alert_rule_test in a promtool test file."""
    document = yaml.safe_load(test_file.read_text())
    return [
        (check["alertname"], bool(check.get("exp_alerts")), group.get("name", ""))
        for group in document["tests"]
        for check in group.get("alert_rule_test", [])
    ]


@pytest.mark.parametrize("test_file", promtool_test_files(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_promtool_unit_tests_pass_against_the_rendered_rules(rules_dirs, test_file):
    # given the rules rendered for the test file's stack, when promtool runs its cases
    result = promtool_test(rules_dirs[test_file.parent.name], test_file)
    # then every case holds: right alerts, labels and annotations at each eval_time
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_firing_and_a_silent_case():
    # given every case of every promtool test file
    fired: set[str] = set()
    silent: set[str] = set()
    for test_file in promtool_test_files():
        for alertname, fires, _ in cases(test_file):
            (fired if fires else silent).add(alertname)
    # then each alert of every stack has at least one case where it fires and one where it stays quiet
    names = every_alert_name()
    assert not names - fired, f"no promtool case shows these alerts firing: {sorted(names - fired)}"
    assert not names - silent, f"no promtool case shows these alerts staying silent: {sorted(names - silent)}"


def test_test_files_only_name_alerts_that_exist():
    # a case for an alert that no longer exists passes vacuously (promtool expects nothing and gets nothing)
    names = every_alert_name()
    unknown = {(f.name, name) for f in promtool_test_files() for name, _, _ in cases(f) if name not in names}
    assert not unknown


def test_a_rule_whose_threshold_moves_fails_its_promtool_test(rules_dirs, tmp_path):
    # given the VM rules rendered with a queue backlog threshold far above what the test feeds
    def moved(config: dict[str, Any]) -> None:
        pin_reference(config)
        config["gpugate:slo"]["queue_backlog"] = 1000

    write_rules(load_stack(edit_stack("staging", tmp_path / "Pulumi.moved.yaml", moved)), tmp_path)
    # when the vLLM capacity cases run against them
    result = promtool_test(tmp_path, HERE / "vm" / "vllm-capacity.test.yml")
    # then promtool fails, naming the alert that no longer fires
    assert result.returncode == 1
    assert "VllmQueueBacklog" in result.stdout + result.stderr


@pytest.mark.parametrize("stack", stack_names())
def test_every_rule_has_for_severity_summary_live_value_and_runbook(stack):
    spec = load_stack(stack).spec
    base = str(spec.alerts.runbook_base_url).rstrip("/")
    for rule in rule_groups(spec)["groups"][0]["rules"]:
        annotations = rule["annotations"]
        assert rule["for"], rule["alert"]
        assert rule["labels"]["severity"] in SEVERITIES, rule["alert"]
        assert set(annotations) == {"summary", "description", "value", "runbook_url"}, rule["alert"]
        assert "$value" in annotations["description"] or rule["alert"].endswith(("Down", "Failing")), rule["alert"]
        assert annotations["runbook_url"].startswith(base + "/") and annotations["runbook_url"].endswith(".md")


@pytest.mark.parametrize(
    ("stack", "alertname", "fragment"),
    [
        # availability 99.5% -> a 0.5% budget -> page at 14.4 x 0.5% = 7.2%
        ("staging", "GatewayHighErrorBudgetBurn", "> 0.072"),
        # availability 99.9% -> 14.4 x 0.1% = 1.44%
        ("prod", "GatewayHighErrorBudgetBurn", "> 0.0144"),
        ("prod", "GatewayHighLatency", "> 8"),
        ("local", "GatewayHighLatency", "> 20"),
        # Caddy's internal CA issues 12-hour certificates: the local stack alerts 2 hours before expiry
        ("local", "TlsCertificateExpiring", "< 7200"),
        ("staging", "TlsCertificateExpiring", f"< {14 * 86400}"),
    ],
)
def test_thresholds_follow_each_stacks_slo(stack, alertname, fragment):
    rules = {r["alert"]: r for r in rule_groups(load_stack(stack).spec)["groups"][0]["rules"]}
    assert fragment in rules[alertname]["expr"]

"""A wrong stack file is refused with exit 2 and a message naming the file, the key path and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpugate.stackfile import load_stack, stack_names
from tests.conftest import run_gpugate


def _delete(*path: str):
    def change(config):
        node = config
        for part in path[:-1]:
            node = node[part]
        del node[path[-1]]

    return change


def _set(value, *path: str):
    def change(config):
        node = config
        for part in path[:-1]:
            node = node[part]
        node[path[-1]] = value

    return change


# (case, source stack, change, key path the message must name, what-is-allowed text it must contain)
BAD_STACKS = [
    ("missing key", "staging", _delete("gpugate:domain"), "gpugate:domain", "required key is missing"),
    ("wrong type", "staging", _set("lots", "gpugate:model", "max_model_len"), "gpugate:model.max_model_len", "valid integer"),
    ("out of range", "staging", _set(0.99, "gpugate:vllm", "gpu_memory_utilization"), "gpugate:vllm.gpu_memory_utilization", "less than or equal to 0.95"),
    ("unknown nested key", "staging", _set(0.7, "gpugate:model", "temperature"), "gpugate:model.temperature", "allowed here: dtype, id, max_model_len"),
    ("unknown top-level key", "dev", _set(3, "gpugate:replicas"), "gpugate:replicas", "allowed here: admin_cidrs, alerts"),
    ("bad CIDR", "staging", _set(["10.0.0.1/8"], "gpugate:admin_cidrs"), "gpugate:admin_cidrs", "host bits zero"),
    ("world-open SSH", "staging", _set(["0.0.0.0/0"], "gpugate:admin_cidrs"), "gpugate:admin_cidrs", "list admin networks or none"),
    ("unknown GPU type", "staging", _set("T4", "gpugate:gpu", "type"), "gpugate:gpu.type", "'cpu', 'L4', 'A10G', 'A100-80GB' or 'H100-80GB'"),
    ("max_model_len above the model's limit", "staging", _set(65536, "gpugate:model", "max_model_len"), "gpugate:model.max_model_len", "allowed: 1..32768"),
    ("impossible GPU count on AWS", "staging", _set(2, "gpugate:gpu", "count"), "gpugate:gpu.count", "allowed: 1 (g6.xlarge), 4 (g6.12xlarge), 8 (g6.48xlarge)"),
    ("GPU type the cloud lacks", "dev", _set("A10G", "gpugate:gpu", "type"), "gpugate:gpu.type", "allowed on GCP: cpu, L4, A100-80GB, H100-80GB"),
    ("image not pinned by digest", "prod", _set("vllm/vllm-openai:latest", "gpugate:vllm", "image"), "gpugate:vllm.image", "@sha256:"),
    ("unknown alert channel", "staging", _set({"kind": "teams"}, "gpugate:alerts", "channel"), "gpugate:alerts.channel", "allowed: slack, pagerduty, email, webhook, file"),
    ("unpinned model", "staging", _delete("gpugate:model", "revision"), "gpugate:model.revision", "40-hex commit"),
    ("model outside the catalog", "staging", _set("acme/secret-model", "gpugate:model", "id"), "gpugate:model.id", "allowed: HuggingFaceTB/SmolLM2-135M-Instruct"),
    ("local stack asking for a GPU", "local", _set({"type": "L4", "count": 1}, "gpugate:gpu"), "gpugate:gpu.type", "allowed: cpu"),
    ("replica range upside down", "prod", _set({"min": 4, "max": 2}, "gpugate:kubernetes", "replicas"), "gpugate:kubernetes.replicas.max", "allowed: 4..1000"),
    ("local options on a cloud stack", "staging", _set({"expose": True}, "gpugate:local"), "gpugate:local", "only for target local"),
    ("namespace typo", "staging", _set("x.example.com", "gpugatee:domain"), "gpugatee:domain", "allowed: gpugate, aws, gcp"),
]


@pytest.mark.parametrize(("case", "source", "change", "key_path", "allowed"), BAD_STACKS, ids=[c[0] for c in BAD_STACKS])
def test_bad_stack_file_exits_2_naming_file_key_and_what_is_allowed(stack_copy, tmp_path, case, source, change, key_path, allowed):
    # given a stack file with one mistake
    path = stack_copy(source, change, name="broken")
    # when a user renders it
    result = run_gpugate("render", "--stack", str(path), "--out", str(tmp_path / "out"))
    # then it is refused with exit 2, a message naming file, key path and what is allowed, and no traceback
    assert result.returncode == 2, result.stdout + result.stderr
    message = " ".join(result.stderr.split())
    assert "Pulumi.broken.yaml" in message
    assert key_path in message
    assert allowed in message
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_yaml_syntax_error_names_the_file(tmp_path):
    path = tmp_path / "Pulumi.typo.yaml"
    path.write_text("config:\n  gpugate:target: local\n   gpugate:domain: [\n")
    result = run_gpugate("validate", "--stack", str(path))
    assert result.returncode == 2
    assert "Pulumi.typo.yaml" in result.stderr and "not valid YAML" in result.stderr


def test_every_problem_in_a_file_is_reported_at_once(stack_copy):
    path = stack_copy("staging", lambda c: (_set(0.99, "gpugate:vllm", "gpu_memory_utilization")(c), _set("x", "gpugate:slo", "queue_backlog")(c)))
    result = run_gpugate("render", "--stack", str(path), "--out", "/nonexistent/never-written")
    assert result.returncode == 2
    assert "gpugate:vllm.gpu_memory_utilization" in result.stderr
    assert "gpugate:slo.queue_backlog" in result.stderr


def test_shipped_stacks_cover_the_four_environments_with_their_targets():
    targets = {name: str(load_stack(name).spec.target) for name in stack_names()}
    assert {"local": "local", "dev": "gcp", "staging": "aws", "prod": "kubernetes"}.items() <= targets.items()
    prod = load_stack("prod").spec
    assert prod.kubernetes is not None and prod.kubernetes.replicas.min >= 2
    staging = load_stack("staging").spec
    assert (staging.gpu.type, staging.gpu.count) == ("L4", 1)


def test_a_secret_in_plain_text_under_a_secret_name_is_not_a_known_key(stack_copy, tmp_path):
    # given someone pasting the Slack webhook into the stack file instead of `pulumi config set --secret`
    path = stack_copy("staging", _set("https://hooks.slack.com/services/T000/B000/XXXX", "gpugate:alert_credential"))
    result = run_gpugate("render", "--stack", str(path), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "gpugate:alert_credential" in result.stderr and "unknown key" in result.stderr
    assert "hooks.slack.com" not in result.stdout + result.stderr

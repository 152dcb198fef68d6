"""Policy pack entry point: `pulumi up --policy-pack infra/policy` serves the rules in rules.py."""

import sys
from pathlib import Path

from pulumi_policy import EnforcementLevel, PolicyPack

# The rules import gpugate's catalog from this checkout (Pulumi puts only infra/policy/ on the path).
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from infra.policy.rules import policies  # noqa: E402

PolicyPack(name="gpugate-security", enforcement_level=EnforcementLevel.MANDATORY, policies=policies())

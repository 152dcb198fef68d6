"""A stack names a region and zone where its machine is offered: `gpugate plan` refuses others, listing the allowed ones."""

from __future__ import annotations

import pytest

from tests.conftest import run_gpugate


@pytest.mark.parametrize(
    ("stack", "change", "key", "allowed"),
    [
        # a GCP zone that does not exist
        ("dev", {"gpugate:zone": "europe-west4-z"}, "gpugate:zone", "allowed: europe-west4-a, europe-west4-b, europe-west4-c"),
        # a zone that exists but does not offer the L4 machine
        ("dev", {"gpugate:region": "us-central1", "gpugate:zone": "us-central1-f"}, "gpugate:zone", "allowed: us-central1-a, us-central1-b, us-central1-c"),
        # a region GCP does not have
        ("dev", {"gpugate:region": "moon-base1", "gpugate:zone": "moon-base1-a"}, "gpugate:region", "allowed: asia-east1"),
        # an AWS region without g6.xlarge
        ("staging", {"gpugate:region": "sa-east-1"}, "gpugate:region", "allowed: ap-northeast-1"),
        # an AWS zone outside the stack's region
        ("staging", {"gpugate:zone": "eu-west-1a"}, "gpugate:zone", "allowed: us-east-1a"),
    ],
)
def test_plan_refuses_a_region_or_zone_that_does_not_offer_the_machine_and_lists_the_allowed(stack, change, key, allowed, stack_copy):
    path = stack_copy(stack, lambda c: c.update(change), name="elsewhere")
    result = run_gpugate("plan", "--stack", str(path))
    assert result.returncode == 2, result.stdout + result.stderr
    assert key in result.stderr and allowed in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_a_zone_that_offers_the_machine_plans(stack_copy):
    path = stack_copy("dev", lambda c: c.update({"gpugate:region": "us-central1", "gpugate:zone": "us-central1-b"}), name="uscentral")
    result = run_gpugate("plan", "--stack", str(path))
    assert result.returncode == 0, result.stdout + result.stderr

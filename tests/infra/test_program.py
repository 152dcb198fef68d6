"""infra/__main__.py, the file `pulumi up` runs: it reads the stack Pulumi names and exports the gateway's outputs."""

from __future__ import annotations

import runpy

import pulumi
import pytest

from gpugate.stackfile import load_stack
from infra.program import OUTPUT_NAMES, TargetNotProvisioned, gateway
from tests.conftest import REPO
from tests.infra.conftest import under_mocks


@pytest.mark.parametrize("stack", ["staging", "dev"])
def test_the_entry_point_exports_the_gateways_outputs_for_the_stack_pulumi_runs(stack, monkeypatch):
    exported: dict[str, pulumi.Output] = {}
    monkeypatch.setattr(pulumi, "export", lambda name, value: exported.__setitem__(name, value))

    def program():
        runpy.run_path(str(REPO / "infra" / "__main__.py"), run_name="__main__")
        return pulumi.Output.all(*exported.values())

    under_mocks(load_stack(stack), program)
    assert tuple(exported) == OUTPUT_NAMES


@pytest.mark.parametrize(("stack", "reason"), [("local", "gpugate up")])
def test_targets_the_program_does_not_provision_say_so(stack, reason):
    with pytest.raises(TargetNotProvisioned, match=reason):
        gateway(load_stack(stack))

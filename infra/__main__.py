"""Pulumi entry point: read the stack's spec, build its target's gateway, export the outputs."""

import sys
from pathlib import Path

import pulumi

# The program imports gpugate/ and infra/ from this checkout (Pulumi puts only infra/ on the path).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpugate.stackfile import load_stack  # noqa: E402
from infra.program import gateway, stack_outputs  # noqa: E402

for _name, _value in stack_outputs(gateway(load_stack(pulumi.get_stack()))).items():
    pulumi.export(_name, _value)

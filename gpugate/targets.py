"""A stack's bundle, whatever its target: the one entry point above the targets (local, vm, kubernetes)."""

from __future__ import annotations

from pathlib import Path

from gpugate_runtime.contract.host import VM_LAYOUT, HostLayout

from gpugate.kubernetes import render_kubernetes
from gpugate.local.bundle import local_layout, render_local
from gpugate.render.bundle import Bundle
from gpugate.spec import Target
from gpugate.stackfile import Stack
from gpugate.vm.bundle import render_vm


def default_layout(stack: Stack) -> HostLayout:
    """`/` on cloud hosts and in pods; a per-stack state directory for the local target."""
    return local_layout(stack) if stack.spec.target is Target.LOCAL else VM_LAYOUT


def render_bundle(stack: Stack, layout: HostLayout | None = None, model_dir: Path | None = None) -> Bundle:
    """Every file a stack's hosts (or cluster) run, with its manifest. `layout` moves a host's paths under
    another root (validation renders under a temporary one); `model_dir` is the local stack's checkpoint."""
    target = stack.spec.target
    if target is Target.LOCAL:
        return render_local(stack, layout, model_dir)
    if target in (Target.AWS, Target.GCP):
        return render_vm(stack, layout)
    return render_kubernetes(stack)

"""The local target's bundle: the host files, plus supervisord's program list, laid out under a per-stack state dir."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from gpugate_runtime.contract.host import LOOPBACK, HostLayout, Ports
from gpugate_runtime.contract.services import USER_GATEWAY, HostFacts, VllmProcess, services

from gpugate.local.model import MODEL_NAME
from gpugate.local.supervisord import SUPERVISOR_CONF, supervisord_conf
from gpugate.local.vllm_env import VENV_NAME, default_cache_dir, venv_python
from gpugate.render.bundle import Bundle, header, seal
from gpugate.render.dashboards import dashboard_files
from gpugate.render.host import host_files
from gpugate.render.launch import launch_spec
from gpugate.render.routes import routing_facts
from gpugate.stackfile import Stack

STATE_DIR_VAR = "GPUGATE_STATE_DIR"
# vLLM runs offline locally: the weights are the converted checkpoint in the cache.
VLLM_ENV = {"HF_HUB_OFFLINE": "1"}


def local_layout(stack: Stack) -> HostLayout:
    """`$GPUGATE_STATE_DIR/<stack>`, else `~/.local/state/gpugate/<stack>`."""
    base = os.environ.get(STATE_DIR_VAR) or Path.home() / ".local" / "state" / "gpugate"
    return HostLayout(Path(base) / stack.name)


def model_dir() -> Path:
    """The local stack's converted checkpoint in the cache (made by `python -m gpugate.local ensure`)."""
    return default_cache_dir() / "models" / MODEL_NAME


def local_facts(stack: Stack, layout: HostLayout) -> HostFacts:
    spec = stack.spec
    return HostFacts(
        layout=layout,
        ports=Ports(spec.ports.internal_base),
        # The venv's own `python`, whichever name (python, python3, a console script) started us.
        runtime_python=Path(sys.prefix) / "bin" / "python",
        https_port=spec.ports.https,
        http_port=spec.ports.http,
        # Loopback unless the stack file sets gpugate:local.expose: a single-machine gateway by default.
        public_address="" if spec.exposed else LOOPBACK,
        vllm=VllmProcess(python=venv_python(default_cache_dir() / VENV_NAME), user=USER_GATEWAY, env=VLLM_ENV),
        alert_sink=spec.alerts.channel.kind == "file",
        alert_credential=spec.alerts.needs_credential,
        internal_ca=True,  # the local target always serves with Caddy's internal CA
        **routing_facts(spec),
    )


def render_local(stack: Stack, layout: HostLayout | None = None, model: Path | None = None) -> Bundle:
    spec = stack.spec
    layout = layout or local_layout(stack)
    facts = local_facts(stack, layout)
    table = services(facts)
    launch = launch_spec(spec, facts.ports, layout, model or model_dir())
    files = host_files(stack, facts, table, launch, expect_gpu=False)
    bundle = Bundle(stack=stack.name, target=spec.target, spec_sha256=stack.spec_sha256, files=files)
    files.update(dashboard_files(spec, stack.name))
    files[SUPERVISOR_CONF] = supervisord_conf(table, layout, stack.name, header(stack))
    return seal(bundle, layout)

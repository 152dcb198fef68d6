"""A VM's systemd units, one per service of the runtime contract's table."""

from __future__ import annotations

import shlex

from gpugate_runtime.contract.host import HostLayout
from gpugate_runtime.contract.services import (
    SHELL,
    USER_ROOT,
    HostFacts,
    Service,
    is_vllm,
    unit_name,
)
from gpugate_runtime.launcher import container_name
from gpugate_runtime.settings import ENV_FILE_VAR

from gpugate.render.templates import render_template

DOCKER = "/usr/bin/docker"


def unit_file(service: Service) -> str:
    return f"systemd/{unit_name(service)}.service"


def exec_start(service: Service) -> str:
    """ExecStart: the service's argv, behind a shell only when a credential must become an environment
    variable (read from the unit's private copy, $CREDENTIALS_DIRECTORY/<name>)."""
    secrets = [c for c in service.credentials if c.env is not None]
    if not secrets:
        return shlex.join(service.argv)
    exports = " ".join(f'{c.env}="$(cat "$CREDENTIALS_DIRECTORY/{c.name}")"' for c in secrets)
    return shlex.join([str(SHELL), "-c", f"{exports} exec {shlex.join(service.argv)}"])


def unit(service: Service, facts: HostFacts, table: tuple[Service, ...], header: str) -> bytes:
    layout: HostLayout = facts.layout
    names = {s.name: unit_name(s) for s in table}
    env = dict(service.env)
    if service.env_file:
        env[ENV_FILE_VAR] = str(layout.runtime_env)
    containerised = is_vllm(service.name) and facts.vllm is not None and facts.vllm.python is None
    return render_template(
        "vm/unit.service.j2",
        header=header,
        service=service,
        after=[f"{names[a]}.service" for a in service.after if a in names] + (["docker.service"] if containerised else []),
        requires=["docker.service"] if containerised else [],
        env=env,
        exec_start=exec_start(service),
        reload=shlex.join(service.reload_argv) if service.reload_argv else None,
        prepare=shlex.join(service.prepare_argv) if service.prepare_argv else None,
        # The launcher runs vLLM's pinned image as a container of this name: clear a leftover one.
        container_cleanup=f"-{DOCKER} rm -f {container_name(service.name.partition('-')[2] or None)}" if containerised else None,
        hardened=service.user != USER_ROOT,
        writes=" ".join(str(p) for p in service.writes),
    )


def units(facts: HostFacts, table: tuple[Service, ...], header: str) -> dict[str, bytes]:
    return {unit_file(service): unit(service, facts, table, header) for service in table}

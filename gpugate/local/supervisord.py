"""The local stack's supervisord.conf, generated from the runtime contract's service table."""

from __future__ import annotations

import shlex
from pathlib import Path

from gpugate_runtime.contract.host import HostLayout
from gpugate_runtime.contract.services import SHELL, SUPERVISOR_UMASK, Service
from gpugate_runtime.settings import ENV_FILE_VAR

from gpugate.render.templates import render_template

SUPERVISOR_CONF = "supervisor/supervisord.conf"


def stdout_log(service: Service, layout: HostLayout) -> Path:
    """Where supervisord writes a program's output: <name>.log, or <name>.out.log when the service
    writes <name>.log itself (authz's decision log)."""
    own = layout.logs / f"{service.name}.log"
    return layout.logs / f"{service.name}.out.log" if own in service.logs else own


def command_argv(service: Service) -> list[str]:
    """The program's command: the service's argv, behind a shell only when a credential must become
    an environment variable (read from its file at each start, so it never sits in a config file)."""
    secrets = [c for c in service.credentials if c.env is not None]
    if not secrets:
        return list(service.argv)
    exports = " ".join(f'{c.env}="$(cat {shlex.quote(str(c.file))})"' for c in secrets)
    return [str(SHELL), "-c", f"{exports} exec {shlex.join(service.argv)}"]


def _environment(service: Service, layout: HostLayout) -> str:
    env = dict(service.env)
    if service.env_file:
        env[ENV_FILE_VAR] = str(layout.runtime_env)
    return ",".join(f'{name}="{value}"' for name, value in env.items())


def supervisord_conf(table: tuple[Service, ...], layout: HostLayout, stack: str, header: str) -> bytes:
    programs = [
        {
            "name": service.name,
            "description": service.description,
            "command": shlex.join(command_argv(service)),
            "environment": _environment(service, layout),
            "priority": 10 * (index + 1),
            "stop_timeout_s": service.stop_timeout_s,
            "log": stdout_log(service, layout),
            "umask": service.umask,
        }
        for index, service in enumerate(table)
    ]
    return render_template(
        "local/supervisord.conf.j2", header=header, layout=layout, stack=stack, programs=programs, supervisor_umask=SUPERVISOR_UMASK
    )

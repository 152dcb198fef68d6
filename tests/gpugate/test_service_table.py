"""One service table, three targets: every target's process definitions say what the table says.

The table (gpugate_runtime/contract/services.py) is rendered into supervisord programs (local), systemd
units (VM) and the proxy pod's containers (Kubernetes). Each service must appear exactly once in each
target's output, with the table's argv, user and ports.
"""

from __future__ import annotations

import configparser
import json
import shlex

import pytest
from gpugate_runtime.contract.host import CADDYFILE, LAUNCH_SPEC, LOOPBACK, RUNTIME_ENV
from gpugate_runtime.contract.services import SERVICE_UMASK, SHELL, SUPERVISOR_UMASK, UIDS, Service, services, unit_name
from ruamel.yaml import YAML

from gpugate.kubernetes.proxy import pod_services
from gpugate.local.bundle import local_facts, local_layout
from gpugate.stackfile import load_stack
from gpugate.targets import render_bundle
from gpugate.vm.bundle import vm_facts
from gpugate_runtime.contract.host import VM_LAYOUT


def exec_argv(command: list[str]) -> list[str]:
    """The argv a command finally execs: itself, or what a `/bin/sh -c '... exec ARGV'` wrapper execs."""
    if command[:2] == [str(SHELL), "-c"]:
        return shlex.split(command[2].split(" exec ", 1)[1])
    return command


def bound_ports(service: Service, files: dict[str, str]) -> set[int]:
    """The ports the rendered configuration makes `service` bind, read from the files it reads."""
    env = dict(line.split("=", 1) for line in files.get(RUNTIME_ENV, "").splitlines() if "=" in line and not line.startswith("#"))
    if service.name == "vllm":
        return {json.loads(files[LAUNCH_SPEC])["port"]}
    if service.name == "caddy":
        caddyfile = files[CADDYFILE]
        found = {int(line.split()[1]) for line in caddyfile.splitlines() if line.strip().startswith(("http_port", "https_port"))}
        found |= {int(line.split(":")[-1].rstrip(" {")) for line in caddyfile.splitlines() if line.startswith("http://") and ":" in line[7:]}
        return found
    key = f"GPUGATE_{service.name.upper()}_PORT"
    if key in env:
        return {int(env[key])}
    # Prometheus and Alertmanager take their listen address on the command line.
    return {int(a.rsplit(":", 1)[1]) for a in service.argv if a.startswith("--web.listen-address=")}


def table_ports(service: Service) -> set[int]:
    return {listen.port for listen in service.listens}


@pytest.fixture(scope="module")
def local():
    stack = load_stack("local")
    bundle = render_bundle(stack)
    return services(local_facts(stack, local_layout(stack))), {p: d.decode() for p, d in bundle.files.items()}


@pytest.fixture(scope="module", params=["dev", "staging", "smoke"])
def vm(request):
    stack = load_stack(request.param)
    bundle = render_bundle(stack)
    return services(vm_facts(stack, VM_LAYOUT)), bundle.text_files()


def test_every_service_is_one_supervisord_program_with_the_table_argv_and_ports(local):
    table, files = local
    conf = configparser.RawConfigParser()
    conf.read_string(files["supervisor/supervisord.conf"])
    programs = [s.removeprefix("program:") for s in conf.sections() if s.startswith("program:")]
    assert sorted(programs) == sorted(s.name for s in table) and len(programs) == len(set(programs)) == len(table) >= 6
    for service in table:
        command = shlex.split(conf[f"program:{service.name}"]["command"])
        assert exec_argv(command) == list(service.argv), service.name
        # the local stack runs every service as whoever runs `gpugate up`: no user= lines
        assert "user" not in conf[f"program:{service.name}"]
        assert bound_ports(service, files) == table_ports(service), service.name


def test_every_service_is_one_systemd_unit_with_the_table_argv_user_and_ports(vm):
    table, files = vm
    units = sorted(p for p in files if p.startswith("systemd/"))
    assert units == sorted(f"systemd/{unit_name(s)}.service" for s in table) and len(units) == len(table) >= 6
    for service in table:
        unit = configparser.RawConfigParser(strict=False)
        unit.read_string(files[f"systemd/{unit_name(service)}.service"])
        assert exec_argv(shlex.split(unit["Service"]["ExecStart"])) == list(service.argv), service.name
        assert unit["Service"]["User"] == service.user, service.name
        assert bound_ports(service, files) == table_ports(service), service.name
        # systemd takes LoadCredential= once per credential (configparser keeps only the last of a repeated key)
        text = files[f"systemd/{unit_name(service)}.service"]
        credentials = [line.split("=", 1)[1].split(":", 1)[0] for line in text.splitlines() if line.startswith("LoadCredential=")]
        assert sorted(credentials) == sorted(c.name for c in service.credentials), service.name


def test_every_local_program_and_supervisord_itself_create_files_no_other_user_can_read(local):
    # given the local stack's supervisord.conf
    table, files = local
    conf = configparser.RawConfigParser()
    conf.read_string(files["supervisor/supervisord.conf"])
    # then supervisord's own log and the programs' stdout logs it writes are 0600 ...
    assert int(conf["supervisord"]["umask"], 8) == SUPERVISOR_UMASK == 0o077
    # ... and every program creates files 0640 at most (Caddy's access log: authz reads it through the group)
    umasks = {service.name: int(conf[f"program:{service.name}"]["umask"], 8) for service in table}
    assert umasks == {service.name: service.umask for service in table} and len(umasks) >= 6
    assert set(umasks.values()) == {SERVICE_UMASK} and SERVICE_UMASK & 0o007 == 0o007 and SERVICE_UMASK & 0o020


def test_every_systemd_unit_sets_the_tables_umask(vm):
    table, files = vm
    umasks = {}
    for service in table:
        unit = configparser.RawConfigParser(strict=False)
        unit.read_string(files[f"systemd/{unit_name(service)}.service"])
        umasks[service.name] = int(unit["Service"]["UMask"], 8)
    assert umasks == {service.name: SERVICE_UMASK for service in table} and len(umasks) >= 6


def test_every_proxy_service_is_one_pod_container_with_the_table_argv_user_and_ports():
    stack = load_stack("prod")
    table = pod_services(stack.spec)
    objects = {p: YAML(typ="safe", pure=True).load(d) for p, d in render_bundle(stack).files.items() if p.startswith("kubernetes/")}
    deployment = objects["kubernetes/gpugate/deployment-gateway.yaml"]
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert sorted(c["name"] for c in containers) == sorted(s.name for s in table) == ["authz", "caddy", "prober"]
    env_file = objects["kubernetes/gpugate/configmap-gpugate-runtime-env.yaml"]["data"]["gpugate.env"]
    caddyfile = objects["kubernetes/gpugate/configmap-gpugate-caddy.yaml"]["data"]["Caddyfile"]
    files = {RUNTIME_ENV: env_file, CADDYFILE: caddyfile}
    by_name = {c["name"]: c for c in containers}
    for service in table:
        container = by_name[service.name]
        assert container["command"] == list(service.argv), service.name
        assert container["securityContext"]["runAsUser"] == UIDS[service.user], service.name
        exposed = {listen.port for listen in service.listens if listen.address != LOOPBACK}
        assert {p["containerPort"] for p in container.get("ports", [])} == exposed, service.name
        assert bound_ports(service, files) == table_ports(service), service.name

"""The VM targets' bundle (AWS, GCP): the host files, a systemd unit per service, the runtime wheel and its lock,
then what the cloud gets: the bundle archive the host fetches, and the user data that fetches it."""

from __future__ import annotations

import tempfile
from pathlib import Path

from gpugate_runtime.contract.host import LAUNCH_SPEC, VM_LAYOUT, VM_RUNTIME_PYTHON, VM_VLLM_VENV, HostLayout, Ports
from gpugate_runtime.contract.services import USER_GATEWAY, USER_ROOT, HostFacts, VllmProcess, services
from gpugate_runtime.launchspec import VllmVenv

from gpugate.render.archive import archive
from gpugate.render.bundle import Bundle, header, seal, sha256
from gpugate.render.host import host_files, vllm_key_file
from gpugate.render.launch import launch_spec
from gpugate.render.routes import routing_facts
from gpugate.render.wheel import RUNTIME_SOURCE, build_runtime_wheel
from gpugate.stackfile import Stack
from gpugate.vm.systemd import units
from gpugate.vm.userdata import RUNTIME_LOCK, USER_DATA, user_data

ARCHIVE = "cloud-init/bundle.tar.gz"
# vLLM's CPU build on a host without a GPU: built from this lock, next to the launch spec that names it.
VLLM_CPU_LOCK = "vllm/cpu.lock"


def vllm_process(stack: Stack, layout: HostLayout) -> VllmProcess:
    """GPU hosts: the launcher runs vLLM's pinned image with Docker (root), the weights cached in the state dir.
    Hosts without a GPU: vLLM's CPU build from its own venv, as the gateway's user."""
    if stack.spec.gpu.type == "cpu":
        return VllmProcess(
            python=VM_VLLM_VENV / "bin" / "python", user=USER_GATEWAY, env={"HF_HUB_OFFLINE": "1"}, venv=VM_VLLM_VENV
        )
    return VllmProcess(python=None, user=USER_ROOT, env={"HF_HOME": str(layout.state / "hf")})


def vm_facts(stack: Stack, layout: HostLayout) -> HostFacts:
    spec = stack.spec
    return HostFacts(
        layout=layout,
        ports=Ports(spec.ports.internal_base),
        runtime_python=VM_RUNTIME_PYTHON,
        https_port=spec.ports.https,
        http_port=spec.ports.http,
        public_address="",
        vllm=vllm_process(stack, layout),
        alert_credential=spec.alerts.needs_credential,
        service_credentials=True,
        internal_ca=spec.tls.mode == "internal",
        **routing_facts(spec),
    )


def runtime_files(cpu: bool) -> dict[str, bytes]:
    """The runtime as the host installs it: the wheel built from ./runtime and its hash-locked requirements;
    on a host without a GPU also vLLM's CPU lock, which `launch prepare` builds vLLM's venv from."""
    with tempfile.TemporaryDirectory(prefix="gpugate-wheel-") as tmp:
        wheel = build_runtime_wheel(Path(tmp))
        files = {f"runtime/{wheel.name}": wheel.read_bytes(), RUNTIME_LOCK: (RUNTIME_SOURCE / "requirements.lock").read_bytes()}
    if cpu:
        files[VLLM_CPU_LOCK] = (RUNTIME_SOURCE / VLLM_CPU_LOCK).read_bytes()
    return files


def render_vm(stack: Stack, layout: HostLayout | None = None) -> Bundle:
    spec = stack.spec
    layout = layout or VM_LAYOUT
    facts = vm_facts(stack, layout)
    table = services(facts)
    cpu = spec.gpu.type == "cpu"
    venv = VllmVenv(path=VM_VLLM_VENV, lock=Path(VLLM_CPU_LOCK).relative_to(Path(LAUNCH_SPEC).parent)) if cpu else None
    launch = launch_spec(spec, facts.ports, layout, key_file=vllm_key_file(facts, table), venv=venv)
    # VMs run no Grafana (`gpugate dashboard` prints the JSON to import).
    files = host_files(stack, facts, table, launch, expect_gpu=spec.gpu.type != "cpu")
    text = header(stack)
    files.update(units(facts, table, text))
    runtime = runtime_files(cpu)
    files.update(runtime)
    (wheel,) = [path for path in runtime if path.endswith(".whl")]
    bundle = Bundle(
        stack=stack.name, target=spec.target, spec_sha256=stack.spec_sha256, files=files, derived=frozenset({USER_DATA, ARCHIVE})
    )
    seal(bundle, layout)
    packed = archive({path: data for path, data in files.items() if path not in bundle.derived})
    files[ARCHIVE] = packed
    files[USER_DATA] = user_data(spec, stack.name, layout, table, wheel, sha256(packed), text)
    return bundle

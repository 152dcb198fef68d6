"""The VM targets' bundle (AWS, GCP): the host files, a systemd unit per service, and the user data that installs them."""

from __future__ import annotations

from gpugate_runtime.contract.host import VM_LAYOUT, VM_RUNTIME_PYTHON, HostLayout, Ports
from gpugate_runtime.contract.services import USER_ROOT, HostFacts, VllmProcess, services

from gpugate.render.bundle import Bundle, header, seal
from gpugate.render.host import host_files, vllm_key_file
from gpugate.render.launch import launch_spec
from gpugate.stackfile import Stack
from gpugate.vm.systemd import units
from gpugate.vm.userdata import USER_DATA, user_data


def vm_facts(stack: Stack, layout: HostLayout) -> HostFacts:
    spec = stack.spec
    return HostFacts(
        layout=layout,
        ports=Ports(spec.ports.internal_base),
        runtime_python=VM_RUNTIME_PYTHON,
        https_port=spec.ports.https,
        http_port=spec.ports.http,
        public_address="",
        # The launcher runs vLLM's pinned image with Docker (root); the weights stay in the state dir.
        vllm=VllmProcess(python=None, user=USER_ROOT, env={"HF_HOME": str(layout.state / "hf")}),
        alert_credential=spec.alerts.needs_credential,
        service_credentials=True,
    )


def render_vm(stack: Stack, layout: HostLayout | None = None) -> Bundle:
    spec = stack.spec
    layout = layout or VM_LAYOUT
    facts = vm_facts(stack, layout)
    table = services(facts)
    launch = launch_spec(spec, facts.ports, layout, key_file=vllm_key_file(facts, table))
    # VMs run no Grafana (`gpugate dashboard` prints the JSON to import), and user data has no room for it.
    files = host_files(stack, facts, table, launch, ca_file=None, expect_gpu=True)
    text = header(stack)
    files.update(units(facts, table, text))
    bundle = Bundle(stack=stack.name, target=spec.target, spec_sha256=stack.spec_sha256, files=files, derived=frozenset({USER_DATA}))
    files[USER_DATA] = user_data(bundle, layout, table, launch, text)
    return seal(bundle, layout)

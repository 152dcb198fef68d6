"""The smoke stack's exact user data boots a real Debian 12 VM (QEMU) into a gateway that serves.

What the cloud would do is done by real parts on this machine: moto's S3 and Secrets Manager hold the bundle
archive and the vLLM key the program would upload (the names the program uses), and the guest reaches them
the way a host reaches its cloud's endpoints. The user data is byte for byte what `pulumi up` hands EC2 (the
gzipped cloud-config); the guest installs Debian's packages from the mirror, fetches the bundle and its
secret with hostboot, installs the runtime venv from the bundled wheel and lock, and starts every service of
the table under systemd.

What this machine cannot be for the guest comes in as vendor data, the layer a cloud adds next to a user's
own (cloud-init runs it before the user's runcmd):
- DNS: the stack's domain resolves to the guest itself (on AWS, Route53 points it at the Elastic IP);
- this machine's CA bundle, which its HTTPS egress needs (pip in the guest reaches PyPI through it);
- vLLM: an emulated CPU (TCG) runs vLLM's CPU build far too slowly, so the vLLM unit's process is replaced by
  a plain TCP forward to a real vLLM on this machine serving the stack's model name with the key the guest
  fetched. Everything in front of it (Caddy, authz, the key store, the prober, Prometheus, Alertmanager)
  is the guest's own.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import boto3
import httpx
import openai
import pytest
from gpugate_runtime.contract import metrics as metric_names
from gpugate_runtime.contract.host import VM_LAYOUT, VM_RUNTIME_PYTHON, Ports
from gpugate_runtime.contract.services import services, unit_name

from gpugate.render.bundle import MANIFEST, Bundle
from gpugate.stackfile import Stack, load_stack
from gpugate.targets import render_bundle
from gpugate.vm.bundle import ARCHIVE, vm_facts
from gpugate.vm.delivery import VLLM_KEY, bucket_name, object_key, secret_id
from gpugate.vm.userdata import USER_DATA, delivered
from tests.conftest import running_moto
from tests.e2e.conftest import VllmServer, running_vllm
from tests.vm.disk_image import DiskImage
from tests.vm.qemu import GUEST_FORWARD_ADDRESS, HOST_LOOPBACK, Vm, free_loopback_port

# Boot, apt (Caddy, Prometheus, Alertmanager, boto3), pip (the runtime venv) under an emulated CPU: 12 min
# to cloud-init's end on a quiet 2-core machine, 35 on a busy one (docs/performance.md, "VM boot"). The
# first test's limit covers the whole boot (pytest-timeout counts fixture setup).
CLOUD_INIT_TIMEOUT_S = 2700
BOOT_TEST_TIMEOUT_S = CLOUD_INIT_TIMEOUT_S + 600
pytestmark = [pytest.mark.vm, pytest.mark.e2e, pytest.mark.timeout(BOOT_TEST_TIMEOUT_S)]

STACK = "smoke"
SERVICES_TIMEOUT_S = 300
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
GUEST_CA_BUNDLE = "/usr/local/share/gpugate-test/ca-bundle.crt"
FORWARDER = "/usr/local/lib/gpugate-test/forward.py"
TIMINGS: dict[str, float] = {}
PROBE_SUCCESS = rf'^{metric_names.PROBE_SUCCESS}\{{check="(\w+)"\}} (\S+)$'


# A TCP forward in the standard library: the guest's vLLM port -> a real vLLM on this machine.
FORWARD_PY = """\
import socket, sys, threading

def pump(src, dst):
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

listen = socket.create_server((sys.argv[1], int(sys.argv[2])))
while True:
    client, _ = listen.accept()
    upstream = socket.create_connection((sys.argv[3], int(sys.argv[4])))
    for a, b in ((client, upstream), (upstream, client)):
        threading.Thread(target=pump, args=(a, b), daemon=True).start()
"""


@dataclass(frozen=True)
class Booted:
    vm: Vm
    stack: Stack
    bundle: Bundle
    vllm: VllmServer
    client_key: str


def vendor_script(stack: Stack, vllm_port: int, host_vllm_port: int) -> bytes:
    """The vendor data: DNS for the domain, this machine's CA bundle for pip, vLLM forwarded to this machine."""
    unit = unit_name("vllm")
    drop_in = (
        "[Service]\n"
        "ExecStartPre=\n"
        "ExecStart=\n"
        f"ExecStart=/usr/bin/python3 {FORWARDER} 127.0.0.1 {vllm_port} {GUEST_FORWARD_ADDRESS} {host_vllm_port}\n"
    )
    return f"""#!/bin/sh
set -eu
echo "127.0.0.1 {stack.spec.domain}" >> /etc/hosts
install -d /usr/local/share/gpugate-test /usr/local/lib/gpugate-test /etc/systemd/system/{unit}.service.d
cat > {GUEST_CA_BUNDLE} <<'PEM'
{HOST_CA_BUNDLE.read_text().strip()}
PEM
printf '[global]\\ncert = {GUEST_CA_BUNDLE}\\n' > /etc/pip.conf
cat > {FORWARDER} <<'PY'
{FORWARD_PY}PY
cat > /etc/systemd/system/{unit}.service.d/test-forward.conf <<'UNIT'
{drop_in}UNIT
""".encode()


@pytest.fixture(scope="module")
def smoke() -> tuple[Stack, Bundle]:
    stack = load_stack(STACK)
    assert stack.spec.target == "aws" and stack.spec.gpu.type == "cpu" and stack.spec.tls.mode == "internal"
    return stack, render_bundle(stack)


@pytest.fixture(scope="module")
def aws_endpoint() -> Iterator[str]:
    """moto's server: S3 and Secrets Manager as the program leaves them, on this machine's loopback."""
    with running_moto(HOST_LOOPBACK) as endpoint:
        yield endpoint


def upload(endpoint: str, stack: Stack, bundle: Bundle, vllm_key: str) -> None:
    """What `pulumi up` creates before the instance (infra/aws.py): the bucket, the bundle object, the vLLM key's secret."""
    spec = stack.spec
    session = boto3.Session(aws_access_key_id="testing", aws_secret_access_key="testing", region_name=spec.region)
    s3 = session.client("s3", endpoint_url=endpoint)
    s3.create_bucket(Bucket=bucket_name(spec, stack.name))  # us-east-1 takes no location constraint
    archive = bundle.files[ARCHIVE]
    s3.put_object(Bucket=bucket_name(spec, stack.name), Key=object_key(hashlib.sha256(archive).hexdigest()), Body=archive)
    session.client("secretsmanager", endpoint_url=endpoint).create_secret(
        Name=secret_id(spec, stack.name, VLLM_KEY), SecretString=vllm_key
    )


@pytest.fixture(scope="module")
def booted(
    vm_image: DiskImage,
    vm_workdir: Path,
    smoke: tuple[Stack, Bundle],
    aws_endpoint: str,
    vllm_python: Path,
    smollm_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Booted]:
    stack, bundle = smoke
    spec = stack.spec
    vllm_key = "vllm-" + secrets.token_hex(24)
    upload(aws_endpoint, stack, bundle, vllm_key)
    moto_port = int(aws_endpoint.rsplit(":", 1)[1])
    with running_vllm(
        vllm_python, smollm_dir, tmp_path_factory.mktemp("host-vllm"), served_model_name=spec.model.served_name, key=vllm_key
    ) as vllm:
        machine = Vm(
            vm_image,
            delivered(bundle.files[USER_DATA]),  # the gzipped cloud-config, as EC2 gets it
            vm_workdir,
            vendor_data=vendor_script(stack, Ports(spec.ports.internal_base).vllm, vllm.spec.port),
            memory_mib=2048,
            # the guest's web ports, and SSH because the stack names admin networks
            host_forwards={443: free_loopback_port(), 80: free_loopback_port(), 22: free_loopback_port()},
            guest_forwards={moto_port: moto_port, vllm.spec.port: vllm.spec.port},
            kernel_args=[
                # hostboot's endpoint override (the instance role's credentials come from IMDS on EC2)
                f"systemd.setenv=AWS_ENDPOINT_URL=http://{GUEST_FORWARD_ADDRESS}:{moto_port}",
                "systemd.setenv=AWS_ACCESS_KEY_ID=testing",
                "systemd.setenv=AWS_SECRET_ACCESS_KEY=testing",
                "systemd.setenv=AWS_EC2_METADATA_DISABLED=true",
            ],
        )
        with machine:
            TIMINGS["cloud-init done"] = machine.wait_cloud_init(CLOUD_INIT_TIMEOUT_S)
            wait_active(machine, stack)
            TIMINGS["every service active"] = time.monotonic() - (machine.started_at or 0)
            created = machine.exec(
                [
                    "runuser", "-u", "gpugate", "--", "env", f"GPUGATE_ENV_FILE={VM_LAYOUT.runtime_env}",
                    str(VM_RUNTIME_PYTHON), "-m", "gpugate_runtime", "keys", "create", "boot-test",
                    "--store", str(VM_LAYOUT.key_store), "--json",
                ],
                timeout=120,
            )  # fmt: skip
            assert created.rc == 0, created
            yield Booted(machine, stack, bundle, vllm, json.loads(created.stdout)["key"])


def table_units(stack: Stack) -> list[str]:
    return [f"{unit_name(s)}.service" for s in services(vm_facts(stack, VM_LAYOUT))]


def wait_active(machine: Vm, stack: Stack) -> None:
    units = table_units(stack)
    deadline = time.monotonic() + SERVICES_TIMEOUT_S
    while True:
        states = machine.exec(["systemctl", "is-active", *units], timeout=60).stdout.split()
        if states == ["active"] * len(units):
            return
        if time.monotonic() > deadline:
            status = machine.exec(["systemctl", "status", "--no-pager", "-n", "20", *units], timeout=60)
            pytest.fail(f"not every unit is active after {SERVICES_TIMEOUT_S} s: {dict(zip(units, states))}\n{status.stdout}")
        time.sleep(5)


def gateway_client(booted: Booted, key: str) -> openai.OpenAI:
    """The official client, connecting to the guest's 443 through this machine's loopback forward, with the
    stack's domain as SNI and Host and Caddy's internal root (read off the guest) as the only trusted CA."""
    domain = booted.stack.spec.domain
    root = booted.vm.read_file(str(VM_LAYOUT.local_ca_file)).decode()
    context = ssl.create_default_context(cadata=root)

    def name_the_site(request: httpx.Request) -> None:
        request.headers["Host"] = domain
        request.extensions["sni_hostname"] = domain

    http = httpx.Client(verify=context, event_hooks={"request": [name_the_site]}, timeout=120)
    port = booted.vm.host_port(443)
    return openai.OpenAI(base_url=f"https://{HOST_LOOPBACK}:{port}/v1", api_key=key, http_client=http, max_retries=0)


def test_cloud_init_runs_the_user_data_to_the_end_and_every_table_service_is_active(booted: Booted) -> None:
    status = booted.vm.exec(["cloud-init", "status", "--long"])
    assert "status: done" in status.stdout, status
    output = booted.vm.read_file("/var/log/cloud-init-output.log").decode(errors="replace")
    assert "gpugate first boot: done: bundle" in output
    units = table_units(booted.stack)
    assert len(units) >= 6
    states = booted.vm.exec(["systemctl", "is-active", *units]).stdout.split()
    assert states == ["active"] * len(units), dict(zip(units, states))


def test_the_host_runs_the_rendered_bundle_and_its_secret_never_left_the_secret_files(booted: Booted) -> None:
    manifest = json.loads(booted.vm.read_file(str(VM_LAYOUT.etc / MANIFEST)))
    assert manifest["bundle_sha256"] == booted.bundle.bundle_sha256
    key_file = booted.vm.exec(["stat", "-c", "%a %U", str(VM_LAYOUT.vllm_key_file)]).stdout.split()
    assert key_file == ["600", "root"]
    assert booted.vm.read_file(str(VM_LAYOUT.vllm_key_file)).decode().strip() == booted.vllm.api_key
    # cloud-init keeps the user data it ran: no secret in it, nor in its logs
    for path in ("/var/lib/cloud/instance/user-data.txt", "/var/log/cloud-init-output.log", "/var/log/cloud-init.log"):
        assert booted.vllm.api_key not in booted.vm.read_file(path).decode(errors="replace"), path


def test_a_client_with_a_key_gets_a_completion_over_tls_and_a_bad_key_gets_401(booted: Booted) -> None:
    started = time.monotonic()
    client = gateway_client(booted, booted.client_key)
    reply = client.chat.completions.create(
        model=booted.stack.spec.model.served_name, messages=[{"role": "user", "content": "Say hello."}], max_tokens=8
    )
    TIMINGS["first completion"] = time.monotonic() - started
    assert reply.choices[0].message.content and reply.usage.completion_tokens > 0
    assert reply.model == booted.stack.spec.model.served_name
    with pytest.raises(openai.AuthenticationError) as rejected:
        gateway_client(booted, "ggk_" + "0" * 40).models.list()
    assert rejected.value.status_code == 401
    # plain HTTP only redirects to HTTPS
    http = httpx.get(f"http://{HOST_LOOPBACK}:{booted.vm.host_port(80)}/v1/models", headers={"Host": booted.stack.spec.domain})
    assert http.status_code in (301, 308) and http.headers["location"].startswith(f"https://{booted.stack.spec.domain}")


def test_only_80_and_443_and_the_images_sshd_listen_beyond_loopback(booted: Booted) -> None:
    listening = booted.vm.exec(["ss", "-Hltn"]).stdout.splitlines()
    addresses = [line.split()[3] for line in listening]
    assert len(addresses) >= 8, listening  # the gateway's loopback services are there too
    public = set()
    for address in addresses:
        host, port = address.rsplit(":", 1)
        if host.strip("[]") not in ("127.0.0.1", "::1") and not host.startswith("127."):
            public.add(int(port))
    # sshd is the stock image's; the security group opens 22 to the admin networks only (tests/infra)
    assert public == {80, 443, 22}, listening


def test_the_prober_sees_the_gateway_healthy_through_the_public_name(booted: Booted) -> None:
    # the prober trusts Caddy's internal root (a credential from the table) and resolves the domain
    deadline = time.monotonic() + 180
    metrics = ""
    while time.monotonic() < deadline:
        port = Ports(booted.stack.spec.ports.internal_base).prober
        metrics = booted.vm.exec(["curl", "-s", f"http://127.0.0.1:{port}/metrics"]).stdout
        values = re.findall(PROBE_SUCCESS, metrics, re.M)
        if values and all(float(v) == 1 for _, v in values):
            break
        time.sleep(5)
    values = re.findall(PROBE_SUCCESS, metrics, re.M)
    assert len(values) >= 3 and all(float(v) == 1 for _, v in values), metrics[-3000:]


def test_last_record_the_boot_timings(booted: Booted, record_property: pytest.RecordProperty) -> None:
    # printed with -s and kept in the JUnit XML; docs/performance.md quotes a run
    rss, peak = booted.vm.rss_bytes()
    TIMINGS["qemu peak rss MiB"] = peak / 2**20
    for name, value in TIMINGS.items():
        record_property(name, round(value, 1))
    print("VM boot timings:", json.dumps({k: round(v, 1) for k, v in TIMINGS.items()}))
    assert TIMINGS["cloud-init done"] > 0 and "first completion" in TIMINGS

"""gpugate's images (runtime/containers/), built from the repository and run as a proxy pod by `podman kube play`.

The pod is a small proxy pod written here: Caddy from the proxy image (Caddyfile from a ConfigMap,
`tls internal`, forward_auth to authz on the pod's loopback, 200 behind it) and authz from the
runtime image (key store from a Secret), with the pod's 443 published on 127.0.0.1 only.
"""

from __future__ import annotations

import io
import json
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from ruamel.yaml import YAML

from gpugate_runtime.contract.services import GID_GATEWAY, UIDS, USER_CADDY, USER_GATEWAY

from tests.e2e.conftest import find_free_port
from tests.kubernetes.images import image_user, run_once
from tests.kubernetes.podman import BuildResult, Played, Podman, Process

pytestmark = [pytest.mark.e2e, pytest.mark.podman]

CADDY_UID = UIDS[USER_CADDY]
AUTHZ_UID = UIDS[USER_GATEWAY]
POD_GROUP = GID_GATEWAY
AUTHZ_PORT = 18001  # authz's default (AuthzSettings.port); the pod's loopback is its own
CADDY_ROOT_CA = "/data/caddy/pki/authorities/local/root.crt"  # `tls internal` under XDG_DATA_HOME=/data
READY_TIMEOUT_S = 60
BEHIND_AUTHZ = "behind authz"

CADDYFILE = f"""\
{{
	admin off
	skip_install_trust
	default_sni localhost
}}

localhost {{
	tls internal
	log {{
		output file /var/log/gpugate/access.log
	}}
	forward_auth 127.0.0.1:{AUTHZ_PORT} {{
		uri /authz
	}}
	respond "{BEHIND_AUTHZ}" 200
}}
"""


def restricted(uid: int) -> dict[str, Any]:
    """The container securityContext of the rendered proxy pod (gpugate/kubernetes/proxy.py), with this uid."""
    return {
        "runAsUser": uid,
        "runAsGroup": POD_GROUP,
        "runAsNonRoot": True,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }


def proxy_pod_yaml(*, proxy_image: str, runtime_image: str, keys_json: str, host_port: int) -> tuple[str, dict[str, int]]:
    """The test pod as Kubernetes YAML, and the uid each of its containers is told to run as."""
    caddy = {
        "name": "caddy",
        "image": proxy_image,
        "command": ["caddy", "run", "--config", "/etc/gpugate/caddy/Caddyfile", "--adapter", "caddyfile"],
        "env": [{"name": "XDG_CONFIG_HOME", "value": "/config"}, {"name": "XDG_DATA_HOME", "value": "/data"}],
        "ports": [{"name": "https", "containerPort": 443, "hostPort": host_port, "hostIP": "127.0.0.1", "protocol": "TCP"}],
        "securityContext": restricted(CADDY_UID),
        "volumeMounts": [
            {"name": "caddyfile", "mountPath": "/etc/gpugate/caddy", "readOnly": True},
            {"name": "caddy-home", "mountPath": "/config", "subPath": "config"},
            {"name": "caddy-home", "mountPath": "/data", "subPath": "data"},
            {"name": "logs", "mountPath": "/var/log/gpugate"},
        ],
    }
    authz = {
        "name": "authz",
        "image": runtime_image,
        "command": ["python", "-m", "gpugate_runtime", "authz", "serve"],
        "env": [
            {"name": "GPUGATE_AUTHZ_PORT", "value": str(AUTHZ_PORT)},
            {"name": "GPUGATE_AUTHZ_KEY_STORE", "value": "/etc/gpugate/keys/keys.json"},
            {"name": "GPUGATE_AUTHZ_LOG_FILE", "value": "/dev/stdout"},
            {"name": "GPUGATE_AUTHZ_ACCESS_LOG", "value": "/var/log/gpugate/access.log"},
        ],
        "securityContext": restricted(AUTHZ_UID),
        "volumeMounts": [
            {"name": "keys", "mountPath": "/etc/gpugate/keys", "readOnly": True},
            {"name": "logs", "mountPath": "/var/log/gpugate"},
        ],
    }
    labels = {"app.kubernetes.io/name": "gpugate-images-test"}
    docs = [
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "gpugate-images-test-caddy"},
         "data": {"Caddyfile": CADDYFILE}},
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "gpugate-images-test-keys"}, "type": "Opaque",
         "stringData": {"keys.json": keys_json}},
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "gpugate-images-test", "labels": labels},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "securityContext": {
                            "runAsNonRoot": True,
                            "fsGroup": POD_GROUP,
                            # as in the rendered pod: Caddy binds 80/443 with no capability
                            "sysctls": [{"name": "net.ipv4.ip_unprivileged_port_start", "value": "0"}],
                        },
                        "containers": [caddy, authz],
                        "volumes": [
                            {"name": "caddyfile", "configMap": {"name": "gpugate-images-test-caddy"}},
                            {"name": "keys", "secret": {"secretName": "gpugate-images-test-keys", "defaultMode": 0o440}},
                            {"name": "caddy-home", "emptyDir": {}},
                            {"name": "logs", "emptyDir": {}},
                        ],
                    },
                },
            },
        },
    ]
    out = io.StringIO()
    YAML(typ="safe", pure=True).dump_all(docs, out)
    return out.getvalue(), {"caddy": CADDY_UID, "authz": AUTHZ_UID}


@dataclass(frozen=True)
class RunningPod:
    played: Played
    url: str
    ca: ssl.SSLContext
    key: str
    uids: dict[str, int]  # container name in the YAML -> runAsUser

    def client(self) -> httpx.Client:
        return ipv4_client(self.ca)


def ipv4_client(ca: ssl.SSLContext) -> httpx.Client:
    """A client that reaches `localhost` over IPv4: the pod's port is published on 127.0.0.1 and nowhere else."""
    return httpx.Client(timeout=10, transport=httpx.HTTPTransport(verify=ca, local_address="0.0.0.0"))


def create_key(store: Path, name: str) -> str:
    """A client key, made the way an operator makes one: `python -m gpugate_runtime keys create`."""
    proc = subprocess.run(
        [sys.executable, "-m", "gpugate_runtime", "keys", "create", name, "--store", str(store), "--json"],
        capture_output=True, text=True, check=True, timeout=60,
    )
    return json.loads(proc.stdout)["key"]


def wait_until_serving(podman: Podman, played: Played, caddy: str, url: str) -> ssl.SSLContext:
    """Caddy's internal root (read from the pod), once Caddy answers TLS with it and authz answers
    behind it (a request without a key gets authz's 401, not Caddy's 502)."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    last: object = None
    while time.monotonic() < deadline:
        root = podman.exec(caddy, ["cat", CADDY_ROOT_CA], check=False)
        if root.returncode == 0:
            ca = ssl.create_default_context(cadata=root.stdout.decode())
            try:
                with ipv4_client(ca) as client:
                    last = client.get(url).status_code
                if last == 401:
                    return ca
            except httpx.HTTPError as exc:
                last = exc
        time.sleep(0.5)
    podman.wait_running(played, timeout=0)  # raises with the containers' logs if one has stopped
    raise AssertionError(f"{url}: no 401 from authz behind Caddy after {READY_TIMEOUT_S} s; last: {last!r}")


@pytest.fixture(scope="module")
def running_pod(podman: Podman, proxy_image: BuildResult, runtime_image: BuildResult, pod_workdir: Path) -> Iterator[RunningPod]:
    store = pod_workdir / "keys.json"
    key = create_key(store, "team-images-test")
    host_port = find_free_port()
    yaml_text, uids = proxy_pod_yaml(
        proxy_image=proxy_image.tag, runtime_image=runtime_image.tag, keys_json=store.read_text(), host_port=host_port
    )
    # slirp4netns: the pod gets its own network stack and its hostPort a listener on 127.0.0.1,
    # with no bridge or iptables rule on this machine.
    played = podman.kube_play(yaml_text, network="slirp4netns", name="images-test")
    try:
        containers = podman.wait_running(played)
        caddy = next(c.name for c in containers if c.name.endswith("-caddy"))
        url = f"https://localhost:{host_port}"
        ca = wait_until_serving(podman, played, caddy, url)
        yield RunningPod(played, url, ca, key, uids)
    finally:
        podman.kube_down(played)


def test_a_request_with_a_valid_key_gets_200_over_tls_from_behind_authz(running_pod: RunningPod):
    # given the pod: Caddy (proxy image) in front of authz (runtime image), 443 on 127.0.0.1 only
    with running_pod.client() as client:
        # when a client calls with the key it was given
        response = client.get(f"{running_pod.url}/v1/models", headers={"Authorization": f"Bearer {running_pod.key}"})
    # then authz let it through, over TLS from Caddy's internal CA
    assert response.status_code == 200, response.text
    assert response.text == BEHIND_AUTHZ
    assert response.http_version in ("HTTP/1.1", "HTTP/2")


def test_a_request_with_a_wrong_key_gets_401(running_pod: RunningPod):
    wrong = running_pod.key[:-4] + ("0000" if not running_pod.key.endswith("0000") else "1111")
    with running_pod.client() as client:
        response = client.get(f"{running_pod.url}/v1/models", headers={"Authorization": f"Bearer {wrong}"})
        anonymous = client.get(f"{running_pod.url}/v1/models")
    assert response.status_code == 401, response.text
    assert BEHIND_AUTHZ not in response.text
    assert anonymous.status_code == 401


def test_the_pod_port_is_published_on_loopback_only(running_pod: RunningPod):
    # the hostPort's listener (podman's rootlessport for slirp4netns) is bound to 127.0.0.1
    port = int(running_pod.url.rsplit(":", 1)[1])
    listening = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, check=True).stdout
    addresses = [line.split()[3] for line in listening.splitlines()]
    assert addresses == [f"127.0.0.1:{port}"]


def app_processes(podman: Podman, running_pod: RunningPod) -> dict[str, list[Process]]:
    """container name in the YAML -> its processes, read from the kernel (infra container left out)."""
    out: dict[str, list[Process]] = {}
    for pod in running_pod.played.pods:
        for container in podman.containers(pod):
            if not container.is_infra:
                out[container.name.rsplit("-", 1)[1]] = podman.top(container.name)
    return out


def test_every_process_runs_as_the_non_root_uid_its_container_yaml_names(podman: Podman, running_pod: RunningPod):
    # given the running pod, read from the kernel rather than from the YAML
    processes = app_processes(podman, running_pod)
    # then every container of the YAML is there, each with at least one process ...
    assert set(processes) == set(running_pod.uids)
    assert all(processes.values())
    # ... and each process's real, effective, saved and file-system uid is the YAML's runAsUser
    for name, procs in processes.items():
        for proc in procs:
            assert proc.uids == (running_pod.uids[name],) * 4, f"{name}: {proc.argv} runs as {proc.uids}"
            assert proc.gids[1] == POD_GROUP
            assert 0 not in proc.uids


def test_no_process_holds_a_capability_or_can_gain_privileges(podman: Podman, running_pod: RunningPod):
    processes = [p for procs in app_processes(podman, running_pod).values() for p in procs]
    assert processes
    for proc in processes:
        assert proc.cap_effective == 0, f"{proc.container}: {proc.argv} has capabilities {proc.cap_effective:#x}"
        assert proc.no_new_privs, f"{proc.container}: {proc.argv} may gain privileges"


@pytest.mark.parametrize("image", ["proxy", "runtime"])
def test_each_image_runs_as_its_non_root_user_when_nothing_overrides_it(podman: Podman, image: str, request):
    built: BuildResult = request.getfixturevalue(f"{image}_image")
    # the image's USER (what a pod without runAsUser gets): the contract's ids, as the rendered pods name them
    uid = CADDY_UID if image == "proxy" else AUTHZ_UID
    assert image_user(podman, built.tag) == f"{uid}:{POD_GROUP}"
    ran = run_once(podman, built.tag, ["id", "-u"])
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.decode().strip() == str(uid)


def test_the_runtime_image_runs_the_runtime_cli_from_its_venv(podman: Podman, runtime_image: BuildResult):
    import gpugate_runtime

    ran = run_once(podman, runtime_image.tag, ["python", "-m", "gpugate_runtime", "--version"])
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.decode().strip() == gpugate_runtime.__version__
    where = run_once(podman, runtime_image.tag, ["python", "-c", "import gpugate_runtime; print(gpugate_runtime.__file__)"])
    assert where.stdout.decode().startswith("/opt/gpugate/venv/lib/python3.11/site-packages/gpugate_runtime/")


def test_the_proxy_image_is_debian_caddy_2_6_2_with_no_config_baked_in(podman: Podman, proxy_image: BuildResult):
    version = run_once(podman, proxy_image.tag, ["caddy", "version"])
    assert version.returncode == 0, version.stderr
    assert version.stdout.decode().startswith("2.6.2")
    # the image's own command reads the Caddyfile from the ConfigMap's mount, and without that mount it fails
    default = run_once(podman, proxy_image.tag, [])
    assert default.returncode != 0
    assert b"/etc/gpugate/caddy/Caddyfile" in default.stderr + default.stdout

"""The rendered prod proxy pod (caddy, authz, prober) from gpugate's images, run by `podman kube play`
in front of a real vLLM (CPU) on this machine.

DRAFT, to be finished after the kube.py refactor. What is changed from `gpugate render --stack prod`,
and why (everything else is the rendered YAML as it is):
  - the stack: TLS from Caddy's internal CA (no ACME from here), the internal ports based at the
    test vLLM's port (the pod reaches vLLM at that port), the two images pinned to the digests of the
    local builds, the served model name of the test vLLM;
  - the Secrets get real values (a key store, vLLM's internal key, the prober's key);
  - the pod: hostAliases send vllm.gpugate.svc.cluster.local to 10.0.2.2 (slirp4netns's address for this
    machine's loopback, where vLLM listens) and the public name to the pod's own loopback (the prober
    probes its own Caddy, never the internet); Caddy's 443 is published on 127.0.0.1 only.
"""

from __future__ import annotations

import io
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from ruamel.yaml import YAML

from gpugate_runtime.contract.host import Ports
from gpugate_runtime.contract.metrics import PROBE_SUCCESS
from gpugate_runtime.prober import Check

from gpugate.render import render_bundle
from gpugate.stackfile import load_stack
from tests.conftest import edit_stack
from tests.e2e.conftest import VllmServer, find_free_port, smollm_dir, vllm_python, vllm_server  # noqa: F401 - fixtures
from tests.kubernetes.podman import BuildResult, Played, Podman, Process
from tests.kubernetes.test_images import create_key

pytestmark = [pytest.mark.e2e, pytest.mark.podman]

NAMESPACE_DIR = "kubernetes/gpugate/"
GATEWAY = "gateway"
SLIRP_HOST_LOOPBACK = "10.0.2.2"  # slirp4netns: this machine's 127.0.0.1, with allow_host_loopback
CADDY_STORAGE = "/var/lib/gpugate/caddy"  # the Caddyfile's `storage file_system` root
READY_TIMEOUT_S = 90


def local_digest_ref(podman: Podman, tag: str) -> str:
    """`localhost/NAME@sha256:...` of a local build: the stack's image fields take digests only."""
    digest = podman.text("image", "inspect", tag, "--format", "{{.Digest}}").strip()
    return f"{tag.rsplit(':', 1)[0]}@{digest}"


def prod_pod_docs(stack_file: Path, secrets: dict[str, dict[str, str]]) -> list[dict[str, Any]]:
    """The proxy pod's objects from the rendered bundle: its ConfigMaps, Secrets (filled in), PVC and Deployment."""
    yaml = YAML(typ="safe", pure=True)
    bundle = render_bundle(load_stack(stack_file))
    objects = [yaml.load(data) for path, data in sorted(bundle.files.items()) if path.startswith(NAMESPACE_DIR)]
    gateway = next(o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == GATEWAY)
    volumes = gateway["spec"]["template"]["spec"]["volumes"]
    used = {v["configMap"]["name"] for v in volumes if "configMap" in v}
    used |= {v["secret"]["secretName"] for v in volumes if "secret" in v}
    used |= {e["valueFrom"]["secretKeyRef"]["name"] for c in gateway["spec"]["template"]["spec"]["containers"]
             for e in c.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})}
    docs = [o for o in objects if o["kind"] in ("ConfigMap", "Secret") and o["metadata"]["name"] in used]
    for doc in docs:
        if doc["kind"] == "Secret":
            doc["stringData"] = secrets[doc["metadata"]["name"]]
    claims = {v["persistentVolumeClaim"]["claimName"] for v in volumes if "persistentVolumeClaim" in v}
    docs += [o for o in objects if o["kind"] == "PersistentVolumeClaim" and o["metadata"]["name"] in claims]
    return [*docs, gateway]


def publish_on_loopback(gateway: dict[str, Any], host_port: int, domain: str) -> None:
    spec = gateway["spec"]["template"]["spec"]
    spec["hostAliases"] = [
        {"ip": SLIRP_HOST_LOOPBACK, "hostnames": ["vllm.gpugate.svc.cluster.local"]},
        {"ip": "127.0.0.1", "hostnames": [domain]},
    ]
    caddy = next(c for c in spec["containers"] if c["name"] == "caddy")
    https = next(p for p in caddy["ports"] if p["name"] == "https")
    https.update({"hostPort": host_port, "hostIP": "127.0.0.1"})


@dataclass(frozen=True)
class ProdPod:
    podman: Podman
    played: Played
    url: str
    domain: str
    ca: ssl.SSLContext
    client_key: str
    uids: dict[str, int]  # container -> runAsUser, from the rendered YAML

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        # To 127.0.0.1 with the public name as SNI and Host: the certificate is checked for that name.
        transport = httpx.HTTPTransport(verify=self.ca)
        with httpx.Client(transport=transport, timeout=60) as client:
            headers = {"Host": self.domain, **kwargs.pop("headers", {})}
            return client.request(method, f"{self.url}{path}", headers=headers,
                                  extensions={"sni_hostname": self.domain}, **kwargs)


@pytest.fixture(scope="module")
def prod_pod(podman: Podman, proxy_image: BuildResult, runtime_image: BuildResult, vllm_server: VllmServer,  # noqa: F811
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProdPod]:
    work = tmp_path_factory.mktemp("prod-pod")
    proxy_ref, runtime_ref = local_digest_ref(podman, proxy_image.tag), local_digest_ref(podman, runtime_image.tag)

    def change(config: dict[str, Any]) -> None:
        config["gpugate:tls"] = {"mode": "internal"}
        config["gpugate:ports"] = {"internal_base": vllm_server.spec.port}
        config["gpugate:model"]["served_name"] = vllm_server.served_model_name
        config["gpugate:kubernetes"]["images"]["caddy"] = proxy_ref
        config["gpugate:kubernetes"]["images"]["runtime"] = runtime_ref

    stack_file = edit_stack("prod", work / "Pulumi.podman.yaml", change)
    domain = load_stack(stack_file).spec.domain
    store = work / "keys.json"
    client_key = create_key(store, "team-prod-pod")
    prober_key = create_key(store, "prober")
    secrets = {
        "gpugate-keys": {"keys.json": store.read_text()},
        "gpugate-internal": {"vllm_api_key": vllm_server.api_key, "prober_api_key": prober_key},
    }
    docs = prod_pod_docs(stack_file, secrets)
    gateway = docs[-1]
    host_port = find_free_port()
    publish_on_loopback(gateway, host_port, domain)
    uids = {c["name"]: c["securityContext"]["runAsUser"] for c in gateway["spec"]["template"]["spec"]["containers"]}
    out = io.StringIO()
    YAML(typ="safe", pure=True).dump_all(docs, out)
    played = podman.kube_play(out.getvalue(), network="slirp4netns:allow_host_loopback=true", name="prod-pod")
    try:
        containers = podman.wait_running(played, timeout=READY_TIMEOUT_S)
        caddy = next(c.name for c in containers if c.name.endswith("-caddy"))
        ca = wait_for_root(podman, caddy)
        pod = ProdPod(podman, played, f"https://127.0.0.1:{host_port}", domain, ca, client_key, uids)
        wait_for_status(pod, "/healthz", 200)  # Caddy reaches vLLM
        wait_for_status(pod, "/v1/models", 401)  # authz answers behind Caddy (no key: 401, not 503)
        yield pod
    finally:
        podman.kube_down(played)


def wait_for_root(podman: Podman, caddy: str) -> ssl.SSLContext:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        root = podman.exec(caddy, ["cat", f"{CADDY_STORAGE}/pki/authorities/local/root.crt"], check=False)
        if root.returncode == 0:
            return ssl.create_default_context(cadata=root.stdout.decode())
        time.sleep(0.5)
    raise AssertionError(f"Caddy made no internal root under {CADDY_STORAGE} in {READY_TIMEOUT_S} s:\n{podman.logs(caddy)[-3000:]}")


def wait_for_status(pod: ProdPod, path: str, status: int) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    last: object = None
    while time.monotonic() < deadline:
        try:
            last = pod.request("GET", path).status_code
            if last == status:
                return
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(1)
    raise AssertionError(f"{path}: not {status} after {READY_TIMEOUT_S} s; last: {last!r}\n{pod.podman.pod_logs(pod.played)}")


def test_a_chat_completion_through_the_prod_proxy_pod_reaches_vllm(prod_pod: ProdPod, vllm_server: VllmServer):  # noqa: F811
    body = {"model": vllm_server.served_model_name, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 8}
    response = prod_pod.request("POST", "/v1/chat/completions", json=body,
                                headers={"Authorization": f"Bearer {prod_pod.client_key}"})
    assert response.status_code == 200, f"{response.text}\n{prod_pod.podman.pod_logs(prod_pod.played)}"
    answer = response.json()
    assert answer["model"] == vllm_server.served_model_name
    assert answer["choices"][0]["message"]["content"]
    assert response.headers["strict-transport-security"].startswith("max-age=")


def test_the_prod_proxy_pod_answers_401_to_a_wrong_key(prod_pod: ProdPod):
    response = prod_pod.request("GET", "/v1/models", headers={"Authorization": "Bearer ggk_000000000000_" + "0" * 64})
    assert response.status_code == 401, response.text


def test_every_process_of_the_prod_proxy_pod_runs_as_its_rendered_uid(podman: Podman, prod_pod: ProdPod):
    seen: dict[str, list[Process]] = {}
    for pod in prod_pod.played.pods:
        for container in podman.containers(pod):
            if not container.is_infra:
                seen[container.name.rsplit("-", 1)[1]] = podman.top(container.name)
    assert set(seen) == set(prod_pod.uids) == {"caddy", "authz", "prober"}
    for name, processes in seen.items():
        assert processes, name
        for proc in processes:
            assert proc.uids == (prod_pod.uids[name],) * 4, f"{name}: {proc.argv} runs as {proc.uids}"
            assert proc.cap_effective == 0 and proc.no_new_privs


def test_the_prober_in_the_pod_sees_vllm_healthy(podman: Podman, prod_pod: ProdPod, vllm_server: VllmServer):  # noqa: F811
    # The prober's metrics on the pod's loopback: vLLM's /health through the Service name.
    prober = next(c.name for pod in prod_pod.played.pods for c in podman.containers(pod) if c.name.endswith("-prober"))
    url = f"http://127.0.0.1:{Ports(vllm_server.spec.port).prober}/metrics"
    healthy = f'{PROBE_SUCCESS}{{check="{Check.VLLM_HEALTH}"}} 1.0'
    deadline = time.monotonic() + READY_TIMEOUT_S
    text = ""
    while time.monotonic() < deadline:
        fetch = f"import urllib.request; print(urllib.request.urlopen({url!r}, timeout=5).read().decode())"
        text = podman.exec(prober, ["python", "-c", fetch], check=False).stdout.decode()
        if healthy in text:
            return
        time.sleep(2)
    raise AssertionError(f"no `{healthy}` from the prober in {READY_TIMEOUT_S} s; its metrics:\n{text[-3000:]}")

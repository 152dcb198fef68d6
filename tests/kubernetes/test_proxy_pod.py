"""The proxy pod as `gpugate render --stack prod` renders it (Caddy, authz, prober), run by `podman kube play`
from gpugate's images in front of a real vLLM (CPU) on this machine, beside the shared limits store its authz
keeps every key's limits in (the Redis pod `gpugate-limits`, gpugate/kubernetes/limitstore.py).

The pods are the rendered Deployments `gateway` and `gpugate-limits` with the ConfigMaps and Secrets they use,
as rendered, and the one Secret the proxy mounts that the bundle does not hold: `gpugate-tls`, which
cert-manager writes for the rendered Certificate (never the program). What differs from the rendered objects,
and why (`prod_pod_docs`):
  - images: the two images built here (tests/kubernetes/images.py) instead of the stack's pinned digests;
  - hostPort: Caddy's `https` port published on 127.0.0.1 at a free port (a cluster has the LoadBalancer);
  - the limits store: its `redis` port published on 127.0.0.1 at a free port, and the proxy pod resolves the
    store's Service name (`gpugate-limits.gpugate.svc.cluster.local`) to 10.0.2.2 through `hostAliases`, with
    that port in authz's Redis URL (the runtime env ConfigMap): there is no Service (nor cluster DNS) here,
    and the rendered 6379 may be held by another Redis on this machine. Its Service and NetworkPolicy are not
    played (podman has neither); its claim `gpugate-limits-data` is bound to an empty directory of the
    test's, as a kubelet hands a fresh volume to a pod with an fsGroup (`limits_claim`, `kube_play(claims=...)`);
  - the upstream: the pod resolves vLLM's headless Service name (`vllm.gpugate.svc.cluster.local`) to
    10.0.2.2 through `hostAliases` (slirp4netns's address for this machine's loopback, where the test's vLLM
    listens; there is no cluster DNS here), and vLLM's port in the Caddyfile and in the prober's health URL
    becomes the test vLLM's free port: the rendered 18000 is also the local stack's vLLM port on this
    machine, which another test session may hold. The public name resolves to the pod's own loopback (so the
    prober probes its own Caddy, never the internet).
What a cluster and `pulumi up` would provide is provided:
  - the Secrets get values: a key store with a client key, a key with a small rpm and the prober's key,
    vLLM's internal key, and the limits store's password (a random one, as `password` and as
    `requirepass <password>` in `redis.conf`, as infra/kubernetes.py generates it);
  - cert-manager's Secret for the rendered Certificate, as it is once the certificate is issued: named by
    the Certificate's secretName, labelled by its secretTemplate, type kubernetes.io/tls with `tls.crt` (the
    leaf and its CA) and `tls.key` (cert-manager's own annotations left out: nothing in the pod reads them).
    The certificate comes from a CA the test makes, as no ACME CA is reachable; the client trusts that CA.
The served model name is prod's: the test's vLLM serves SmolLM2 under it.
"""

from __future__ import annotations

import base64
import datetime
import io
import json
import os
import secrets
import ssl
import string
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from ruamel.yaml import YAML

from gpugate_runtime.contract.host import Ports
from gpugate_runtime.contract.metrics import PROBE_SUCCESS
from gpugate_runtime.contract.services import GID_GATEWAY
from gpugate_runtime.keys import key_id_of
from gpugate_runtime.prober import Check
from gpugate_runtime.spend import REDIS_PREFIX

from gpugate.kubernetes.limitstore import DATA_PVC, limits_url
from gpugate.kubernetes.objects import (
    GATEWAY,
    KEY_STORE_FILE,
    LIMITS,
    LIMITS_CONF_ITEM,
    LIMITS_PASSWORD_ITEM,
    PROBER_KEY_ITEM,
    SECRET_INTERNAL,
    SECRET_KEYS,
    SECRET_LIMITS,
    TLS_SECRET,
    VLLM_KEY_ITEM,
)
from gpugate.kubernetes.proxy import vllm_host
from gpugate.spec import GatewaySpec
from gpugate.stackfile import load_stack
from gpugate.targets import render_bundle
from tests.conftest import STACKS
from tests.e2e.conftest import VllmServer, find_free_port, running_vllm
from tests.kubernetes.podman import BuildResult, Played, Podman, Process
from tests.kubernetes.test_images import create_key

pytestmark = [pytest.mark.e2e, pytest.mark.podman]

STACK = "prod"
SLIRP_HOST_LOOPBACK = "10.0.2.2"  # slirp4netns with allow_host_loopback: this machine's 127.0.0.1
POD_NETWORK = "slirp4netns:allow_host_loopback=true"
READY_TIMEOUT_S = 120
PROXY_CONTAINERS = {"caddy", "authz", "prober"}
POD_CONTAINERS = PROXY_CONTAINERS | {"redis"}  # the limits store's one container
SMALL_RPM = 2  # the rpm of the key that shows the limits are held in the store


# --- the rendered objects, and what differs -----------------------------------------------------------


def rendered_objects(stack_file: Path) -> list[dict[str, Any]]:
    """Every object of the stack's bundle, as `gpugate render` writes them."""
    yaml = YAML(typ="safe", pure=True)
    bundle = render_bundle(load_stack(stack_file))
    return [yaml.load(data) for path, data in sorted(bundle.files.items()) if path.startswith("kubernetes/")]


def pod_spec(deployment: dict[str, Any]) -> dict[str, Any]:
    return deployment["spec"]["template"]["spec"]


def used_objects(objects: list[dict[str, Any]], deployment: dict[str, Any]) -> list[dict[str, Any]]:
    """The ConfigMaps and Secrets the Deployment's pod mounts or reads, as rendered."""
    spec = pod_spec(deployment)
    namespace = deployment["metadata"]["namespace"]
    used = {("ConfigMap", v["configMap"]["name"]) for v in spec["volumes"] if "configMap" in v}
    used |= {("Secret", v["secret"]["secretName"]) for v in spec["volumes"] if "secret" in v}
    used |= {("Secret", e["valueFrom"]["secretKeyRef"]["name"]) for c in spec["containers"] for e in c.get("env", [])
             if "secretKeyRef" in e.get("valueFrom", {})}
    found = [o for o in objects if (o["kind"], o["metadata"]["name"]) in used and o["metadata"].get("namespace") == namespace]
    assert {(o["kind"], o["metadata"]["name"]) for o in found} == used, "the pod uses objects the bundle lacks"
    return found


def swap_upstream_port(text: str, service: str, old: int, new: int) -> str:
    """vLLM's port `old` -> `new` wherever a rendered file names vLLM's address: the Caddyfile's
    `dynamic a <service> <port> {` upstreams and the prober's `http://<service>:<port>/health`."""
    swapped = text.replace(f" {service} {old} ", f" {service} {new} ").replace(f"//{service}:{old}/", f"//{service}:{new}/")
    assert swapped.count(service) == swapped.count(f"{service} {new} ") + swapped.count(f"{service}:{new}/"), (
        f"the rendered file names {service} in a form this test does not swap: update swap_upstream_port"
    )
    return swapped


def swap_limits_port(text: str, host: str, old: int, new: int) -> str:
    """The limits store's port `old` -> `new` in authz's Redis URL (`redis://<host>:<port>/0`)."""
    swapped = text.replace(f"//{host}:{old}/", f"//{host}:{new}/")
    assert swapped.count(host) == swapped.count(f"//{host}:{new}/"), (
        f"the rendered file names {host} in a form this test does not swap: update swap_limits_port"
    )
    return swapped


def limits_address(spec: GatewaySpec) -> tuple[str, int]:
    """The host name and port authz's rendered Redis URL names (the store's Service)."""
    assert spec.kubernetes is not None
    url = urlsplit(limits_url(spec.kubernetes))
    assert url.hostname is not None and url.port is not None
    return url.hostname, url.port


def limits_secret(password: str) -> dict[str, str]:
    """The limits store's Secret items for `password`, as infra/kubernetes.py writes them."""
    return {LIMITS_PASSWORD_ITEM: password, LIMITS_CONF_ITEM: f"requirepass {password}\n"}


def issued_tls_secret(certificate: dict[str, Any], chain: bytes, key: bytes) -> dict[str, Any]:
    """The Secret cert-manager writes for `certificate` once it is issued (module docstring)."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": certificate["spec"]["secretName"], "namespace": certificate["metadata"]["namespace"],
                     "labels": certificate["spec"]["secretTemplate"]["labels"]},
        "type": "kubernetes.io/tls",
        "data": {"tls.crt": base64.b64encode(chain).decode(), "tls.key": base64.b64encode(key).decode()},
    }


@dataclass(frozen=True)
class PodInputs:
    """What the test hands the rendered objects: images, the published ports, vLLM's address, secret values,
    and the certificate (PEM chain and key) cert-manager would have put in the TLS Secret."""

    proxy_image: str
    runtime_image: str
    host_port: int
    vllm_port: int
    limits_port: int
    secrets: dict[str, dict[str, str]]
    tls_chain: bytes
    tls_key: bytes


def prod_pod_docs(spec: GatewaySpec, objects: list[dict[str, Any]], inputs: PodInputs) -> list[dict[str, Any]]:
    """The proxy pod's and the limits store's ConfigMaps, Secrets and Deployments (the proxy's last), changed
    only as the module docstring says, and the TLS Secret cert-manager would write for the rendered Certificate."""
    assert spec.kubernetes is not None
    deployment = next(o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == GATEWAY)
    store = next(o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == LIMITS)
    certificate = next(o for o in objects if o["kind"] == "Certificate")
    issued = issued_tls_secret(certificate, inputs.tls_chain, inputs.tls_key)
    used = used_objects([*objects, issued], deployment)
    used += [o for o in used_objects(objects, store) if not any(o is u for u in used)]
    docs = [*used, store, deployment]
    service = vllm_host(spec.kubernetes)
    rendered_port = Ports(spec.ports.internal_base).vllm
    limits_host, limits_port = limits_address(spec)
    for doc in docs:
        if doc is issued:  # already holds what cert-manager would
            continue
        if doc["kind"] == "Secret":
            doc.pop("data", None)
            doc["stringData"] = inputs.secrets[doc["metadata"]["name"]]
        elif doc["kind"] == "ConfigMap":
            doc["data"] = {name: swap_limits_port(swap_upstream_port(text, service, rendered_port, inputs.vllm_port),
                                                  limits_host, limits_port, inputs.limits_port)
                           for name, text in doc["data"].items()}
    spec_ = pod_spec(deployment)
    spec_["hostAliases"] = [
        {"ip": SLIRP_HOST_LOOPBACK, "hostnames": [service, limits_host]},
        {"ip": "127.0.0.1", "hostnames": [spec.domain]},
    ]
    for container in [*spec_["containers"], *pod_spec(store)["containers"]]:
        container["image"] = inputs.proxy_image if container["name"] == "caddy" else inputs.runtime_image
    caddy = next(c for c in spec_["containers"] if c["name"] == "caddy")
    https = next(p for p in caddy["ports"] if p["name"] == "https")
    https.update({"hostPort": inputs.host_port, "hostIP": "127.0.0.1"})
    (redis,) = pod_spec(store)["containers"]
    (port,) = redis["ports"]
    assert port["containerPort"] == limits_port
    port.update({"hostPort": inputs.limits_port, "hostIP": "127.0.0.1"})
    return docs


def limits_claim(work: Path) -> Path:
    """An empty directory for the store's claim, as a kubelet hands a fresh volume to a pod with an fsGroup:
    owned by root, in the fsGroup, group-writable and setgid (Redis writes its append-only file there)."""
    data = work / DATA_PVC
    data.mkdir()
    os.chown(data, 0, GID_GATEWAY)
    data.chmod(0o2770)
    return data


# --- the certificate cert-manager would issue -----------------------------------------------------------


def issue_certificate(domain: str) -> tuple[bytes, bytes, bytes]:
    """(CA certificate, leaf certificate, leaf key) as PEM: a CA of the test's own, a 90-day leaf for `domain`."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gpugate test CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=90))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(ca_name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=90))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(domain)]), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    key_pem = key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return ca.public_bytes(pem), leaf.public_bytes(pem) + ca.public_bytes(pem), key_pem


# --- the running pod ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProdPod:
    podman: Podman
    played: Played
    url: str
    domain: str
    ca: ssl.SSLContext
    client_key: str
    small_rpm_key: str  # a key of SMALL_RPM requests per minute
    limits_password: str
    uids: dict[str, int]  # container -> runAsUser, from the rendered YAML (both pods)

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """To 127.0.0.1 with the public name as SNI and Host: the certificate is checked for that name."""
        headers = {"Host": self.domain, **kwargs.pop("headers", {})}
        with httpx.Client(verify=self.ca, timeout=120) as client:
            return client.request(method, f"{self.url}{path}", headers=headers,
                                  extensions={"sni_hostname": self.domain}, **kwargs)

    def logs(self) -> str:
        return self.podman.pod_logs(self.played)

    def redis(self, *command: str) -> str:
        """`redis-cli` with the store's password, in the limits store's own container."""
        redis = next(c.name for pod in self.played.pods for c in self.podman.containers(pod) if c.name.endswith("-redis"))
        argv = ["redis-cli", "--no-auth-warning", "-a", self.limits_password, *command]
        return self.podman.exec(redis, argv).stdout.decode()


def prod_pod_manifests(pod: ProdPod) -> list[dict[str, Any]]:
    """The documents podman played (after the harness's adaptations)."""
    return [doc for doc in YAML(typ="safe", pure=True).load_all(pod.played.yaml_path.read_text()) if doc]


@pytest.fixture(scope="module")
def prod_spec() -> GatewaySpec:
    return load_stack(STACKS / f"Pulumi.{STACK}.yaml").spec


@pytest.fixture(scope="module")
def prod_vllm(vllm_python: Path, smollm_dir: Path, prod_spec: GatewaySpec,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmServer]:
    """A real vLLM serving SmolLM2 under prod's served model name, on a free loopback port."""
    with running_vllm(vllm_python, smollm_dir, tmp_path_factory.mktemp("vllm"),
                      served_model_name=prod_spec.model.served_name) as server:
        yield server


@pytest.fixture(scope="module")
def prod_pod(podman: Podman, proxy_image: BuildResult, runtime_image: BuildResult, prod_vllm: VllmServer,
             prod_spec: GatewaySpec, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProdPod]:
    work = tmp_path_factory.mktemp("prod-pod")
    store = work / KEY_STORE_FILE
    client_key = create_key(store, "team-prod-pod")
    small_rpm_key = create_key_with_rpm(store, "team-small-rpm", SMALL_RPM)
    prober_key = create_key(store, "prober")
    password = limits_password()
    ca_pem, chain, key = issue_certificate(prod_spec.domain)
    inputs = PodInputs(
        proxy_image=proxy_image.tag,
        runtime_image=runtime_image.tag,
        host_port=find_free_port(),
        vllm_port=prod_vllm.spec.port,
        limits_port=find_free_port(),
        secrets={
            SECRET_KEYS: {KEY_STORE_FILE: store.read_text()},
            SECRET_INTERNAL: {VLLM_KEY_ITEM: prod_vllm.api_key, PROBER_KEY_ITEM: prober_key},
            SECRET_LIMITS: limits_secret(password),
        },
        tls_chain=chain,
        tls_key=key,
    )
    docs = prod_pod_docs(prod_spec, rendered_objects(STACKS / f"Pulumi.{STACK}.yaml"), inputs)
    containers = [c for d in docs if d["kind"] == "Deployment" for c in pod_spec(d)["containers"]]
    uids = {c["name"]: c["securityContext"]["runAsUser"] for c in containers}
    out = io.StringIO()
    YAML(typ="safe", pure=True).dump_all(docs, out)
    played = podman.kube_play(out.getvalue(), network=POD_NETWORK, name="prod-pod", claims={DATA_PVC: limits_claim(work)})
    try:
        podman.wait_running(played, timeout=READY_TIMEOUT_S)
        ca = ssl.create_default_context(cadata=ca_pem.decode())
        pod = ProdPod(podman, played, f"https://127.0.0.1:{inputs.host_port}", prod_spec.domain, ca, client_key,
                      small_rpm_key, password, uids)
        wait_for_status(pod, "/healthz", 200)  # Caddy serves the domain's certificate and reaches vLLM
        wait_for_status(pod, "/v1/models", 401)  # authz answers behind Caddy (no key: its 401, not a 503)
        yield pod
    finally:
        podman.kube_down(played)


def limits_password() -> str:
    """A password like the program's (a RandomPassword of letters and digits, infra/kubernetes.py)."""
    return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(48))


def create_key_with_rpm(store: Path, name: str, rpm: int) -> str:
    """A client key of `rpm` requests per minute: `python -m gpugate_runtime keys create --rpm`."""
    proc = subprocess.run(
        [sys.executable, "-m", "gpugate_runtime", "keys", "create", name, "--rpm", str(rpm), "--store", str(store), "--json"],
        capture_output=True, text=True, check=True, timeout=60,
    )
    created = json.loads(proc.stdout)
    assert created["rpm"] == rpm
    return created["key"]


def wait_for_status(pod: ProdPod, path: str, status: int) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    last: object = None
    tries = 0
    while time.monotonic() < deadline:
        tries += 1
        try:
            last = pod.request("GET", path).status_code
            if last == status:
                return
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(1)
    raise AssertionError(f"{path}: not {status} after {tries} tries in {READY_TIMEOUT_S} s; last: {last!r}\n{pod.logs()}")


# --- the behaviours -------------------------------------------------------------------------------------------


def test_the_played_pods_differ_from_the_rendered_ones_only_in_images_host_ports_and_upstreams(prod_spec: GatewaySpec):
    # given the rendered objects and what the test hands them
    objects = rendered_objects(STACKS / f"Pulumi.{STACK}.yaml")
    inputs = PodInputs("localhost/proxy:t", "localhost/runtime:t", 40443, 40000, 46379,
                       {SECRET_KEYS: {KEY_STORE_FILE: "{}"}, SECRET_INTERNAL: {VLLM_KEY_ITEM: "v", PROBER_KEY_ITEM: "p"},
                        SECRET_LIMITS: limits_secret("pw")},
                       b"chain PEM", b"key PEM")
    limits_host, limits_port = limits_address(prod_spec)
    rendered = {(o["kind"], o["metadata"]["name"]): o for o in objects}
    certificate = rendered[("Certificate", "gpugate")]
    # when the pod's documents are made
    docs = prod_pod_docs(prod_spec, json.loads(json.dumps(objects)), inputs)
    # then the one Secret the bundle lacks is cert-manager's for the rendered Certificate, holding the given certificate
    assert ("Secret", TLS_SECRET) not in rendered
    issued = [d for d in docs if (d["kind"], d["metadata"]["name"]) == ("Secret", TLS_SECRET)]
    assert issued == [{
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": certificate["spec"]["secretName"], "namespace": certificate["metadata"]["namespace"],
                     "labels": certificate["spec"]["secretTemplate"]["labels"]},
        "type": "kubernetes.io/tls",
        "data": {"tls.crt": base64.b64encode(b"chain PEM").decode(), "tls.key": base64.b64encode(b"key PEM").decode()},
    }]
    # ... and every other document is its rendered object but for the named changes: both Deployments, the
    # limits store's Secret once (both pods mount it), its Secret items as infra/kubernetes.py writes them
    assert [d["metadata"]["name"] for d in docs if d["kind"] == "Deployment"] == [LIMITS, GATEWAY]
    assert [d["metadata"]["name"] for d in docs].count(SECRET_LIMITS) == 1
    assert limits_secret("pw")[LIMITS_CONF_ITEM] == "requirepass pw\n"
    swapped_limits = 0
    for doc in docs:
        if doc is issued[0]:
            continue
        original = rendered[(doc["kind"], doc["metadata"]["name"])]
        if doc["kind"] == "Secret":
            assert set(doc["stringData"]) == set(original["stringData"])
            assert {k: v for k, v in doc.items() if k != "stringData"} == {k: v for k, v in original.items() if k != "stringData"}
        elif doc["kind"] == "ConfigMap":
            service = vllm_host(prod_spec.kubernetes)
            for name, text in doc["data"].items():
                back = swap_upstream_port(swap_limits_port(text, limits_host, 46379, limits_port),
                                          service, 40000, Ports(prod_spec.ports.internal_base).vllm)
                assert back == original["data"][name]
                assert (text != back) == (service in text or limits_host in text)
                swapped_limits += f"//{limits_host}:46379/" in text
        elif doc["metadata"]["name"] == LIMITS:
            spec, was = pod_spec(doc), pod_spec(original)
            (redis,) = spec["containers"]
            assert redis.pop("image") == "localhost/runtime:t"
            (port,) = redis["ports"]
            assert (port.pop("hostPort"), port.pop("hostIP")) == (46379, "127.0.0.1")
            assert port["containerPort"] == limits_port
            for c in was["containers"]:
                c.pop("image")
            assert doc == original
        else:
            spec, was = pod_spec(doc), pod_spec(original)
            assert spec.pop("hostAliases")[0]["hostnames"] == [vllm_host(prod_spec.kubernetes), limits_host]
            caddy = next(c for c in spec["containers"] if c["name"] == "caddy")
            https = next(p for p in caddy["ports"] if p["name"] == "https")
            assert (https.pop("hostPort"), https.pop("hostIP")) == (40443, "127.0.0.1")
            assert {c["name"]: c.pop("image") for c in spec["containers"]} == {
                "caddy": "localhost/proxy:t", "authz": "localhost/runtime:t", "prober": "localhost/runtime:t"}
            for c in was["containers"]:
                c.pop("image")
            assert doc == original
    assert swapped_limits == 1  # authz's Redis URL, in the runtime env


def test_a_chat_completion_with_a_client_key_goes_through_the_pod_over_tls(prod_pod: ProdPod, prod_vllm: VllmServer):
    # given the rendered prod proxy pod in front of a real vLLM
    body = {"model": prod_vllm.served_model_name, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 8}
    # when a client posts a chat completion with its key, over TLS to the public name
    response = prod_pod.request("POST", "/v1/chat/completions", json=body,
                                headers={"Authorization": f"Bearer {prod_pod.client_key}"})
    # then vLLM answered through Caddy, with the gateway's headers
    assert response.status_code == 200, f"{response.text}\n{prod_pod.logs()}"
    answer = response.json()
    assert answer["model"] == prod_vllm.served_model_name
    assert answer["choices"][0]["message"]["content"]
    assert answer["usage"]["completion_tokens"] >= 1
    assert response.headers["strict-transport-security"].startswith("max-age=")
    assert response.headers["x-request-id"]


def test_the_pod_serves_the_certificate_of_the_public_name(prod_pod: ProdPod):
    response = prod_pod.request("GET", "/healthz")
    assert response.status_code == 200
    with httpx.Client(verify=prod_pod.ca, timeout=30) as client:
        # the same certificate checked against another name fails: the name really is checked
        with pytest.raises(httpx.ConnectError):
            client.get(f"{prod_pod.url}/healthz", extensions={"sni_hostname": "other.example.com"})


def test_a_wrong_key_gets_401_and_never_reaches_vllm(prod_pod: ProdPod, prod_vllm: VllmServer):
    wrong = prod_pod.client_key[:-4] + ("0000" if not prod_pod.client_key.endswith("0000") else "1111")
    body = {"model": prod_vllm.served_model_name, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 8}
    response = prod_pod.request("POST", "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {wrong}"})
    anonymous = prod_pod.request("GET", "/v1/models")
    assert response.status_code == 401, response.text
    assert "choices" not in response.text
    assert anonymous.status_code == 401


def test_a_keys_rpm_is_held_in_the_shared_limits_store(prod_pod: ProdPod):
    # given a key of SMALL_RPM requests per minute, whose token bucket authz keeps in the limits store
    headers = {"Authorization": f"Bearer {prod_pod.small_rpm_key}"}
    bucket = f"{REDIS_PREFIX}:rpm:{key_id_of(prod_pod.small_rpm_key)}"
    # when it makes one request more than its rpm within the minute
    responses = [prod_pod.request("GET", "/v1/models", headers=headers) for _ in range(SMALL_RPM + 1)]
    # then the last one is refused by its rpm, and the store holds the key's bucket, spent
    assert [r.status_code for r in responses] == [200] * SMALL_RPM + [429], f"{[r.text for r in responses]}\n{prod_pod.logs()}"
    assert "rate_limit_exceeded" in responses[-1].text and int(responses[-1].headers["retry-after"]) >= 1
    assert float(prod_pod.redis("HGET", bucket, "tokens")) < 1
    # ... and once the store forgets the bucket the key gets through again: the count lives in Redis, not in authz
    assert prod_pod.redis("DEL", bucket).strip() == "1"
    again = prod_pod.request("GET", "/v1/models", headers=headers)
    assert again.status_code == 200, again.text


def app_processes(podman: Podman, played: Played) -> dict[str, list[Process]]:
    """Container name in the YAML -> its processes, read from the kernel (the infra container left out)."""
    seen: dict[str, list[Process]] = {}
    for pod in played.pods:
        for container in podman.containers(pod):
            if not container.is_infra:
                seen[container.name.rsplit("-", 1)[1]] = podman.top(container.name)
    return seen


def test_every_process_of_the_pod_runs_as_the_non_root_uid_its_manifest_names(podman: Podman, prod_pod: ProdPod):
    # given the running pod, read from the kernel rather than from the YAML
    seen = app_processes(podman, prod_pod.played)
    # then every container of the rendered Deployments runs, each with at least one process ...
    assert set(seen) == set(prod_pod.uids) == POD_CONTAINERS
    assert all(seen.values())
    # ... each as its runAsUser (real, effective, saved, file-system), in the gateway group, with no capability
    for name, processes in seen.items():
        assert prod_pod.uids[name] != 0
        for proc in processes:
            assert proc.uids == (prod_pod.uids[name],) * 4, f"{name}: {proc.argv} runs as {proc.uids}"
            assert proc.gids[1] == GID_GATEWAY
            assert proc.cap_effective == 0, f"{name}: {proc.argv} has capabilities {proc.cap_effective:#x}"
            assert proc.no_new_privs, f"{name}: {proc.argv} may gain privileges"


def root_mount_options(host_pid: int) -> list[str]:
    """The mount options of `/` as the process sees it (its mount namespace, from /proc/<pid>/mountinfo)."""
    for line in Path(f"/proc/{host_pid}/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == "/":
            return fields[5].split(",")
    raise AssertionError(f"pid {host_pid}: no / in its mountinfo")


def test_every_container_of_the_pod_runs_on_a_read_only_root(podman: Podman, prod_pod: ProdPod):
    # given what the manifest says of each container's root file system
    containers = [c for d in prod_pod_manifests(prod_pod) if d["kind"] == "Deployment" for c in pod_spec(d)["containers"]]
    read_only = {c["name"]: c["securityContext"]["readOnlyRootFilesystem"] for c in containers}
    assert set(read_only) == POD_CONTAINERS and all(read_only.values())
    # then every process of every container sees `/` mounted read-only
    seen = app_processes(podman, prod_pod.played)
    assert set(seen) == POD_CONTAINERS
    for name, processes in seen.items():
        for proc in processes:
            assert root_mount_options(proc.host_pid)[0] == "ro", f"{name}: {proc.argv} has a writable root"


def test_the_prober_in_the_pod_reaches_vllm_through_the_service_name(podman: Podman, prod_pod: ProdPod,
                                                                      prod_spec: GatewaySpec):
    prober = next(c.name for pod in prod_pod.played.pods for c in podman.containers(pod) if c.name.endswith("-prober"))
    url = f"http://127.0.0.1:{Ports(prod_spec.ports.internal_base).prober}/metrics"
    healthy = f'{PROBE_SUCCESS}{{check="{Check.VLLM_HEALTH}"}} 1.0'
    fetch = f"import urllib.request; print(urllib.request.urlopen({url!r}, timeout=5).read().decode())"
    deadline = time.monotonic() + READY_TIMEOUT_S
    text, tries = "", 0
    while time.monotonic() < deadline:
        tries += 1
        text = podman.exec(prober, ["/opt/gpugate/venv/bin/python", "-c", fetch], check=False).stdout.decode()
        if healthy in text:
            return
        time.sleep(2)
    raise AssertionError(f"no `{healthy}` from the prober after {tries} tries; its metrics:\n{text[-3000:]}")

"""gpugate/kubernetes/: the Kubernetes objects of the prod stack, as rendered into its bundle and checked by real tools."""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from gpugate_runtime.contract import metrics as m
from gpugate_runtime.authz import KeyStoreWatcher
from gpugate_runtime.keys import KeyRecord, KeyStore, utcnow
from gpugate_runtime.prober_settings import AlertSinkSettings, ProberSettings
from gpugate_runtime.settings import AuthzSettings, KeysSettings, load_settings
from prometheus_client import Counter, CollectorRegistry
from ruamel.yaml import YAML

from gpugate.kubernetes.checks import check_manifest, check_object
from gpugate.kubernetes.objects import GPU_RESOURCE, GPU_TAINT, PLACEHOLDER
from gpugate.kubernetes.proxy import pod_caddyfile
from gpugate.kubernetes.sizing import startup_budget_seconds, weight_gib
from gpugate.kubernetes.vllm import drain_script
from gpugate.render.bundle import header
from gpugate.targets import render_bundle
from gpugate.stackfile import load_stack

K8S_VERSION = "1.30"


@pytest.fixture(scope="module")
def prod_objects() -> dict[str, dict]:
    """path -> object, as `gpugate render --stack prod` writes them."""
    bundle = render_bundle(load_stack("prod"))
    yaml = YAML(typ="safe", pure=True)
    return {path: yaml.load(data) for path, data in bundle.files.items() if path.startswith("kubernetes/")}


def find(objects: dict[str, dict], kind: str, name: str) -> dict:
    return next(o for o in objects.values() if o["kind"] == kind and o["metadata"]["name"] == name)


def pod_spec(deployment: dict) -> dict:
    return deployment["spec"]["template"]["spec"]


def test_the_prod_bundle_has_one_file_per_object_and_each_passes_the_schemas_of_the_spec_cluster_version(prod_objects, tmp_path):
    # given the prod bundle (Kubernetes 1.30 in its stack file)
    bundle = render_bundle(load_stack("prod"))
    kinds = {o["kind"] for o in prod_objects.values()}
    assert {"Deployment", "Service", "NetworkPolicy", "PodDisruptionBudget", "ScaledObject", "PrometheusRule"} <= kinds
    # when every file is checked as `gpugate validate` checks it
    for path in sorted(prod_objects):
        file = tmp_path / Path(path).name
        file.write_bytes(bundle.files[path])
        ok, detail = check_manifest(file, tmp_path)
        # then every one passes, and each file names the version it was checked for
        assert ok, f"{path}: {detail}"
        assert bundle.files[path].decode().splitlines()[0].endswith(f"(Kubernetes {K8S_VERSION})")


def test_a_field_the_kubernetes_api_does_not_have_is_refused(prod_objects):
    deployment = find(prod_objects, "Deployment", "vllm")
    typo = {**deployment, "spec": {**deployment["spec"], "replica": 2}}
    problems = check_object(typo, K8S_VERSION)
    assert problems and "'replica' was unexpected" in problems[0]


def test_a_scaled_object_with_a_misspelt_or_mistyped_field_is_refused_by_keda_crd_model(prod_objects):
    scaled = find(prod_objects, "ScaledObject", "vllm")
    misspelt = {**scaled, "spec": {**scaled["spec"], "minReplicas": 2}}
    assert check_object(misspelt, K8S_VERSION) == ["ScaledObject: unknown field .spec.minReplicas"]
    mistyped = {**scaled, "spec": {**scaled["spec"], "maxReplicaCount": "eight"}}
    assert "maxReplicaCount" in check_object(mistyped, K8S_VERSION)[0]


def test_the_vllm_deployment_asks_for_the_gpus_lands_only_on_the_tainted_gpu_pool_and_keeps_one_replica_per_node(prod_objects):
    spec = pod_spec(find(prod_objects, "Deployment", "vllm"))
    [container] = spec["containers"]
    assert container["resources"]["limits"][GPU_RESOURCE] == "1"
    assert spec["nodeSelector"] == {"gpugate.dev/pool": "gpu"}
    assert {**GPU_TAINT, "operator": "Equal"} in spec["tolerations"]
    assert spec["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0]["topologyKey"] == "kubernetes.io/hostname"
    # the image is the spec's pin, and vLLM listens on the pod address with the spec's model and revision
    stack = load_stack("prod")
    assert container["image"] == stack.spec.vllm.image
    args = container["args"]
    assert args[args.index("--host") + 1] == "0.0.0.0"
    assert args[args.index("--revision") + 1] == stack.spec.model.revision


def test_vllm_probes_health_and_its_startup_budget_covers_a_cold_download_of_the_weights(prod_objects):
    [container] = pod_spec(find(prod_objects, "Deployment", "vllm"))["containers"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/health"
    startup = container["startupProbe"]
    budget = startup["periodSeconds"] * startup["failureThreshold"]
    spec = load_stack("prod").spec
    assert budget == startup_budget_seconds(spec)
    # 14.2 GiB of Qwen2.5-7B weights at 50 MiB/s take ~290 s; loading and CUDA graphs come on top
    assert budget >= weight_gib(spec) * 1024 / 50 + 300


def test_the_internal_key_reaches_vllm_and_caddy_from_a_secret_and_no_secret_is_rendered(prod_objects):
    vllm = pod_spec(find(prod_objects, "Deployment", "vllm"))["containers"][0]
    caddy = next(c for c in pod_spec(find(prod_objects, "Deployment", "gateway"))["containers"] if c["name"] == "caddy")
    for container, name in ((vllm, "VLLM_API_KEY"), (caddy, "GPUGATE_VLLM_API_KEY")):
        env = next(e for e in container["env"] if e["name"] == name)
        assert env["valueFrom"]["secretKeyRef"] == {"name": "gpugate-internal", "key": "vllm_api_key"}
    for obj in prod_objects.values():
        if obj["kind"] == "Secret":
            assert set(obj["stringData"].values()) == {PLACEHOLDER}


def test_only_the_proxy_is_exposed_and_only_on_80_and_443(prod_objects):
    public = [o for o in prod_objects.values() if o["kind"] == "Service" and o["spec"].get("type") == "LoadBalancer"]
    assert [s["metadata"]["name"] for s in public] == ["gateway"]
    assert sorted(p["port"] for p in public[0]["spec"]["ports"]) == [80, 443]
    assert public[0]["spec"]["selector"]["app.kubernetes.io/name"] == "gateway"


def test_network_policies_deny_by_default_and_let_only_the_proxy_and_prometheus_reach_vllm(prod_objects):
    policies = {o["metadata"]["name"]: o["spec"] for o in prod_objects.values() if o["kind"] == "NetworkPolicy"}
    assert policies["default-deny-ingress"] == {"podSelector": {}, "policyTypes": ["Ingress"], "ingress": []}
    [rule] = policies["vllm-from-gateway"]["ingress"]
    peers = rule["from"]
    assert {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "gateway", "app.kubernetes.io/part-of": "gpugate"}}} in peers
    assert {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}} in peers
    assert len(peers) == 2 and rule["ports"] == [{"port": 18000, "protocol": "TCP"}]


def test_both_deployments_have_a_disruption_budget_of_one_pod(prod_objects):
    for name in ("vllm", "gateway"):
        budget = find(prod_objects, "PodDisruptionBudget", name)["spec"]
        assert budget["maxUnavailable"] == 1 and budget["selector"]["matchLabels"]["app.kubernetes.io/name"] == name


def test_keda_scales_vllm_on_its_queue_depth_per_replica_within_the_replica_bounds(prod_objects):
    scaled = find(prod_objects, "ScaledObject", "vllm")["spec"]
    kube = load_stack("prod").spec.kubernetes
    assert scaled["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "vllm"}
    assert (scaled["minReplicaCount"], scaled["maxReplicaCount"]) == (kube.replicas.min, kube.replicas.max) == (2, 8)
    [trigger] = scaled["triggers"]
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
    assert trigger["metadata"]["query"] == f'sum({m.VLLM_WAITING}{{namespace="gpugate", job="vllm"}})'
    assert trigger["metadata"]["threshold"] == str(kube.autoscaling.waiting_per_replica)
    behavior = scaled["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] == kube.autoscaling.scale_down_stabilization_seconds


def test_a_replica_being_removed_has_time_to_drain_before_it_is_killed(prod_objects):
    kube = load_stack("prod").spec.kubernetes
    for name in ("vllm", "gateway"):
        spec = pod_spec(find(prod_objects, "Deployment", name))
        assert spec["terminationGracePeriodSeconds"] > kube.autoscaling.drain_seconds
        assert all("preStop" in c.get("lifecycle", {}) for c in spec["containers"] if c["name"] in ("vllm", "caddy"))


class _Metrics(http.server.BaseHTTPRequestHandler):
    """A stand-in for vLLM's /metrics: `running` requests for the first `busy_scrapes` scrapes."""

    busy_scrapes = 0
    scrapes = 0

    def do_GET(self) -> None:  # noqa: N802
        type(self).scrapes += 1
        running = 3 if type(self).scrapes <= type(self).busy_scrapes else 0
        body = (
            f"# TYPE {m.VLLM_RUNNING} gauge\n"
            f'{m.VLLM_RUNNING}{{model_name="q"}} {running}.0\n'
            f'{m.VLLM_WAITING}{{model_name="q"}} 0.0\n'
        ).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def metrics_server() -> Iterator[tuple[int, type[_Metrics]]]:
    handler = type("Handler", (_Metrics,), {"busy_scrapes": 0, "scrapes": 0})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1], handler
    server.shutdown()
    server.server_close()


def test_the_vllm_prestop_hook_waits_until_the_last_stream_ends(metrics_server):
    # given vLLM still running requests for the first two scrapes (the hook polls every 2 s)
    port, handler = metrics_server
    handler.busy_scrapes = 2
    # when the preStop hook runs (without the endpoint-propagation pause)
    started = time.monotonic()
    subprocess.run([sys.executable, "-c", drain_script(port, 30, settle_seconds=0)], check=True, timeout=30)
    # then it returned only after vLLM reported nothing running, and long before its budget
    assert handler.scrapes == 3
    assert 3.5 < time.monotonic() - started < 15


def test_the_vllm_prestop_hook_gives_up_at_the_drain_budget(metrics_server):
    port, handler = metrics_server
    handler.busy_scrapes = 10_000
    started = time.monotonic()
    subprocess.run([sys.executable, "-c", drain_script(port, 3, settle_seconds=0)], check=True, timeout=30)
    assert 2.5 < time.monotonic() - started < 8


def test_the_proxy_pod_caddyfile_balances_over_every_vllm_pod_and_exposes_metrics_to_prometheus(tmp_path):
    stack = load_stack("prod")
    text = pod_caddyfile(stack.spec, header(stack))
    # /healthz, /v1/models and the completions each proxy to every pod
    assert text.count("dynamic a vllm.gpugate.svc.cluster.local 18000") == 3
    assert "lb_policy least_conn" in text and "127.0.0.1:18000" not in text
    assert "http://:18005 {" in text and "bind 127.0.0.1" not in text
    # and Caddy itself accepts it
    path = tmp_path / "Caddyfile"
    path.write_text(text)
    proc = subprocess.run(
        ["caddy", "validate", "--config", str(path), "--adapter", "caddyfile"],
        capture_output=True,
        text=True,
        env={**os.environ, "GPUGATE_VLLM_API_KEY": "test"},
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_the_proxy_pod_runtime_settings_load_with_each_service_own_model(prod_objects, tmp_path):
    env = tmp_path / "gpugate.env"
    env.write_text(find(prod_objects, "ConfigMap", "gpugate-runtime-env")["data"]["gpugate.env"])
    authz = load_settings(AuthzSettings, env)
    assert str(authz.key_store) == "/etc/gpugate/keys/keys.json" and str(authz.log_file) == "/dev/stdout"
    prober = load_settings(ProberSettings, env)
    assert str(prober.vllm_health_url) == "http://vllm.gpugate.svc.cluster.local:18000/health"
    assert str(prober.public_url) == "https://llm.gpugate.example.com/"
    load_settings(KeysSettings, env)
    load_settings(AlertSinkSettings, env)


def _projected_secret(directory: Path, version: str, store: KeyStore) -> None:
    """Write a key store the way the kubelet updates a Secret volume: a new timestamped directory,
    then an atomic rename of the `..data` symlink; `keys.json` links through `..data`."""
    stamp = directory / f"..{version}"
    stamp.mkdir()
    (stamp / "keys.json").write_text(store.model_dump_json())
    tmp_link = directory / "..data_tmp"
    tmp_link.symlink_to(stamp.name)
    os.replace(tmp_link, directory / "..data")
    if not (directory / "keys.json").is_symlink():
        (directory / "keys.json").symlink_to("..data/keys.json")


def _record(key_id: str) -> KeyRecord:
    now = utcnow()
    return KeyRecord(id=key_id, name=f"k{key_id[:4]}", sha256="0" * 64, created_at=now, expires_at=now.replace(year=now.year + 1))


def test_authz_reloads_a_key_store_mounted_from_a_secret_when_the_kubelet_swaps_it(tmp_path):
    # given a key store mounted as a Secret volume holding one key
    mount = tmp_path / "keys"
    mount.mkdir()
    _projected_secret(mount, "2026_01_01_00_00_00.1", KeyStore(keys=(_record("aaaaaaaaaaaa"),)))
    registry = CollectorRegistry()
    watcher = KeyStoreWatcher(
        AuthzSettings(key_store=mount / "keys.json", log_file=tmp_path / "authz.log"),
        Counter("reloads", "", registry=registry),
        Counter("failures", "", registry=registry),
    )
    watcher.check()
    assert set(watcher.keys) == {"aaaaaaaaaaaa"}
    # when the Secret gains a key (same size of record: only the symlink swap tells them apart)
    _projected_secret(mount, "2026_01_01_00_01_00.2", KeyStore(keys=(_record("bbbbbbbbbbbb"),)))
    watcher.check()
    # then authz serves the new store at its next check
    assert set(watcher.keys) == {"bbbbbbbbbbbb"}


def test_every_container_has_requests_and_limits_and_the_gateway_pods_run_as_non_root_on_read_only_roots(prod_objects):
    for obj in prod_objects.values():
        if obj["kind"] not in ("Deployment", "DaemonSet"):
            continue
        for container in pod_spec(obj)["containers"]:
            resources = container["resources"]
            assert {"cpu", "memory"} <= set(resources["requests"]) and {"cpu", "memory"} <= set(resources["limits"])
        if obj["metadata"]["namespace"] == "gpugate":  # the GPU daemons need the node's devices
            for container in pod_spec(obj)["containers"]:
                context = container["securityContext"]
                assert context["runAsNonRoot"] and context["readOnlyRootFilesystem"]
                assert context["capabilities"] == {"drop": ["ALL"]} and context["allowPrivilegeEscalation"] is False


def test_authz_reads_the_access_log_caddy_writes_and_nothing_else_of_caddy(prod_objects):
    containers = {c["name"]: c for c in pod_spec(find(prod_objects, "Deployment", "gateway"))["containers"]}
    caddy, authz = containers["caddy"], containers["authz"]
    # authz reads the access log Caddy writes through the gateway group the pod's volumes belong to
    group = pod_spec(find(prod_objects, "Deployment", "gateway"))["securityContext"]["fsGroup"]
    assert authz["securityContext"]["runAsGroup"] == caddy["securityContext"]["runAsGroup"] == group
    logs = {m["mountPath"] for m in caddy["volumeMounts"] if m["name"] == "logs"}
    assert logs == {m["mountPath"] for m in authz["volumeMounts"] if m["name"] == "logs"} == {"/var/log/gpugate"}
    # but not the certificates or the Caddyfile
    assert {m["name"] for m in authz["volumeMounts"]} == {"runtime-env", "keys", "logs"}


def test_prometheus_scrapes_only_ready_vllm_pods_so_a_replica_still_loading_never_pages(prod_objects):
    [endpoint] = find(prod_objects, "ServiceMonitor", "vllm")["spec"]["endpoints"]
    keep, job = endpoint["relabelings"]
    assert keep == {"sourceLabels": ["__meta_kubernetes_endpoint_ready"], "regex": "true", "action": "keep"}
    assert job == {"targetLabel": "job", "replacement": "vllm", "action": "replace"}

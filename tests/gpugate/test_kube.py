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
    secrets = [obj for obj in prod_objects.values() if obj["kind"] == "Secret"]
    assert {s["metadata"]["name"] for s in secrets} >= {"gpugate-internal", "gpugate-keys"}, "the Secrets to check"
    for obj in secrets:
        assert obj["stringData"] and set(obj["stringData"].values()) == {PLACEHOLDER}, obj["metadata"]["name"]


def test_only_the_proxy_is_exposed_and_only_on_80_and_443(prod_objects):
    public = [o for o in prod_objects.values() if o["kind"] == "Service" and o["spec"].get("type") == "LoadBalancer"]
    assert [s["metadata"]["name"] for s in public] == ["gateway"]
    assert sorted(p["port"] for p in public[0]["spec"]["ports"]) == [80, 443]
    assert public[0]["spec"]["selector"]["app.kubernetes.io/name"] == "gateway"


PROXY_PEER = {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "gateway", "app.kubernetes.io/part-of": "gpugate"}}}
PROMETHEUS_PODS = {
    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
    "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus", "app.kubernetes.io/managed-by": "prometheus-operator"}},
}


def _selects(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, selector  # no matchExpressions to evaluate here
    return all(labels.get(k) == v for k, v in (selector.get("matchLabels") or {}).items())


def test_network_policies_deny_by_default_and_let_only_the_proxy_and_prometheus_pods_reach_vllm(prod_objects):
    vllm = find(prod_objects, "Deployment", "vllm")
    labels, namespace = vllm["spec"]["template"]["metadata"]["labels"], vllm["metadata"]["namespace"]
    policies = [o for o in prod_objects.values() if o["kind"] == "NetworkPolicy" and o["metadata"]["namespace"] == namespace]
    # every policy that selects the vLLM pods, and every peer each lets in
    on_vllm = [p for p in policies if _selects(p["spec"]["podSelector"], labels)]
    assert {p["metadata"]["name"] for p in on_vllm} == {"default-deny-ingress", "vllm-from-gateway"}
    peers = []
    for policy in on_vllm:
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        for rule in policy["spec"]["ingress"]:
            assert rule.get("from"), f"{policy['metadata']['name']}: a rule without `from` admits every source"
            assert rule["ports"] == [{"port": 18000, "protocol": "TCP"}]
            peers += rule["from"]
    # only the proxy pods of the namespace and the Prometheus pods of `monitoring`, never the whole namespace
    assert peers == [PROXY_PEER, PROMETHEUS_PODS]
    assert not any(set(peer) == {"namespaceSelector"} for p in policies for r in p["spec"]["ingress"] for peer in r.get("from", []))


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


@pytest.mark.e2e
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


@pytest.mark.e2e
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
    # and Caddy itself accepts it, loading a stand-in for the certificate cert-manager's Secret provides
    from gpugate.validate import stand_in_certificate

    cert, key = stand_in_certificate(tmp_path)
    path = tmp_path / "Caddyfile"
    path.write_text(text.replace("tls /etc/gpugate/tls/tls.crt /etc/gpugate/tls/tls.key", f"tls {cert} {key}"))
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
    # but not the certificates or the Caddyfile (limits-auth: the shared limits store's password, its own)
    assert {m["name"] for m in authz["volumeMounts"]} == {"runtime-env", "keys", "logs", "limits-auth"}


def test_prometheus_scrapes_only_ready_vllm_pods_so_a_replica_still_loading_never_pages(prod_objects):
    [endpoint] = find(prod_objects, "ServiceMonitor", "vllm")["spec"]["endpoints"]
    keep, job = endpoint["relabelings"]
    assert keep == {"sourceLabels": ["__meta_kubernetes_endpoint_ready"], "regex": "true", "action": "keep"}
    assert job == {"targetLabel": "job", "replacement": "vllm", "action": "replace"}


# ---- sizing against node allocatable -------------------------------------------------------------


def _kube_variant(tmp_path: Path, **kube_changes):
    from tests.conftest import edit_stack

    def change(config: dict) -> None:
        kube = config["gpugate:kubernetes"]
        for key, value in kube_changes.items():
            kube[key] = value
        if kube["provider"] == "eks":
            kube["images"]["device_plugin"] = "nvcr.io/nvidia/k8s-device-plugin@sha256:" + "d" * 64
            kube["images"]["cluster_autoscaler"] = "registry.k8s.io/autoscaling/cluster-autoscaler@sha256:" + "e" * 64
            config["gpugate:region"] = "us-east-1"

    return load_stack(edit_stack("prod", tmp_path / "Pulumi.variant.yaml", change))


def test_the_kubelet_reservations_follow_the_eks_and_gke_formulas():
    from gpugate.kubernetes.allocatable import allocatable

    # EKS g6.xlarge: 4 vCPU, 16 GiB, 58 pods: 16384 - (255 + 11 x 58) - 100 MiB; 4000 - (60 + 10 + 2 x 5) m
    assert allocatable("g6.xlarge").model_dump() == {"cpu_m": 3920, "memory_mib": 16384 - 893 - 100}
    # GKE g2-standard-8: 8 vCPU, 32 GiB: 25% of 4 + 20% of 4 + 10% of 8 + 6% of 16 GiB = 3.56 GiB, then 100 MiB
    assert allocatable("g2-standard-8").model_dump() == {"cpu_m": 8000 - 90, "memory_mib": 32768 - round(3.56 * 1024) - 100}


def test_validate_refuses_a_vllm_pod_larger_than_the_gke_machine_and_names_the_machines_that_fit(tmp_path):
    from gpugate.validate import node_fit_verdicts

    # given prod on GKE with its GPU nodes pinned to g2-standard-4 (4 vCPU / 16 GiB)
    stack = _kube_variant(tmp_path, gpu_machine_type="g2-standard-4")
    # when validate sizes the pods against the pools
    verdicts = {v.file: v for v in node_fit_verdicts(stack)}
    # then vLLM's pod is refused with its request, the node's allocatable and the machines that hold it
    vllm = verdicts["kubernetes/gpugate/deployment-vllm.yaml"]
    assert not vllm.ok and vllm.tool == "node allocatable"
    assert "requests 4 CPU / 23.00 GiB" in vllm.detail
    assert "one g2-standard-4 node has 3.92 CPU / 13.30 GiB allocatable" in vllm.detail
    assert "machine types that fit: g2-standard-8, g2-standard-12, g2-standard-16, g2-standard-32" in vllm.detail
    assert verdicts["kubernetes/gpugate/deployment-gateway.yaml"].ok


def test_gpugate_validate_exits_1_and_prints_the_misfit_of_the_vllm_pod(tmp_path):
    from tests.conftest import run_gpugate

    # given prod with its GPU nodes pinned to a machine too small for the vLLM pod
    stack = _kube_variant(tmp_path, gpu_machine_type="g2-standard-4")
    # when the operator validates it
    result = run_gpugate("validate", "--stack", str(stack.path))
    # then validation fails on that pod, with the figures and the machines that would hold it
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    assert "FAIL  variant    kubernetes/gpugate/deployment-vllm.yaml  node allocatable" in result.stdout
    assert "one g2-standard-4 node has 3.92 CPU / 13.30 GiB allocatable: it cannot be scheduled" in result.stdout


def test_validate_accepts_prod_whose_pods_fit_the_gke_machines(tmp_path):
    from gpugate.validate import node_fit_verdicts

    verdicts = node_fit_verdicts(load_stack("prod"))
    files = [v.file.rsplit("/", 1)[1] for v in verdicts]
    assert files == ["deployment-gateway.yaml", "deployment-gpugate-limits.yaml", "deployment-vllm.yaml"]
    assert all(v.ok for v in verdicts), [v.detail for v in verdicts]
    assert "g2-standard-8 node has 7.91 CPU / 28.34 GiB allocatable: fits" in verdicts[files.index("deployment-vllm.yaml")].detail


def test_the_node_exporter_the_program_installs_is_counted_on_every_pool_and_not_when_the_cluster_brings_its_own(tmp_path):
    from gpugate.kubernetes import objects, pod_build
    from gpugate.kubernetes.allocatable import node_fits

    stack = load_stack("prod")
    with_exporter = {f.pod: f.daemons for f in node_fits(stack.spec, objects(pod_build(stack)))}
    without = _kube_variant(tmp_path, install_addons=False)
    bare = {f.pod: f.daemons for f in node_fits(without.spec, objects(pod_build(without)))}
    assert {pod: (with_exporter[pod].cpu_m - bare[pod].cpu_m, with_exporter[pod].memory_mib - bare[pod].memory_mib) for pod in bare} == {
        "gateway": (50, 64),
        "gpugate-limits": (50, 64),
        "vllm": (50, 64),
    }


def test_an_existing_cluster_is_sized_only_when_it_names_its_gpu_machine(tmp_path):
    from gpugate.kubernetes import objects, pod_build
    from gpugate.kubernetes.allocatable import node_fits

    # without a machine type nothing can be said about the GPU nodes
    unnamed = _kube_variant(tmp_path, provider="existing", cert_issuer="letsencrypt")
    assert node_fits(unnamed.spec, objects(pod_build(unnamed))) == []
    # with one, the EKS formula of its cloud applies
    named = _kube_variant(tmp_path, provider="existing", cert_issuer="letsencrypt", gpu_machine_type="g6.xlarge")
    [fit] = node_fits(named.spec, objects(pod_build(named)))
    assert not fit.fits and "g6.xlarge node has 3.92 CPU / 14.68 GiB" not in fit.message
    assert "g6.xlarge node has 3.92 CPU / 15.03 GiB allocatable" in fit.message and "g6.2xlarge" in fit.fitting


def test_a_gpu_machine_of_another_gpu_set_is_refused_with_the_ones_allowed(tmp_path):
    from gpugate.stackfile import SpecError

    expected = r"kubernetes.gpu_machine_type = .g6.xlarge.: .*not a gke machine with 1 x L4; allowed: g2-standard-4, g2-standard-8,"
    with pytest.raises(SpecError, match=expected):
        _kube_variant(tmp_path, gpu_machine_type="g6.xlarge")


# ---- the vLLM pod's uid, HOME, caches and Hugging Face token ---------------------------------------

CACHE_VARIABLES = ("HOME", "XDG_CACHE_HOME", "XDG_CONFIG_HOME", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "CUDA_CACHE_PATH")


def _vllm_container(objects: dict) -> dict:
    return pod_spec(find(objects, "Deployment", "vllm"))["containers"][0]


def test_vllm_home_and_every_compile_cache_are_on_a_writable_volume_of_its_pod(prod_objects):
    pod = pod_spec(find(prod_objects, "Deployment", "vllm"))
    container = pod["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    empty_dirs = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"] if not m.get("readOnly")}
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    checked = []
    for variable in CACHE_VARIABLES:
        on = [path for path in mounts if env[variable] == path or env[variable].startswith(path + "/")]
        assert on and mounts[on[0]] in empty_dirs, (variable, env[variable])
        checked.append(variable)
    assert checked == list(CACHE_VARIABLES)
    # getpass reads these before it asks getpwuid(), which fails for a uid the image does not list
    assert env["USER"] == env["LOGNAME"] == "vllm"


@pytest.mark.e2e
def test_vllm_and_pytorch_find_a_user_name_and_writable_caches_with_no_passwd_entry_for_the_pod_uid(prod_objects, tmp_path, vllm_python):
    python = vllm_python
    home = tmp_path / "home"
    env = {e["name"]: e["value"] for e in _vllm_container(prod_objects)["env"] if e["name"] in (*CACHE_VARIABLES, "USER", "LOGNAME")}
    env = {k: v.replace("/home/vllm", str(home)) for k, v in env.items()}
    probe = (
        "import json, os, pwd\n"
        "def no_entry(uid):\n"
        "    raise KeyError(f'getpwuid(): uid not found: {uid}')\n"
        "pwd.getpwuid = no_entry  # the vLLM image has no passwd entry for the pod's uid\n"
        "import getpass\n"
        "from torch._inductor.runtime.cache_dir_utils import cache_dir, triton_cache_dir\n"
        "import vllm.envs as envs\n"
        "print(json.dumps({'user': getpass.getuser(), 'home': os.path.expanduser('~'), 'inductor': cache_dir(),\n"
        "    'triton': triton_cache_dir(0), 'vllm_cache': envs.VLLM_CACHE_ROOT, 'vllm_config': envs.VLLM_CONFIG_ROOT}))\n"
    )
    # given the pod's environment, with the image's missing passwd entry
    base = {"PATH": "/usr/bin:/bin"}
    result = subprocess.run([str(python), "-c", probe], env={**base, **env}, capture_output=True, text=True, timeout=120)
    # then a user name is found and vLLM, PyTorch and Triton all keep their caches in the writable HOME
    assert result.returncode == 0, result.stderr[-2000:]
    import json

    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found.pop("user") == "vllm"
    assert all(path.startswith(str(home)) for path in found.values()), found
    assert (home / ".cache" / "torchinductor").is_dir()
    # and without the pod's variables, the same image fails on the first getpass.getuser()
    bare = subprocess.run([str(python), "-c", probe], env=base, capture_output=True, text=True, timeout=120)
    assert bare.returncode != 0 and "uid not found" in bare.stderr


def test_no_hugging_face_token_reaches_vllm_unless_the_stack_holds_one(prod_objects, tmp_path):
    from gpugate.kubernetes import objects, pod_build
    from tests.conftest import edit_stack

    # prod holds no hf_token: no Secret for it, no HF_TOKEN in the pod
    assert "HF_TOKEN" not in {e["name"] for e in _vllm_container(prod_objects)["env"]}
    assert not any(o["kind"] == "Secret" and o["metadata"]["name"] == "gpugate-hf-token" for o in prod_objects.values())

    # a stack that holds one: HF_TOKEN comes from the Secret, which renders a placeholder only
    def with_token(config: dict) -> None:
        config["gpugate:hf_token"] = {"secure": "v1:AAAAencryptedbypulumi"}

    stack = load_stack(edit_stack("prod", tmp_path / "Pulumi.token.yaml", with_token))
    built = {(o["kind"], o["metadata"]["name"]): o for o in objects(pod_build(stack))}
    env = {e["name"]: e for e in pod_spec(built[("Deployment", "vllm")])["containers"][0]["env"]}
    assert env["HF_TOKEN"] == {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "gpugate-hf-token", "key": "token"}}}
    assert built[("Secret", "gpugate-hf-token")]["stringData"] == {"token": PLACEHOLDER}

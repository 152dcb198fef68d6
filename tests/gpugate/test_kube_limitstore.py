"""The Kubernetes shared limits store (gpugate/kubernetes/limitstore.py): one Redis every proxy replica's authz uses."""

from __future__ import annotations

from pathlib import Path

import pytest
from gpugate_runtime.settings import AuthzSettings, load_settings
from ruamel.yaml import YAML

from gpugate.kubernetes.objects import LIMITS, LIMITS_PORT, PLACEHOLDER, SECRET_LIMITS
from gpugate.stackfile import load_stack
from gpugate.targets import render_bundle
from tests.gpugate.test_kube import find, pod_spec


@pytest.fixture(scope="module")
def prod_objects() -> dict[str, dict]:
    bundle = render_bundle(load_stack("prod"))
    yaml = YAML(typ="safe", pure=True)
    return {path: yaml.load(data) for path, data in bundle.files.items() if path.startswith("kubernetes/")}


def test_every_proxy_replicas_authz_uses_the_store_service_with_a_password_file_from_its_secret(prod_objects, tmp_path: Path) -> None:
    # given the proxy pod's env file and its authz container
    env = tmp_path / "gpugate.env"
    env.write_text(find(prod_objects, "ConfigMap", "gpugate-runtime-env")["data"]["gpugate.env"])
    authz = load_settings(AuthzSettings, env)
    gateway = pod_spec(find(prod_objects, "Deployment", "gateway"))
    container = next(c for c in gateway["containers"] if c["name"] == "authz")
    volumes = {v["name"]: v for v in gateway["volumes"]}
    mount = next(m for m in container["volumeMounts"] if m["name"] == "limits-auth")
    # then authz reaches the store's Service by name, reads the password where the Secret's item is mounted,
    # and follows the router's log in the log volume (its own log is stdout)
    assert authz.redis_url == f"redis://{LIMITS}.gpugate.svc.cluster.local:{LIMITS_PORT}/0"
    assert authz.redis_password_file == Path(mount["mountPath"]) / volumes["limits-auth"]["secret"]["items"][0]["path"]
    assert volumes["limits-auth"]["secret"]["secretName"] == SECRET_LIMITS and mount["readOnly"]
    assert str(authz.route_log_path) == "/var/log/gpugate/route.log"
    # and the password is nowhere in plain text: the Secret is a placeholder until pulumi up
    secret = find(prod_objects, "Secret", SECRET_LIMITS)
    assert set(secret["stringData"].values()) == {PLACEHOLDER}


def test_only_proxy_pods_reach_the_store_and_only_on_its_port(prod_objects) -> None:
    policy = find(prod_objects, "NetworkPolicy", LIMITS)["spec"]
    assert policy["podSelector"]["matchLabels"]["app.kubernetes.io/name"] == LIMITS and policy["policyTypes"] == ["Ingress"]
    (rule,) = policy["ingress"]
    assert rule["from"] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "gateway", "app.kubernetes.io/part-of": "gpugate"}}}]
    assert rule["ports"] == [{"port": LIMITS_PORT, "protocol": "TCP"}]
    service = find(prod_objects, "Service", LIMITS)["spec"]
    assert service["type"] == "ClusterIP"


def test_the_store_runs_the_runtime_image_non_root_with_its_password_from_a_file_and_spend_on_a_volume(prod_objects) -> None:
    deployment = find(prod_objects, "Deployment", LIMITS)
    spec = pod_spec(deployment)
    (container,) = spec["containers"]
    gateway = pod_spec(find(prod_objects, "Deployment", "gateway"))
    runtime_image = next(c["image"] for c in gateway["containers"] if c["name"] == "authz")
    # no third-party image: the runtime image carries Debian's redis-server
    assert container["image"] == runtime_image and container["command"][0] == "redis-server"
    # the password only in the config file the Secret mounts (never argv or env)
    assert "--requirepass" not in container["command"] and "env" not in container
    assert container["command"][1].startswith("/etc/gpugate/limits/")
    # spend survives a restart: append-only file on the claimed volume; one writer at a time
    args = container["command"]
    assert args[args.index("--appendonly") + 1] == "yes" and args[args.index("--dir") + 1] == "/var/lib/gpugate/limits"
    claim = next(v for v in spec["volumes"] if v["name"] == "data")["persistentVolumeClaim"]["claimName"]
    assert find(prod_objects, "PersistentVolumeClaim", claim)["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"] == {"type": "Recreate"}
    context = container["securityContext"]
    assert context["runAsNonRoot"] and context["readOnlyRootFilesystem"] and context["capabilities"] == {"drop": ["ALL"]}
    assert spec["automountServiceAccountToken"] is False

"""The proxy component: Caddy + authz + prober pods behind the LoadBalancer, their config and certificates.

The pod's containers are the service table's `in_proxy_pod` services (gpugate_runtime/contract/services.py):
the same argv, users and ports a VM's units run, with Kubernetes' own ways of handing over secrets,
configuration and probes.
"""

from __future__ import annotations

import hashlib
from typing import Any

from gpugate_runtime.contract.host import LOOPBACK, VM_RUNTIME_PYTHON, Ports
from gpugate_runtime.contract.services import (
    GID_GATEWAY,
    UIDS,
    USER_CADDY,
    HostFacts,
    Service,
    by_name,
    services,
)
from gpugate_runtime.settings import ENV_FILE_VAR

from gpugate.kubernetes.build import Build
from gpugate.kubernetes.limitstore import limits_url
from gpugate.kubernetes.objects import (
    CADDY_CONFIG,
    CADDYFILE_PATH,
    ENDPOINT_PROPAGATION_SECONDS,
    ENV_FILE_PATH,
    GATEWAY,
    GATEWAY_METRICS,
    JOB_LABEL,
    KEY_STORE_FILE,
    KEYS_DIR,
    LAYOUT,
    LIMITS_AUTH_DIR,
    LIMITS_PASSWORD_ITEM,
    POOL_LABEL,
    PROBER_KEY_ITEM,
    PROMETHEUS_PEER,
    RELOAD_ANNOTATION,
    RUNTIME_ENV,
    SECRET_INTERNAL,
    SECRET_KEYS,
    SECRET_LIMITS,
    SYSTEM_POOL,
    TLS_DIR,
    TLS_FILES,
    TLS_SECRET,
    UPSTREAM_REFRESH,
    VLLM,
    VLLM_KEY_ITEM,
    disruption_budget,
    exec_http_probe,
    labels,
    meta,
    network_policy,
    resources,
    restricted,
    selector,
    tcp,
)
from gpugate.render.caddy import Upstream, caddyfile, metrics_site
from gpugate.render.settings import env_file, runtime_settings, settings_env
from gpugate.spec import GatewaySpec, KubernetesSpec

# Requests and limits of each container (cpu request, memory request, cpu limit, memory limit).
CONTAINER_RESOURCES = {
    "caddy": ("500m", "256Mi", "2", "512Mi"),
    "authz": ("250m", "128Mi", "1", "256Mi"),
    "prober": ("100m", "96Mi", "500m", "192Mi"),
}
# Which Secret item carries each credential a proxy service reads.
CREDENTIAL_ITEMS = {"vllm_api_key": (SECRET_INTERNAL, VLLM_KEY_ITEM), "prober_api_key": (SECRET_INTERNAL, PROBER_KEY_ITEM)}


def vllm_host(kube: KubernetesSpec) -> str:
    """vLLM's headless Service: its DNS name resolves to every ready vLLM pod."""
    return f"{VLLM}.{kube.namespace}.svc.cluster.local"


def pod_facts(spec: GatewaySpec) -> HostFacts:
    """The proxy pod as a host of the service table: the VM's layout and runtime venv (the images install
    both there), Caddy's metrics on the pod address for Prometheus, vLLM elsewhere."""
    return HostFacts(
        layout=LAYOUT,
        ports=Ports(spec.ports.internal_base),
        runtime_python=VM_RUNTIME_PYTHON,
        https_port=spec.ports.https,
        http_port=spec.ports.http,
        public_address="",
        vllm=None,
        metrics_address="",
    )


def pod_services(spec: GatewaySpec) -> tuple[Service, ...]:
    return tuple(s for s in services(pod_facts(spec)) if s.in_proxy_pod)


def metrics_route(service: Service) -> str:
    """The path Caddy's metrics site serves a loopback service's /metrics under, for Prometheus."""
    return f"/{service.name}/metrics"


def pod_caddyfile(spec: GatewaySpec, header: str) -> str:
    """The Caddyfile the proxy pods run: vLLM is every ready pod behind a headless Service (resolved every
    UPSTREAM_REFRESH, least busy first, a leaving pod retried for 5 s), and the metrics site listens on
    the pod address and also serves authz's and the prober's loopback /metrics."""
    assert spec.kubernetes is not None
    ports = Ports(spec.ports.internal_base)
    table = pod_services(spec)
    routes = tuple(
        (metrics_route(s), f"{LOOPBACK}:{s.port}") for s in table if s.name != "caddy" and s.metrics_path is not None
    )
    upstream = Upstream(vllm_host(spec.kubernetes), ports.vllm, dynamic=True, refresh=UPSTREAM_REFRESH)
    # tls acme: the certificate cert-manager issued (gpugate/kubernetes/certificates.py), the same in every replica.
    files = tuple(str(f) for f in TLS_FILES) if spec.tls.mode == "acme" else None
    return caddyfile(
        spec, ports, LAYOUT, header, upstream, metrics_site(by_name(table)["caddy"], routes), tls_files=files
    ).decode()


def pod_settings(spec: GatewaySpec) -> dict[str, str]:
    """The runtime services' environment in the proxy pod, built and checked with their own settings models."""
    assert spec.kubernetes is not None
    ports = Ports(spec.ports.internal_base)
    return settings_env(
        runtime_settings(
            spec,
            ports,
            key_store=KEYS_DIR / KEY_STORE_FILE,
            # Decisions go to the container log (rotated by the kubelet); Caddy's access log is a file authz tails.
            authz_log="/dev/stdout",
            access_log=LAYOUT.access_log,
            vllm_health_url=f"http://{vllm_host(spec.kubernetes)}:{ports.vllm}/health",
            prober_key_file=LAYOUT.secrets / PROBER_KEY_ITEM,
            ca_file=None,
            expect_gpu=False,  # the prober runs beside the proxy; GPU metrics come from the DCGM exporter
            alert_log=LAYOUT.alert_log,
            # The router's log is a file in the pod's log volume (authz's own goes to stdout).
            route_log=LAYOUT.route_log,
            # Every replica holds each key's limits and its family's spend in the one shared store.
            shared_limits=(limits_url(spec.kubernetes), LIMITS_AUTH_DIR / LIMITS_PASSWORD_ITEM),
        )
    )


def pod_env_file(spec: GatewaySpec, header: str) -> str:
    return env_file(pod_settings(spec), header, LAYOUT.secrets).decode()


def _config(b: Build) -> list[dict[str, Any]]:
    return [
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": meta(CADDY_CONFIG, b.ns, labels(GATEWAY, b.stack)),
            "data": {CADDYFILE_PATH.name: pod_caddyfile(b.spec, b.header)},
        },
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": meta(RUNTIME_ENV, b.ns, labels(GATEWAY, b.stack)),
            "data": {ENV_FILE_PATH.name: pod_env_file(b.spec, b.header)},
        },
    ]


def _mounts(service: Service, tls: bool) -> list[dict[str, Any]]:
    """What a container mounts: the configuration it reads, the secrets it reads as files, where it writes
    (`tls`: Caddy reads the issued certificate from TLS_SECRET)."""
    storage = str(LAYOUT.caddy_storage)
    mounts: list[dict[str, Any]] = []
    if "caddy/" in service.reads:
        mounts.append({"name": "caddyfile", "mountPath": str(CADDYFILE_PATH.parent), "readOnly": True})
    if service.env_file:
        mounts.append({"name": "runtime-env", "mountPath": str(ENV_FILE_PATH.parent), "readOnly": True})
    if any(c.env is None for c in service.credentials):
        mounts.append({"name": "internal", "mountPath": str(LAYOUT.secrets), "readOnly": True})
    if service.name == "authz":
        # A projected Secret updates by swapping a symlink: authz's reload sees a new inode.
        mounts.append({"name": "keys", "mountPath": str(KEYS_DIR), "readOnly": True})
        mounts.append({"name": "limits-auth", "mountPath": str(LIMITS_AUTH_DIR), "readOnly": True})
    if LAYOUT.caddy_storage in service.writes:
        mounts.append({"name": "caddy-state", "mountPath": storage})
        if tls:
            mounts.append({"name": "tls", "mountPath": str(TLS_DIR), "readOnly": True})
        mounts += [
            {"name": "caddy-home", "mountPath": "/config", "subPath": "config"},
            {"name": "caddy-home", "mountPath": "/data", "subPath": "data"},
        ]
    if any(log.parent == LAYOUT.logs for log in service.logs):
        mounts.append({"name": "logs", "mountPath": str(LAYOUT.logs)})
    return mounts


def container(service: Service, b: Build) -> dict[str, Any]:
    """One proxy-pod container from the service table."""
    images = b.kube.images
    env: list[dict[str, Any]] = []
    for credential in service.credentials:
        if credential.env is not None:
            name, item = CREDENTIAL_ITEMS[credential.name]
            env.append({"name": credential.env, "valueFrom": {"secretKeyRef": {"name": name, "key": item}}})
    if service.env_file:
        env.append({"name": ENV_FILE_VAR, "value": str(ENV_FILE_PATH)})
    if service.user == USER_CADDY:
        env += [{"name": "XDG_CONFIG_HOME", "value": "/config"}, {"name": "XDG_DATA_HOME", "value": "/data"}]
    # Go runtime settings (see CADDY_GO_ENV): also keeps Go from sizing itself to the node's cores.
    env += [{"name": name, "value": value} for name, value in service.env.items()]
    out: dict[str, Any] = {
        "name": service.name,
        "image": images.caddy if service.user == USER_CADDY else images.runtime,
        "command": list(service.argv),
    }
    exposed = [listen for listen in service.listens if listen.address != LOOPBACK]
    if exposed:
        out["ports"] = [{"name": listen.name, "containerPort": listen.port, "protocol": "TCP"} for listen in exposed]
    if env:
        out["env"] = env
    out["resources"] = resources(*CONTAINER_RESOURCES[service.name])
    if exposed and service.health is not None:
        probe = {"httpGet": {"path": service.health.path, "port": exposed[0].name}}
        out["readinessProbe"] = {**probe, "periodSeconds": 5}
        out["livenessProbe"] = {**probe, "periodSeconds": 15, "failureThreshold": 4}
    elif service.health_url is not None:
        # Listens on the pod's loopback only: the kubelet probes the pod address, so probe from inside.
        probe = {"exec": {"command": exec_http_probe(service.health_url)}}
        out["readinessProbe"] = {**probe, "periodSeconds": 10}
        out["livenessProbe"] = {**probe, "periodSeconds": 20, "failureThreshold": 3}
    if service.name == "caddy":
        # Let the load balancer and kube-proxy stop sending new connections before Caddy stops
        # accepting; Caddy then waits for its open streams, within the grace period.
        out["lifecycle"] = {"preStop": {"exec": {"command": ["sleep", str(ENDPOINT_PROPAGATION_SECONDS)]}}}
    uid = UIDS[service.user]
    out["securityContext"] = {**restricted(), "runAsUser": uid, "runAsGroup": GID_GATEWAY}
    out["volumeMounts"] = _mounts(service, tls=b.spec.tls.mode == "acme")
    return out


def _gateway_deployment(b: Build) -> dict[str, Any]:
    spec, kube = b.spec, b.kube
    tags = labels(GATEWAY, b.stack)
    checksum = hashlib.sha256((pod_caddyfile(spec, b.header) + pod_env_file(spec, b.header)).encode()).hexdigest()
    volumes: list[dict[str, Any]] = [
        {"name": "caddyfile", "configMap": {"name": CADDY_CONFIG}},
        {"name": "runtime-env", "configMap": {"name": RUNTIME_ENV}},
        {"name": "keys", "secret": {"secretName": SECRET_KEYS, "defaultMode": 0o440}},
        {
            "name": "limits-auth",
            "secret": {
                "secretName": SECRET_LIMITS,
                "items": [{"key": LIMITS_PASSWORD_ITEM, "path": LIMITS_PASSWORD_ITEM}],
                "defaultMode": 0o440,
            },
        },
        {
            "name": "internal",
            "secret": {"secretName": SECRET_INTERNAL, "items": [{"key": PROBER_KEY_ITEM, "path": PROBER_KEY_ITEM}], "defaultMode": 0o440},
        },
        {"name": "caddy-state", "emptyDir": {"sizeLimit": "64Mi"}},
        {"name": "caddy-home", "emptyDir": {"sizeLimit": "64Mi"}},
        # Caddy's access log rolls at 100 MiB and keeps 10; authz follows it.
        {"name": "logs", "emptyDir": {"sizeLimit": "2Gi"}},
    ]
    extra: dict[str, Any] = {}
    if spec.tls.mode == "acme":
        # Until cert-manager has issued it the pods wait (ContainerCreating); a renewal rolls them (Reloader).
        volumes.append({"name": "tls", "secret": {"secretName": TLS_SECRET, "defaultMode": 0o440}})
        extra["annotations"] = {RELOAD_ANNOTATION: TLS_SECRET}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": meta(GATEWAY, b.ns, tags, **extra),
        "spec": {
            "replicas": kube.proxy_replicas,
            "selector": {"matchLabels": selector(GATEWAY)},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {
                # A new Caddyfile or env file rolls the pods.
                "metadata": {"labels": tags, "annotations": {"gpugate.dev/config-sha256": checksum}},
                "spec": {
                    "serviceAccountName": GATEWAY,
                    "automountServiceAccountToken": False,
                    "nodeSelector": {POOL_LABEL: SYSTEM_POOL},
                    "topologySpreadConstraints": [
                        {
                            "maxSkew": 1,
                            "topologyKey": "kubernetes.io/hostname",
                            "whenUnsatisfiable": "ScheduleAnyway",
                            "labelSelector": {"matchLabels": selector(GATEWAY)},
                        }
                    ],
                    # Streams pass through Caddy: it may take as long to drain as vLLM.
                    "terminationGracePeriodSeconds": kube.autoscaling.drain_seconds + 30,
                    "securityContext": {
                        "runAsNonRoot": True,
                        # Every container shares the gateway group: authz reads Caddy's access log through it.
                        "fsGroup": GID_GATEWAY,
                        "seccompProfile": {"type": "RuntimeDefault"},
                        # Caddy binds 80 and 443 without root or capabilities.
                        "sysctls": [{"name": "net.ipv4.ip_unprivileged_port_start", "value": "0"}],
                    },
                    "containers": [container(service, b) for service in pod_services(spec)],
                    "volumes": volumes,
                },
            },
        },
    }


def _services(b: Build) -> list[dict[str, Any]]:
    ports = b.ports
    public_spec: dict[str, Any] = {
        "type": "LoadBalancer",
        # Client addresses reach Caddy's logs and the per-key limits; only nodes with a proxy pod serve.
        "externalTrafficPolicy": "Local",
        # One client address keeps to one proxy replica (per-key limits are shared by every replica through
        # the limits store, limitstore.py; affinity keeps a client's connections warm on one Caddy).
        "sessionAffinity": "ClientIP",
        "selector": selector(GATEWAY),
        "ports": [
            {"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"},
            {"name": "https", "port": 443, "targetPort": "https", "protocol": "TCP"},
        ],
    }
    if b.facts.load_balancer_ip is not None:
        public_spec["loadBalancerIP"] = b.facts.load_balancer_ip
    public_meta = meta(GATEWAY, b.ns, labels(GATEWAY, b.stack))
    if b.facts.service_annotations:
        public_meta["annotations"] = dict(b.facts.service_annotations)
    return [
        {"apiVersion": "v1", "kind": "Service", "metadata": public_meta, "spec": public_spec},
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": meta(GATEWAY_METRICS, b.ns, {**labels(GATEWAY, b.stack), JOB_LABEL: "caddy"}),
            "spec": {
                "type": "ClusterIP",
                "selector": selector(GATEWAY),
                "ports": [{"name": "metrics", "port": ports.caddy_metrics, "targetPort": "metrics", "protocol": "TCP"}],
            },
        },
    ]


def objects(b: Build) -> list[dict[str, Any]]:
    """Every object of the proxy component."""
    return [
        *_config(b),
        _gateway_deployment(b),
        *_services(b),
        disruption_budget(GATEWAY, b.ns, b.stack),
        network_policy(
            "gateway-public",
            b.ns,
            b.stack,
            {"matchLabels": selector(GATEWAY)},
            [
                {"ports": [tcp(b.spec.ports.http), tcp(b.spec.ports.https)]},
                {"from": [PROMETHEUS_PEER], "ports": [tcp(b.ports.caddy_metrics)]},
            ],
        ),
    ]


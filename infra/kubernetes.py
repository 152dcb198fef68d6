"""KubernetesGateway: the gateway as pods on a GKE, EKS or existing cluster, from the same objects `gpugate render` writes."""

from __future__ import annotations

import hashlib
import importlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pulumi
import pulumi_kubernetes as k8s
import pulumi_random as random
from gpugate_runtime.keys import ID_HEX, TOKEN_PREFIX, KeyRecord, KeyStore, token_digest

from gpugate.kubernetes import objects, pod_build
from gpugate.kubernetes.build import Build, ClusterFacts
from gpugate.kubernetes.objects import (
    ALERT_ITEM,
    CERT_MANAGER_NAMESPACE,
    HF_TOKEN_ITEM,
    LIMITS_CONF_ITEM,
    LIMITS_PASSWORD_ITEM,
    HF_TOKEN_SECRET,
    GATEWAY,
    KEDA_NAMESPACE,
    KEY_STORE_FILE,
    MONITORING_NAMESPACE,
    NODE_EXPORTER_RESOURCES,
    POOL_LABEL,
    PROBER_KEY_ITEM,
    RELOADER_NAMESPACE,
    SECRET_ALERT,
    SECRET_HF,
    SECRET_INTERNAL,
    SECRET_KEYS,
    SECRET_LIMITS,
    SYSTEM_POOL,
    VLLM,
    VLLM_KEY_ITEM,
)
from gpugate.render.bundle import Bundle
from gpugate.spec import GatewaySpec, Target
from gpugate.stackfile import NAMESPACE, Stack
from infra.network import public_url
from infra.secrets import VLLM_KEY_LENGTH, host_secrets

TYPE_TOKEN = "gpugate:kubernetes:Gateway"
EXISTING_TYPE_TOKEN = "gpugate:kubernetes:ExistingCluster"
OUTPUTS = ("url", "cluster_name", "namespace", "kubeconfig", "load_balancer_address", "bundle_sha256")
PROBER_KEY_NAME = "prober"
# Addons the objects need, pinned. kube-prometheus-stack 69.x ships prometheus-operator 0.80, the
# version whose CRD models `gpugate validate` checks ServiceMonitors and PrometheusRules against.
KEDA_CHART = ("keda", "2.16.1", "https://kedacore.github.io/charts")
PROMETHEUS_CHART = ("kube-prometheus-stack", "69.8.0", "https://prometheus-community.github.io/helm-charts")
# cert-manager 1.17, the version whose CRD models `gpugate validate` checks Certificates and ClusterIssuers against;
# Reloader rolls the proxy pods when cert-manager renews their certificate's Secret.
CERT_MANAGER_CHART = ("cert-manager", "v1.17.1", "https://charts.jetstack.io")
RELOADER_CHART = ("reloader", "2.2.9", "https://stakater.github.io/stakater-charts")
# Kinds served by the addons' CRDs: created after the addons.
ADDON_GROUPS = ("keda.sh", "monitoring.coreos.com", "cert-manager.io")
# Top-level fields of an object, as the typed resources name them.
SNAKE = {"stringData": "string_data", "automountServiceAccountToken": "automount_service_account_token", "roleRef": "role_ref"}


@dataclass(frozen=True)
class KubernetesGatewayArgs:
    spec: GatewaySpec
    stack: Stack
    bundle_sha256: str

    @classmethod
    def from_bundle(cls, stack: Stack, bundle: Bundle) -> KubernetesGatewayArgs:
        if stack.spec.target is not Target.KUBERNETES or stack.spec.kubernetes is None:
            raise ValueError(f"stack {stack.name} targets {stack.spec.target}, not kubernetes")
        return cls(spec=stack.spec, stack=stack, bundle_sha256=bundle.bundle_sha256)


class ExistingCluster(pulumi.ComponentResource):
    """A cluster someone else runs, reached with the kubeconfig in the `gpugate:kubeconfig` config secret."""

    def __init__(self, name: str, spec: GatewaySpec, stack: str, opts: pulumi.ResourceOptions | None = None):
        super().__init__(EXISTING_TYPE_TOKEN, name, None, opts)
        assert spec.kubernetes is not None
        config = pulumi.Config(NAMESPACE)
        kubeconfig = config.get_secret("kubeconfig")
        if kubeconfig is None:
            raise ValueError(
                f"provider existing needs the cluster's kubeconfig: pulumi config set --secret {NAMESPACE}:kubeconfig "
                f"\"$(cat kubeconfig.yaml)\" -s {stack}"
            )
        self.kubeconfig = pulumi.Output.secret(kubeconfig)
        self.cluster_name = pulumi.Output.from_input(spec.kubernetes.cluster_name or "existing")
        self.facts = ClusterFacts("existing")
        self.provider = k8s.Provider(f"{name}-k8s", kubeconfig=self.kubeconfig, opts=pulumi.ResourceOptions(parent=self))
        self.load_balancer_address = pulumi.Output.from_input("")  # known once the Service exists
        self.register_outputs({"cluster_name": self.cluster_name})


def cluster_for(name: str, spec: GatewaySpec, stack: str, parent: pulumi.Resource) -> Any:
    """The cluster component of the spec's provider: GKE, EKS, or an existing cluster."""
    assert spec.kubernetes is not None
    opts = pulumi.ResourceOptions(parent=parent)
    if spec.kubernetes.provider == "gke":
        from infra.gke import GkeCluster  # noqa: PLC0415 - load one cloud's SDK only

        return GkeCluster(f"{name}-gke", spec, stack, opts)
    if spec.kubernetes.provider == "eks":
        from infra.eks import EksCluster  # noqa: PLC0415

        return EksCluster(f"{name}-eks", spec, stack, opts)
    return ExistingCluster(f"{name}-existing", spec, stack, opts)


def prober_store(password: str, expires_days: int, now: datetime) -> tuple[str, str]:
    """(the prober's client key, a key store holding only its hash), from a generated password.

    A key is `ggk_<12 hex>_<64 hex>`: both parts are derived from the password (its entropy is
    above the 256 bits of a key made by `keys create`), so the key is as strong and stays stable."""
    digest = hashlib.sha256(password.encode()).hexdigest()
    key_id = hashlib.sha256(f"id:{password}".encode()).hexdigest()[:ID_HEX]
    token = f"{TOKEN_PREFIX}_{key_id}_{digest}"
    record = KeyRecord(
        id=key_id,
        name=PROBER_KEY_NAME,
        sha256=token_digest(token),
        created_at=now,
        expires_at=now + timedelta(days=expires_days),
    )
    return token, KeyStore(keys=(record,)).model_dump_json(indent=2) + "\n"


def resource(obj: dict[str, Any], opts: pulumi.ResourceOptions) -> pulumi.CustomResource:
    """One object as its typed pulumi-kubernetes resource (CRD kinds as CustomResource)."""
    obj = dict(obj)
    api_version, kind = obj.pop("apiVersion"), obj.pop("kind")
    meta = obj["metadata"]
    name = f"{meta.get('namespace', 'cluster')}-{kind.lower()}-{meta['name']}"
    group, _, version = api_version.rpartition("/")
    if group in ADDON_GROUPS:
        return k8s.apiextensions.CustomResource(name, api_version, kind, metadata=meta, spec=obj.get("spec"), opts=opts)
    module = {"": "core", "apps": "apps", "policy": "policy", "networking.k8s.io": "networking", "rbac.authorization.k8s.io": "rbac"}[group]
    cls = getattr(importlib.import_module(f"pulumi_kubernetes.{module}.{version}"), kind)
    return cls(name, opts=opts, **{SNAKE.get(key, key): value for key, value in obj.items()})


class KubernetesGateway(pulumi.ComponentResource):
    """The cluster (or the existing one), its addons, and every object of gpugate/kubernetes/."""

    url: pulumi.Output[str]
    cluster_name: pulumi.Output[str]
    namespace: pulumi.Output[str]
    kubeconfig: pulumi.Output[str]  # secret
    load_balancer_address: pulumi.Output[str]
    bundle_sha256: pulumi.Output[str]
    vllm_api_key: pulumi.Output[str]  # secret
    prober_api_key: pulumi.Output[str]  # secret

    OUTPUTS = OUTPUTS

    def __init__(self, name: str, args: KubernetesGatewayArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__(TYPE_TOKEN, name, None, opts)
        spec, stack = args.spec, args.stack
        kube = spec.kubernetes
        assert kube is not None
        cluster = cluster_for(name, spec, stack.name, self)
        on_cluster = pulumi.ResourceOptions(parent=self, provider=cluster.provider)

        # Secrets: the internal vLLM key and the alert credential as on a VM; the prober's client key
        # generated here, with a key store holding its hash that operators extend afterwards.
        host = {s.name: s.value for s in host_secrets(spec, name, self)}
        self.vllm_api_key = host["vllm_api_key"]
        password = random.RandomPassword(
            f"{name}-prober-key", length=VLLM_KEY_LENGTH, special=False, opts=pulumi.ResourceOptions(parent=self)
        ).result
        now = datetime.now(UTC).replace(microsecond=0)
        pair = password.apply(lambda p: prober_store(p, spec.limits.expires_days, now))
        self.prober_api_key = pulumi.Output.secret(pair.apply(lambda p: p[0]))
        # The shared limits store's password: authz reads it as a file, Redis as `requirepass` in its config.
        limits_password = random.RandomPassword(
            f"{name}-limits-password", length=VLLM_KEY_LENGTH, special=False, opts=pulumi.ResourceOptions(parent=self)
        ).result
        secrets: dict[str, dict[str, Any]] = {
            SECRET_INTERNAL: {VLLM_KEY_ITEM: self.vllm_api_key, PROBER_KEY_ITEM: self.prober_api_key},
            SECRET_KEYS: {KEY_STORE_FILE: pulumi.Output.secret(pair.apply(lambda p: p[1]))},
            SECRET_LIMITS: {
                LIMITS_PASSWORD_ITEM: pulumi.Output.secret(limits_password),
                LIMITS_CONF_ITEM: pulumi.Output.secret(limits_password.apply(lambda p: f"requirepass {p}\n")),
            },
        }
        if "alert_credential" in host:
            secrets[SECRET_ALERT] = {ALERT_ITEM: host["alert_credential"]}
        hf_token = pulumi.Config(NAMESPACE).get_secret(HF_TOKEN_SECRET)
        if hf_token is not None:  # gated models; vLLM reads HF_TOKEN
            secrets[SECRET_HF] = {HF_TOKEN_ITEM: pulumi.Output.secret(hf_token)}

        addons = self._addons(name, kube.install_addons, kube.prometheus_release, cluster.facts, on_cluster)
        build: Build = pod_build(stack, facts=cluster.facts, secrets=secrets)
        created: dict[tuple[str, str], pulumi.CustomResource] = {}
        namespaces: list[pulumi.Resource] = []
        for obj in objects(build):
            kind, meta = obj["kind"], obj["metadata"]
            depends: list[pulumi.Resource] = list(namespaces)
            if obj["apiVersion"].split("/")[0] in ADDON_GROUPS or meta.get("namespace") == MONITORING_NAMESPACE:
                depends += addons
            if kind == "Deployment" and meta["name"] == GATEWAY:
                # its pods mount the Secret cert-manager writes for the Certificate
                depends += [res for (k, _), res in created.items() if k == "Certificate"]
            ignore: list[str] = []
            if kind == "Deployment" and meta["name"] == VLLM:
                ignore.append("spec.replicas")  # KEDA's to decide after creation
            if kind == "Secret" and meta["name"] == SECRET_KEYS:
                ignore += ["stringData", "data"]  # operators' keys from then on (runbook: rotate a key)
            res = resource(
                obj,
                pulumi.ResourceOptions.merge(
                    on_cluster, pulumi.ResourceOptions(depends_on=depends, ignore_changes=ignore or None)
                ),
            )
            created[(kind, meta["name"])] = res
            if kind == "Namespace":
                namespaces.append(res)

        service = created[("Service", GATEWAY)]
        if kube.provider == "existing":
            status = service.status  # type: ignore[attr-defined]
            cluster.load_balancer_address = status.apply(_ingress_address)
        self.url = pulumi.Output.from_input(public_url(spec))
        self.cluster_name = cluster.cluster_name
        self.namespace = pulumi.Output.from_input(kube.namespace)
        self.kubeconfig = pulumi.Output.secret(cluster.kubeconfig)
        self.load_balancer_address = cluster.load_balancer_address
        self.bundle_sha256 = pulumi.Output.from_input(args.bundle_sha256)
        self.register_outputs({name: getattr(self, name) for name in OUTPUTS})

    def _addons(
        self, name: str, install: bool, release: str, facts: ClusterFacts, opts: pulumi.ResourceOptions
    ) -> list[pulumi.Resource]:
        """KEDA, kube-prometheus-stack, cert-manager and Reloader, pinned, on the system pool; none when the cluster
        already runs them."""
        if not install:
            return []
        system = {POOL_LABEL: SYSTEM_POOL}

        def chart(resource: str, chart: tuple[str, str, str], namespace: str, values: dict, release: str) -> pulumi.Resource:
            """One pinned chart (name, version, repository) as a Helm release in its own namespace."""
            return k8s.helm.v3.Release(
                f"{name}-{resource}",
                name=release,
                chart=chart[0],
                version=chart[1],
                repository_opts=k8s.helm.v3.RepositoryOptsArgs(repo=chart[2]),
                namespace=namespace,
                create_namespace=True,
                values=values,
                opts=opts,
            )

        keda = chart("keda", KEDA_CHART, KEDA_NAMESPACE, {"nodeSelector": system}, release="keda")
        prometheus_values = {
            "prometheusOperator": {"nodeSelector": system},
            "prometheus": {"prometheusSpec": {"nodeSelector": system, "retention": "15d"}},
            "alertmanager": {
                "alertmanagerSpec": {
                    "nodeSelector": system,
                    # Pick up the gateway's AlertmanagerConfig, labelled like its rules and monitors.
                    "alertmanagerConfigSelector": {"matchLabels": {"release": release}},
                    # The gateway's alerts aggregate away the namespace label: route them all.
                    "alertmanagerConfigMatcherStrategy": {"type": "None"},
                }
            },
            "grafana": {"nodeSelector": system, "sidecar": {"dashboards": {"enabled": True, "label": "grafana_dashboard"}}},
            # On every node, GPU nodes too: requests the pools' sizing counts (gpugate/kubernetes/allocatable.py).
            "prometheus-node-exporter": {"resources": NODE_EXPORTER_RESOURCES},
        }
        prometheus = chart("kube-prometheus-stack", PROMETHEUS_CHART, MONITORING_NAMESPACE, prometheus_values, release=release)
        cert_manager_values = {
            "crds": {"enabled": True},
            "nodeSelector": system,
            "webhook": {"nodeSelector": system},
            "cainjector": {"nodeSelector": system},
            "startupapicheck": {"nodeSelector": system},
            # The cloud identity DNS-01 is solved with (Workload Identity on GKE, IRSA on EKS).
            "serviceAccount": {"annotations": dict(facts.cert_manager_annotations)},
        }
        cert_manager = chart(
            "cert-manager", CERT_MANAGER_CHART, CERT_MANAGER_NAMESPACE, cert_manager_values, release="cert-manager"
        )
        reloader_values = {"reloader": {"deployment": {"nodeSelector": system}}}
        reloader = chart("reloader", RELOADER_CHART, RELOADER_NAMESPACE, reloader_values, release="reloader")
        return [keda, prometheus, cert_manager, reloader]


def _ingress_address(status: Any) -> str:
    """The LoadBalancer's address from a Service's status: an IP (most clouds) or a host name (AWS)."""
    ingress = getattr(getattr(status, "load_balancer", None), "ingress", None) or []
    return (ingress[0].ip or ingress[0].hostname or "") if ingress else ""

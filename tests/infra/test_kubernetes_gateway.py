"""The Kubernetes target (prod on GKE; EKS and an existing cluster as variants): what the Pulumi program asks for, under mocks."""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from typing import Any

import pulumi
import pytest

from gpugate.cli.plan import plan
from gpugate.plan.inventory import SECRET_SIG, SECRET_SIG_KEY
from infra.policy.evaluate import plain_secrets
from gpugate.stackfile import NAMESPACE, Stack, load_stack
from infra.kubernetes import TYPE_TOKEN, KubernetesGateway, KubernetesGatewayArgs, prober_store
from infra.offline import HF_TOKEN_CANARY, Recorded, Run, record, use_mocks
from infra.program import gateway, stack_outputs
from gpugate.targets import render_bundle
from gpugate_runtime.keys import KeyStore, TOKEN_RE, token_digest
from tests.conftest import pin_images
from tests.infra.conftest import of_type, one
from tests.infra.test_policy import broken_rules, changed

GKE_POOL = "gcp:container/nodePool:NodePool"
EKS_GROUP = "aws:eks/nodeGroup:NodeGroup"
DEPLOYMENT = "kubernetes:apps/v1:Deployment"
SERVICE = "kubernetes:core/v1:Service"
SECRET = "kubernetes:core/v1:Secret"


@pytest.fixture(scope="module")
def prod() -> Run:
    return record(load_stack("prod"))


def eks_variant(config: dict[str, Any]) -> None:
    kube = config["gpugate:kubernetes"]
    kube["provider"] = "eks"
    kube["images"]["device_plugin"] = "nvcr.io/nvidia/k8s-device-plugin@sha256:" + "d" * 64
    kube["images"]["cluster_autoscaler"] = "registry.k8s.io/autoscaling/cluster-autoscaler@sha256:" + "e" * 64
    pin_images(config)  # every image, the device plugin's too, pinned: images-pinned refuses placeholders
    config["gpugate:region"] = "us-east-1"
    config["gpugate:dns_zone"] = "gpugate.example.com"


@pytest.fixture(scope="module")
def eks(tmp_path_factory) -> Run:
    from tests.conftest import edit_stack

    return record(load_stack(edit_stack("prod", tmp_path_factory.mktemp("eks") / "Pulumi.prodeks.yaml", eks_variant)))


def named(run: Run, type_token: str, part: str) -> Recorded:
    return next(r for r in of_type(run, type_token) if part in r.name)


def is_secret(wire: Any) -> bool:
    return isinstance(wire, dict) and wire.get(SECRET_SIG_KEY) == SECRET_SIG


def test_prod_is_one_gateway_component_whose_resources_are_all_its_children(prod):
    component = one(prod, TYPE_TOKEN)
    assert component.name == "gpugate-prod"
    # the cluster is the gateway's child, and every cloud resource the cluster's
    cluster = one(prod, "gpugate:gke:Cluster")
    assert f"{TYPE_TOKEN}$gpugate:gke:Cluster" in cluster.urn
    parents = (f"{TYPE_TOKEN}$", "gpugate:gke:Cluster$")
    children = [r for r in prod.resources if r.type not in ("pulumi:pulumi:Stack", TYPE_TOKEN)]
    assert all(any(p in r.urn for p in parents) for r in children), [r.urn for r in children if TYPE_TOKEN not in r.urn]
    assert all(f"{TYPE_TOKEN}$" in r.urn for r in children if r.type.startswith("kubernetes:"))


def test_the_gke_gpu_pool_has_the_spec_gpu_type_the_gpu_taint_and_scales_with_the_replicas(prod):
    pool = named(prod, GKE_POOL, "-gpu").props
    config = pool["nodeConfig"]
    assert config["machineType"] == "g2-standard-8"
    assert config["guestAccelerators"] == [
        {"type": "nvidia-l4", "count": 1, "gpuDriverInstallationConfig": {"gpuDriverVersion": "LATEST"}}
    ]
    assert config["taints"] == [{"key": "nvidia.com/gpu", "value": "present", "effect": "NO_SCHEDULE"}]
    assert config["labels"] == {"gpugate.dev/pool": "gpu"}
    # replicas 2..8, plus one node for a rolling update's surge pod
    assert (pool["autoscaling"]["totalMinNodeCount"], pool["autoscaling"]["totalMaxNodeCount"]) == (2, 9)
    system = named(prod, GKE_POOL, "-system").props["nodeConfig"]
    assert "taints" not in system and system["labels"] == {"gpugate.dev/pool": "system"}


def test_the_cluster_enforces_network_policies_and_its_api_answers_the_admin_network_only(prod):
    cluster = one(prod, "gcp:container/cluster:Cluster").props
    assert cluster["datapathProvider"] == "ADVANCED_DATAPATH"
    assert cluster["masterAuthorizedNetworksConfig"]["cidrBlocks"] == [
        {"cidrBlock": "203.0.113.0/24", "displayName": "gpugate admin network"}
    ]



def test_gke_takes_its_version_from_the_release_channel_with_no_pinned_master_version(prod):
    cluster = one(prod, "gcp:container/cluster:Cluster").props
    assert cluster["releaseChannel"] == {"channel": "REGULAR"}
    assert "minMasterVersion" not in cluster
    pools = of_type(prod, GKE_POOL)
    assert len(pools) == 2 and not any("version" in pool.props for pool in pools)


def test_gke_refuses_a_cluster_whose_channel_runs_another_minor_than_the_one_the_objects_are_validated_against(monkeypatch):
    from infra.offline import PlanMocks

    # given GKE's REGULAR channel now runs 1.33 while prod's objects are validated against kubernetes.version 1.30
    monkeypatch.setattr(PlanMocks, "gke_channel_version", lambda self: "1.33.5-gke.1080000")
    stack = load_stack("prod")
    # then the program stops before creating the cluster, naming both and what to change
    with pytest.raises(ValueError, match=r'kubernetes.version: 1.30 is not the minor GKE.s REGULAR channel runs now \(1.33.5-gke.1080000\); set kubernetes.version: "1.33"'):
        _under_mocks(stack, lambda: gateway(stack).url)


def test_the_vllm_deployment_the_program_applies_requests_gpus_and_tolerates_the_taint(prod):
    vllm = named(prod, DEPLOYMENT, "deployment-vllm")
    pod = vllm.props["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule", "operator": "Equal"} in pod["tolerations"]
    assert pod["containers"][0]["startupProbe"]["httpGet"]["path"] == "/health"
    # KEDA owns the replica count once the Deployment exists
    assert vllm.ignore_changes == ("spec.replicas",)


def test_the_only_public_service_opens_80_and_443_on_the_reserved_address_that_dns_points_at(prod):
    public = [s for s in of_type(prod, SERVICE) if s.props["spec"].get("type") == "LoadBalancer"]
    assert len(public) == 1
    spec = public[0].props["spec"]
    assert sorted(p["port"] for p in spec["ports"]) == [80, 443]
    address = prod.outputs["load_balancer_address"][0]
    assert spec["loadBalancerIP"] == address
    assert one(prod, "gcp:dns/recordSet:RecordSet").props["rrdatas"] == [address]


def test_network_policies_and_disruption_budgets_are_applied(prod):
    policies = {r.props["metadata"]["name"] for r in of_type(prod, "kubernetes:networking.k8s.io/v1:NetworkPolicy")}
    assert policies == {"default-deny-ingress", "gateway-public", "vllm-from-gateway", "gpugate-limits"}
    budgets = {r.props["metadata"]["name"] for r in of_type(prod, "kubernetes:policy/v1:PodDisruptionBudget")}
    assert budgets == {"vllm", "gateway"}


def test_the_autoscaler_targets_vllm_queue_depth_and_waits_for_keda(prod):
    scaled = one(prod, "kubernetes:keda.sh/v1alpha1:ScaledObject")
    trigger = scaled.props["spec"]["triggers"][0]
    assert "vllm:num_requests_waiting" in trigger["metadata"]["query"]
    assert scaled.props["spec"]["maxReplicaCount"] == 8
    releases = {r.props["chart"] for r in of_type(prod, "kubernetes:helm.sh/v3:Release")}
    assert releases == {"keda", "kube-prometheus-stack", "cert-manager", "reloader"}


def test_the_alert_rules_are_the_stack_rules_as_a_prometheus_rule(prod):
    from gpugate.render.alerts import rule_groups

    rule = one(prod, "kubernetes:monitoring.coreos.com/v1:PrometheusRule")
    assert rule.props["spec"] == rule_groups(load_stack("prod").spec)
    assert rule.props["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_every_secret_the_program_derives_is_a_pulumi_secret(prod):
    # Kubernetes Secrets carry their data as Pulumi secrets
    for secret in of_type(prod, SECRET):
        data = secret.wire["stringData"]
        assert is_secret(data) or all(is_secret(v) for v in data.values()), secret.name
    # the stack outputs: the kubeconfig is secret, the rest plain
    secret_outputs = {name for name, (_, secret) in prod.outputs.items() if secret}
    assert secret_outputs == {"kubeconfig"}
    # and no canary (the generated vLLM key, the alert credential) appears anywhere in plain text
    assert plain_secrets(prod).violations == []


def test_the_component_key_outputs_are_secret():
    stack = load_stack("prod")

    def check():
        component = gateway(stack)
        return pulumi.Output.all(
            component.vllm_api_key.is_secret(), component.prober_api_key.is_secret(), component.kubeconfig.is_secret()
        ).apply(lambda flags: _all_true(flags))

    _under_mocks(stack, check)


def _all_true(flags: list[bool]) -> None:
    assert flags == [True, True, True]


def test_the_seeded_key_store_holds_only_the_hash_of_a_well_formed_prober_key():
    from datetime import UTC, datetime

    token, text = prober_store("p" * 48, 90, datetime(2026, 1, 1, tzinfo=UTC))
    assert TOKEN_RE.match(token)
    store = KeyStore.model_validate_json(text)
    [record_] = store.keys
    assert record_.name == "prober" and record_.sha256 == token_digest(token) and token not in text
    assert (record_.expires_at - record_.created_at).days == 90


def test_the_eks_variant_runs_gpu_nodes_on_the_nvidia_ami_with_the_device_plugin_and_an_nlb_on_elastic_ips(eks):
    group = named(eks, EKS_GROUP, "-gpu").props
    assert group["amiType"] == "AL2023_x86_64_NVIDIA" and group["instanceTypes"] == ["g6.xlarge"]
    assert group["taints"] == [{"key": "nvidia.com/gpu", "value": "present", "effect": "NO_SCHEDULE"}]
    assert (group["scalingConfig"]["minSize"], group["scalingConfig"]["maxSize"]) == (2, 9)
    plugin = [d for d in of_type(eks, "kubernetes:apps/v1:DaemonSet") if "nvidia-device-plugin" in d.name]
    assert len(plugin) == 1
    public = next(s for s in of_type(eks, SERVICE) if s.props["spec"].get("type") == "LoadBalancer")
    annotations = public.props["metadata"]["annotations"]
    assert annotations["service.beta.kubernetes.io/aws-load-balancer-type"] == "nlb"
    assert annotations["service.beta.kubernetes.io/aws-load-balancer-eip-allocations"].count("eipalloc-") == 2
    cluster = one(eks, "aws:eks/cluster:Cluster").props["vpcConfig"]
    assert cluster["publicAccessCidrs"] == ["203.0.113.0/24"]
    # certificates come from cert-manager: no shared file system
    assert not [r for r in eks.resources if r.type.startswith("aws:efs/") or r.type.endswith(":StorageClass")]


def test_on_eks_a_vllm_pod_larger_than_a_g6_xlarge_fails_the_plan_naming_its_request_the_allocatable_and_the_machines_that_fit(tmp_path):
    from rich.console import Console

    from tests.conftest import edit_stack

    # given prod moved to EKS as it is: one L4 per replica, the catalog's g6.xlarge (4 vCPU / 16 GiB)
    report = plan(load_stack(edit_stack("prod", tmp_path / "Pulumi.prodeks.yaml", eks_variant)))
    # then the plan is refused although every policy passes
    assert report.violations == [] and not report.ok
    vllm = next(f for f in report.node_fits if f.pod == "vllm")
    assert not vllm.fits and vllm.machine_type == "g6.xlarge"
    console = Console(record=True, width=400)
    console.print(report.to_table())
    text = console.export_text()
    assert (
        "FAIL nodes: the vllm pod requests 4 CPU / 23.00 GiB and the gpu pool's DaemonSets 0.5 CPU / 0.88 GiB; one "
        "g6.xlarge node has 3.92 CPU / 15.03 GiB allocatable: it cannot be scheduled; machine types that fit: g6.2xlarge"
    ) in text
    assert "plan failed" in text and "plan ok" not in text


def eks_fitting_variant(config: dict[str, Any]) -> None:
    eks_variant(config)
    config["gpugate:gpu"]["count"] = 4  # g6.12xlarge: 48 vCPU / 192 GiB


def test_an_eks_gpu_pool_whose_machine_holds_the_pod_passes_and_its_plan_prices_min_and_max(tmp_path):
    from tests.conftest import edit_stack

    report = plan(load_stack(edit_stack("prod", tmp_path / "Pulumi.prodeks.yaml", eks_fitting_variant)))
    assert report.violations == [] and report.ok
    assert [(f.pod, f.machine_type, f.fits) for f in report.node_fits] == [
        ("gateway", "m6i.large", True),
        ("gpugate-limits", "m6i.large", True),
        ("vllm", "g6.12xlarge", True),
        ("cluster-autoscaler", "m6i.large", True),
    ]
    assert report.cost.monthly_usd < report.cost_at_max.monthly_usd
    assert any("g6.12xlarge x 8" in line.item for line in report.cost_at_max.lines)


def test_on_eks_one_l4_per_replica_plans_ok_on_the_larger_l4_machine_the_stack_names(tmp_path):
    from tests.conftest import edit_stack

    def larger(config: dict[str, Any]) -> None:
        eks_variant(config)
        config["gpugate:kubernetes"]["gpu_machine_type"] = "g6.2xlarge"  # the fit the refused plan names

    # the policy pack admits the catalog's larger machine with the same GPU, and the pod fits it
    report = plan(load_stack(edit_stack("prod", tmp_path / "Pulumi.prodeks.yaml", larger)))
    assert report.violations == [] and report.ok
    assert ("vllm", "g6.2xlarge", True) in [(f.pod, f.machine_type, f.fits) for f in report.node_fits]


def _under_mocks(stack: Stack, body: Callable[[], Any], config: dict[str, str] | None = None) -> Run:
    run = Run()

    def go() -> None:
        use_mocks(stack, run)
        for key, value in (config or {}).items():
            pulumi.runtime.set_config(key, value)
        pulumi.runtime.test(body)()

    contextvars.Context().run(go)
    return run


def test_an_existing_cluster_is_reached_with_the_kubeconfig_secret_and_nothing_cloud_is_created(stack_copy):
    def existing(config: dict[str, Any]) -> None:
        config["gpugate:kubernetes"]["provider"] = "existing"
        config["gpugate:kubernetes"]["cert_issuer"] = "letsencrypt-prod"

    stack = load_stack(stack_copy("prod", existing, name="onprem"))
    kubeconfig = "apiVersion: v1\nkind: Config\n# planted-kubeconfig-canary\n"

    def body():
        outputs = stack_outputs(gateway(stack))
        return pulumi.Output.all(outputs["kubeconfig"].is_secret(), outputs["cluster_name"])

    run = _under_mocks(stack, body, {f"{NAMESPACE}:kubeconfig": kubeconfig})
    assert not [r for r in run.resources if r.type.startswith(("gcp:", "aws:"))]
    provider = one(run, "pulumi:providers:kubernetes")
    assert is_secret(provider.wire["kubeconfig"])
    # the cluster's own ClusterIssuer issues the certificate; the program renders none
    certificate = one(run, "kubernetes:cert-manager.io/v1:Certificate").props["spec"]
    assert certificate["issuerRef"] == {"group": "cert-manager.io", "kind": "ClusterIssuer", "name": "letsencrypt-prod"}
    assert not of_type(run, "kubernetes:cert-manager.io/v1:ClusterIssuer")
    claims = {r.props["metadata"]["name"]: r.props["spec"] for r in of_type(run, "kubernetes:core/v1:PersistentVolumeClaim")}
    assert list(claims) == ["gpugate-limits-data"]  # no certificate volume any more
    assert "storageClassName" not in claims["gpugate-limits-data"]  # the cluster's default class


def test_an_existing_cluster_without_a_kubeconfig_is_refused_with_the_command_to_set_it(stack_copy):
    def existing(config: dict[str, Any]) -> None:
        config["gpugate:kubernetes"]["provider"] = "existing"
        config["gpugate:kubernetes"]["cert_issuer"] = "letsencrypt-prod"

    stack = load_stack(stack_copy("prod", existing, name="onprem"))
    with pytest.raises(ValueError, match="pulumi config set --secret gpugate:kubeconfig"):
        _under_mocks(stack, lambda: gateway(stack).url)


# ---- the policy pack over the Kubernetes resources: each bad variant is caught ---------------------


def test_a_load_balancer_service_that_opens_ssh_is_caught_by_both_ingress_rules_and_the_exposure_rule(tmp_path):
    from tests.conftest import edit_stack

    stack = load_stack(edit_stack("prod", tmp_path / "Pulumi.prod.yaml", pin_images))

    def build(s: Stack) -> KubernetesGateway:
        component = KubernetesGateway(f"gpugate-{s.name}", KubernetesGatewayArgs.from_bundle(s, render_bundle(s)))
        import pulumi_kubernetes as k8s

        k8s.core.v1.Service(
            "debug-ssh",
            metadata={"name": "debug-ssh", "namespace": "gpugate"},
            spec={"type": "LoadBalancer", "ports": [{"port": 22, "protocol": "TCP"}], "selector": {"app": "debug"}},
            opts=pulumi.ResourceOptions(parent=component),
        )
        return component

    report = plan(stack, build=build)
    assert not report.ok
    assert {(v.policy, v.resource) for v in report.violations} == {
        ("web-only-from-world", "debug-ssh"),
        ("no-world-ssh", "debug-ssh"),
        ("kubernetes-web-only-exposed", "debug-ssh"),
    }


def test_a_gpu_pool_without_the_taint_or_of_an_unmapped_machine_is_caught(prod):
    pool = named(prod, GKE_POOL, "-gpu")
    untainted = changed(pool, lambda w: w["nodeConfig"].pop("taints"))
    assert list(broken_rules(untainted)) == ["gpu-pools-tainted"]
    unmapped = changed(pool, lambda w: w["nodeConfig"].__setitem__("machineType", "n1-standard-8"))
    assert list(broken_rules(unmapped)) == ["mapped-gpu-machines"]


def test_a_literal_key_in_a_pod_environment_or_a_config_map_is_caught(prod):
    vllm = named(prod, DEPLOYMENT, "deployment-vllm")

    def literal(wire: dict) -> None:
        env = wire["spec"]["template"]["spec"]["containers"][0]["env"]
        env[0] = {"name": "VLLM_API_KEY", "value": "sk-literal"}

    assert "VLLM_API_KEY as a literal" in broken_rules(changed(vllm, literal))["kubernetes-secrets"][0]
    config_map = named(prod, "kubernetes:core/v1:ConfigMap", "runtime-env")
    leaked = changed(config_map, lambda w: w["data"].__setitem__("api_key", "sk-literal"))
    assert list(broken_rules(leaked)) == ["kubernetes-secrets"]


def test_a_secret_whose_data_is_not_a_pulumi_secret_is_caught_in_the_plan(prod):
    secret = named(prod, SECRET, "gpugate-internal")

    def plain(wire: dict) -> None:
        data = wire["stringData"]
        wire["stringData"] = data["value"] if is_secret(data) else {k: v.get("value", v) for k, v in data.items()}

    assert "is not a Pulumi secret" in broken_rules(changed(secret, plain))["kubernetes-secrets"][0]


def test_a_cluster_api_open_to_the_world_is_caught(prod, eks):
    cluster = one(prod, "gcp:container/cluster:Cluster")
    world = changed(
        cluster, lambda w: w["masterAuthorizedNetworksConfig"].__setitem__("cidrBlocks", [{"cidrBlock": "0.0.0.0/0"}])
    )
    assert list(broken_rules(world)) == ["cluster-api-not-public"]
    eks_cluster = one(eks, "aws:eks/cluster:Cluster")
    default_open = changed(eks_cluster, lambda w: w["vpcConfig"].pop("publicAccessCidrs"))
    assert list(broken_rules(default_open)) == ["cluster-api-not-public"]


def test_kube_prometheus_stack_selects_the_gateway_rules_monitors_and_alert_routing_by_its_release_label(prod):
    release = named(prod, "kubernetes:helm.sh/v3:Release", "kube-prometheus-stack").props
    label = release["name"]
    spec = release["values"]["alertmanager"]["alertmanagerSpec"]
    assert spec["alertmanagerConfigSelector"] == {"matchLabels": {"release": label}}
    checked = {}
    for kind in ("PrometheusRule", "ServiceMonitor", "AlertmanagerConfig"):
        objects = [r for r in prod.resources if r.type.endswith(f":{kind}")]
        for obj in objects:
            assert obj.props["metadata"]["labels"]["release"] == label, obj.name
        checked[kind] = len(objects)
    # every kind is there to be selected (a kind the program stopped making would pass the loop unseen)
    assert all(count >= 1 for count in checked.values()), checked


def test_the_node_exporter_on_every_node_gets_the_requests_the_pool_sizing_counts(prod):
    from gpugate.kubernetes.objects import NODE_EXPORTER_RESOURCES

    release = named(prod, "kubernetes:helm.sh/v3:Release", "kube-prometheus-stack").props
    assert release["values"]["prometheus-node-exporter"]["resources"] == NODE_EXPORTER_RESOURCES
    assert NODE_EXPORTER_RESOURCES["requests"] == {"cpu": "50m", "memory": "64Mi"}


def gated_variant(config: dict[str, Any]) -> None:
    pin_images(config)
    config["gpugate:model"]["id"] = "meta-llama/Llama-3.1-8B-Instruct"
    config["gpugate:model"]["served_name"] = "llama-3.1-8b-instruct"


def with_hf_token(config: dict[str, Any]) -> None:
    gated_variant(config)
    config["gpugate:hf_token"] = {"secure": "v1:AAAAencryptedbypulumi"}


def test_a_gated_model_without_a_hugging_face_token_fails_the_plan_with_the_command_to_set_one(tmp_path):
    from tests.conftest import edit_stack

    report = plan(load_stack(edit_stack("prod", tmp_path / "Pulumi.gated.yaml", gated_variant)))
    assert not report.ok and report.violations == []
    assert report.errors == [
        "model.id: meta-llama/Llama-3.1-8B-Instruct is gated on Hugging Face and the stack holds no hf_token: vLLM could "
        "not download it; run `pulumi config set --secret gpugate:hf_token <token> -s gated` with a token of an account "
        "that accepted the model's terms"
    ]


def test_the_stack_hugging_face_token_reaches_vllm_as_hf_token_from_a_secret_and_the_plan_passes(tmp_path):
    from tests.conftest import edit_stack

    stack = load_stack(edit_stack("prod", tmp_path / "Pulumi.gated.yaml", with_hf_token))
    report = plan(stack)
    assert report.errors == [] and report.ok
    run = record(stack)
    secret = named(run, SECRET, "gpugate-hf-token")
    assert is_secret(secret.wire["stringData"]) or is_secret(secret.wire["stringData"]["token"])
    vllm = named(run, DEPLOYMENT, "deployment-vllm").props
    env = {e["name"]: e for e in vllm["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["HF_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "gpugate-hf-token", "key": "token"}}
    # and the token (a canary in the plan) appears in no plain input or output
    assert HF_TOKEN_CANARY in run.canaries and plain_secrets(run).violations == []

"""`gpugate plan --stack prod --json`: the Kubernetes stack planned offline, judged, sized per replica and priced at min and max."""

from __future__ import annotations

import json

import pytest

from gpugate.kubernetes.sizing import gpu_node_disk_gib
from gpugate.plan.cost import price_table
from gpugate.stackfile import load_stack
from tests.conftest import edit_stack, pin_images, run_gpugate


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    # when a user plans prod (its images pinned), with no cloud, no cluster and no Pulumi CLI
    stack = edit_stack("prod", tmp_path_factory.mktemp("pinned") / "Pulumi.prod.yaml", pin_images)
    result = run_gpugate("plan", "--stack", str(stack), "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def test_the_prod_plan_lists_the_cluster_its_node_pools_the_addons_and_the_workloads(report):
    assert report["planned"] and report["ok"] and report["target"] == "kubernetes"
    roles = {row["role"] for row in report["resources"]}
    assert {"cluster", "node-pool", "addon", "workload", "secret", "static-ip", "dns-record"} <= roles
    types = {row["type"] for row in report["resources"]}
    assert {
        "kubernetes:apps/v1:Deployment",
        "kubernetes:keda.sh/v1alpha1:ScaledObject",
        "kubernetes:networking.k8s.io/v1:NetworkPolicy",
        "gcp:container/nodePool:NodePool",
    } <= types


def test_the_prod_plan_runs_every_rule_of_the_policy_pack_and_all_pass(report):
    verdicts = {v["policy"]: v for v in report["policies"]}
    assert {"web-only-from-world", "mapped-gpu-machines", "gpu-pools-tainted", "kubernetes-secrets",
            "cluster-api-not-public", "secrets-stay-secret", "images-pinned"} <= set(verdicts)
    assert all(v["ok"] and v["checked"] > 30 for v in verdicts.values())
    assert report["outputs"]["kubeconfig"] == "[secret]"


def test_the_prod_plan_sizes_one_replica_from_its_kv_cache_and_the_fleet_at_min_and_max(report):
    capacity, scaling = report["capacity"], report["scaling"]
    assert capacity["fits"]
    # Qwen2.5-7B on one L4: 24 GiB x 0.9 - 14.19 GiB weights - 1 GiB = 6.41 GiB at 57,344 B per token
    assert capacity["kv_bytes_per_token"] == 2 * 28 * 4 * 128 * 2
    assert scaling["kv_tokens_per_replica"] == capacity["kv_tokens"] == 119_952
    assert (scaling["replicas_min"], scaling["replicas_max"], scaling["gpu_nodes_max"]) == (2, 8, 9)
    assert scaling["sequences_at_min"] == 2 * 64 and scaling["sequences_at_max"] == 8 * 64
    assert scaling["kv_tokens_at_max"] == 8 * 119_952


def test_the_month_at_max_costs_six_more_gpu_nodes_with_their_disks_than_the_month_at_min(report):
    low, high = report["cost"], report["cost_at_max"]
    assert low["monthly_usd"] and high["monthly_usd"] and not low["missing"]
    table = price_table()
    node = table["gcp"]["us-central1"]["machine"]["g2-standard-8"]["on_demand_hour"] * 730
    disk = table["gcp"]["us-central1"]["disk"]["pd-balanced"]["gb_month"] * gpu_node_disk_gib(load_stack("prod").spec)
    assert high["monthly_usd"] - low["monthly_usd"] == pytest.approx(6 * (node + disk), abs=0.05)
    items = " ".join(line["item"] for line in low["lines"])
    assert "control plane" in items and "g2-standard-8 x 2" in items
    # certificates come from cert-manager into a Secret: no Filestore instance (1 TiB minimum) to pay for
    assert "Filestore" not in items and "certificate" not in items


def test_the_scaling_page_carries_the_planner_own_figures():
    from gpugate.cli.plan import sizing_page
    from tests.conftest import REPO

    page = (REPO / "docs" / "scaling.md").read_text()
    block = page.split("<!-- sizing:begin -->\n", 1)[1].split("<!-- sizing:end -->", 1)[0]
    assert block == sizing_page(), "regenerate: python -c 'from gpugate.cli.plan import sizing_page; print(sizing_page())'"


def test_the_deploy_page_quotes_the_plan_monthly_totals_at_min_and_max(report):
    from tests.conftest import REPO

    page = (REPO / "docs" / "deploy-kubernetes.md").read_text()
    assert f"total {report['cost']['monthly_usd']:,.2f}" in page
    assert f"total {report['cost_at_max']['monthly_usd']:,.2f}" in page


def test_a_million_clients_take_many_clusters_of_at_most_500_replicas():
    from gpugate.plan.capacity import PLANNING_WORKLOAD, ReplicaThroughput
    from gpugate.plan.sizing import MAX_REPLICAS_PER_CLUSTER, fleet

    spec = load_stack("prod").spec
    one_replica = ReplicaThroughput(
        workload=PLANNING_WORKLOAD, streams=64, step_seconds=0.1, tokens_per_second_per_stream=10,
        decode_tokens_per_second=400, prefill_seconds=0.25, requests_per_second=1.5,
    )
    small = fleet(100, spec, one_replica, 600.0, 450.0)
    assert (small.replicas, small.clusters) == (2, 1)  # the stack's floor, not 100 / 64
    huge = fleet(1_000_000, spec, one_replica, 600.0, 450.0)
    assert huge.replicas == 15_625 and huge.clusters == -(-15_625 // MAX_REPLICAS_PER_CLUSTER) == 32
    assert huge.monthly_usd == 15_625 * 600 + 32 * 450

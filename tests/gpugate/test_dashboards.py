"""The per-stack Grafana dashboard: deterministic, a query on every panel, sound for Grafana as far as the SDK and promtool check."""

from __future__ import annotations

import copy
import json
import re

import pytest
import typer
from gpugate_runtime.contract import metrics as m
from typer.testing import CliRunner

from gpugate.render.dashboards import (
    DASHBOARD_DIR,
    dashboard_exprs,
    dashboard_files,
    dashboard_problems,
    dashboard_uid,
    executable,
    panel_queries,
    panels,
)
from gpugate.cli.dashboard import dashboard_command
from gpugate.render.bundle import MANIFEST
from gpugate.targets import render_bundle
from gpugate.stackfile import load_stack, stack_names
from gpugate.validate import check_dashboard
from tests.conftest import run_gpugate


def _dashboard(stack: str) -> dict:
    loaded = load_stack(stack)
    return json.loads(next(iter(dashboard_files(loaded.spec, loaded.name).values())))


def _panel(data: dict, title: str) -> dict:
    return next(p for p in data["panels"] if p.get("title") == title)


def test_a_fresh_process_renders_the_same_dashboard_bytes(tmp_path):
    # given the local stack rendered in this process
    expected = dashboard_files(load_stack("local").spec, "local")
    # when another process renders the bundle
    assert run_gpugate("render", "--stack", "local", "--out", str(tmp_path)).returncode == 0
    # then the dashboard file is byte-identical, sorted JSON, and listed in the manifest
    (path, data), = expected.items()
    assert path == f"{DASHBOARD_DIR}/gpugate-local.json"
    assert (tmp_path / path).read_bytes() == data
    assert data == (json.dumps(json.loads(data), indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()
    assert path in json.loads((tmp_path / MANIFEST).read_text())["files"]


def test_local_and_kubernetes_bundles_carry_the_dashboard_and_vm_bundles_do_not():
    # VM hosts run no Grafana: operators use `gpugate dashboard`; a cluster's Grafana loads it from a ConfigMap
    def carried(files: dict[str, bytes]) -> bool:
        return any(p.startswith(f"{DASHBOARD_DIR}/") or p.startswith("kubernetes/monitoring/configmap-gpugate-dashboard-") for p in files)

    stacks = {name: load_stack(name) for name in stack_names()}
    found = {name: carried(render_bundle(stack).files) for name, stack in stacks.items()}
    assert found == {name: stack.spec.target not in ("aws", "gcp") for name, stack in stacks.items()}
    assert {"local", "prod"} <= {n for n, f in found.items() if f} and {"dev", "staging", "smoke"} <= {n for n, f in found.items() if not f}


def test_each_stack_has_its_own_uid_and_title():
    dashboards = {name: _dashboard(name) for name in stack_names()}
    assert {d["uid"] for d in dashboards.values()} == {f"gpugate-{name}" for name in dashboards}
    for name, data in dashboards.items():
        assert name in data["title"] and f"stack:{name}" in data["tags"]


@pytest.mark.parametrize("name", ["a-stack-name-far-longer-than-grafana-allows", "eu.prod", "ÜberStack"])
def test_a_long_or_odd_stack_name_still_gets_a_distinct_uid_grafana_accepts(name):
    uid = dashboard_uid(name)
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,40}", uid), uid
    assert uid != dashboard_uid(name + "x")


@pytest.mark.parametrize("stack", ["local", "dev", "staging", "prod"])
def test_the_dashboard_passes_the_sdk_round_trip_and_the_schema_checks(stack):
    assert dashboard_problems(_dashboard(stack)) == []


@pytest.mark.parametrize("stack", ["local", "prod"])
def test_every_panel_has_a_query_and_panel_queries_lists_exactly_them(stack):
    data = _dashboard(stack)
    graphs = [p for p in data["panels"] if p["type"] != "row"]
    assert graphs and all(p.get("targets") and all(t["expr"].strip() for t in p["targets"]) for p in graphs)
    assert panel_queries(load_stack(stack).spec) == dashboard_exprs(data)
    assert len({p["title"] for p in graphs}) == len(graphs)  # titles name panels unambiguously


def test_every_signal_the_on_call_issue_asks_for_has_a_panel():
    queries = " ".join(expr for _, expr in panel_queries(load_stack("staging").spec))
    for metric in (
        m.CADDY_REQUEST_DURATION, m.CADDY_REQUEST_ERRORS, m.CADDY_REQUESTS,  # request rate, 5xx
        m.VLLM_E2E_LATENCY, m.VLLM_TTFT,  # latency and time to first token
        m.AUTHZ_DECISIONS,  # 401 / 429 by key
        m.VLLM_WAITING, m.VLLM_KV_USAGE, m.VLLM_PREEMPTIONS, m.GPU_MEMORY_USED,
        m.PROBE_SUCCESS, m.TLS_CERT_NOT_AFTER,
    ):
        assert metric in queries, metric
    for quantile in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({quantile}, sum by (le) (rate({m.VLLM_TTFT}_bucket" in queries
    by_key = [e for t, e in panel_queries(load_stack("staging").spec) if t in ("401 rate by key id", "429 rate by key id")]
    assert len(by_key) == 2 and all("by (key_id" in e for e in by_key)


def test_slo_lines_follow_the_stack_file(stack_copy):
    # given a stack whose p95 latency SLO and key rotation policy differ from the shipped ones
    def change(config):
        config["gpugate:slo"]["latency_p95_seconds"] = 7
        config["gpugate:limits"]["rotation_days"] = 30

    loaded = load_stack(str(stack_copy("local", change, name="slo")))
    data = json.loads(next(iter(dashboard_files(loaded.spec, loaded.name).values())))
    # then the dashed threshold lines sit at the new values
    steps = lambda title: [s["value"] for s in _panel(data, title)["fieldConfig"]["defaults"]["thresholds"]["steps"]]  # noqa: E731
    assert steps("End-to-end latency p50 / p95 / p99") == [None, 7]
    assert steps("Key age") == [None, 30]


def test_certificate_turns_red_where_its_alert_fires():
    def steps(stack: str) -> list:
        panel = _panel(_dashboard(stack), "Certificate days left")
        return [(s["value"], s["color"]) for s in panel["fieldConfig"]["defaults"]["thresholds"]["steps"]]

    assert steps("staging") == [(None, "red"), (load_stack("staging").spec.slo.cert_expiry_days, "green")]
    assert steps("local") == [(None, "red"), (2 / 24, "green")]  # internal CA: 12-hour certificates, alert at 2 hours


def _gpu_queries(stack: str) -> str:
    return " ".join(q.expr for p in panels(load_stack(stack).spec) if p.row == "GPU" for q in p.queries)


def test_gpu_memory_is_read_where_each_target_exports_it():
    assert m.GPU_MEMORY_USED in _gpu_queries("staging") and m.DCGM_FB_USED not in _gpu_queries("staging")  # NVML, prober
    assert m.DCGM_FB_USED in _gpu_queries("prod") and m.GPU_MEMORY_USED not in _gpu_queries("prod")  # DCGM exporter


def test_gpu_panels_say_so_when_the_stack_has_no_gpu():
    assert {p.no_value for p in panels(load_stack("local").spec) if p.row == "GPU"} == {"no GPU on this stack"}
    assert {p.no_value for p in panels(load_stack("staging").spec) if p.row == "GPU"} == {None}


def _broken(change) -> dict:
    data = copy.deepcopy(_dashboard("local"))
    change(data)
    return data


@pytest.mark.parametrize(
    ("what", "change", "says"),
    [
        ("wider than the grid", lambda d: d["panels"][1]["gridPos"].update(w=30), "does not fit the 24-column grid"),
        ("on top of another", lambda d: d["panels"][2]["gridPos"].update(x=4), "overlaps"),
        ("a field Grafana does not know", lambda d: d["panels"][1].update(colour="red"), "grafana-foundation-sdk reads it differently"),
        ("an unknown panel type", lambda d: d["panels"][1].update(type="sparkles"), "not one Grafana ships"),
        ("a panel without a query", lambda d: d["panels"][1].pop("targets"), "no query"),
        ("an empty query", lambda d: d["panels"][1]["targets"][0].update(expr=" "), "has no PromQL"),
        ("a fixed data source", lambda d: d["panels"][1].update(datasource={"type": "prometheus", "uid": "x"}), "is not the `datasource` variable"),
        ("no data source variable", lambda d: d.update(templating={"list": []}), "no `datasource` variable"),
        ("a uid Grafana refuses", lambda d: d.update(uid="x" * 41), "1-40 characters"),
        ("a repeated panel id", lambda d: d["panels"][2].update(id=d["panels"][1]["id"]), "id used twice"),
    ],
)
def test_the_schema_check_names_what_grafana_would_refuse(what, change, says):
    problems = dashboard_problems(_broken(change))
    assert any(says in p for p in problems), (what, problems)


def test_validation_fails_a_panel_query_promtool_cannot_parse(tmp_path):
    # given a dashboard whose first query lost a parenthesis
    path = tmp_path / "gpugate-local.json"
    path.write_text(json.dumps(_broken(lambda d: d["panels"][1]["targets"][0].update(expr="sum(rate(up[5m])"))))
    # when validated as `gpugate validate` does
    ok, detail = check_dashboard(path, tmp_path)
    # then promtool's parse error is the reason
    assert not ok and "unclosed left parenthesis" in detail


def test_gpugate_validate_checks_the_dashboard_with_promtool():
    result = run_gpugate("validate", "--stack", "local")
    assert result.returncode == 0, result.stdout + result.stderr
    line = next(line for line in result.stdout.splitlines() if f"{DASHBOARD_DIR}/gpugate-local.json" in line)
    assert line.startswith("PASS") and "promtool" in line


def _cli() -> typer.Typer:
    app = typer.Typer()
    app.command("dashboard")(dashboard_command)
    app.callback()(lambda: None)
    return app


def test_dashboard_command_writes_a_vm_stacks_dashboard_for_import(tmp_path):
    out = tmp_path / "staging.json"
    result = CliRunner().invoke(_cli(), ["dashboard", "--stack", "staging", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_bytes() == dashboard_files(load_stack("staging").spec, "staging")[f"{DASHBOARD_DIR}/gpugate-staging.json"]


def test_dashboard_command_lists_every_panel_query():
    result = CliRunner().invoke(_cli(), ["dashboard", "--stack", "local", "--queries"])
    assert result.exit_code == 0, result.output
    listed = [tuple(line.split("\t", 1)) for line in result.stdout.splitlines()]
    assert listed == panel_queries(load_stack("local").spec)


def test_dashboard_command_refuses_an_unknown_stack_with_exit_2():
    result = CliRunner().invoke(_cli(), ["dashboard", "--stack", "no-such-stack"])
    assert result.exit_code == 2



def test_the_gpu_panels_promql_gives_each_gpus_used_share_of_the_probers_series(tmp_path):
    # A CPU stack's GPU panel is empty (the e2e dashboard test excuses it by name), so here promtool evaluates the GPU
    # row's PromQL over the series a GPU host's prober exports: each GPU's used share, one sample per GPU.
    import shutil  # noqa: PLC0415
    import subprocess  # noqa: PLC0415

    from ruamel.yaml import YAML  # noqa: PLC0415

    spec = load_stack("staging").spec
    assert spec.gpu.type != "cpu"
    exprs = [q.expr for p in panels(spec) if p.row == "GPU" for q in p.queries]
    assert exprs, "the GPU row has queries"
    labels = 'instance="gpu-host:9102",job="prober"'
    tests = {
        "rule_files": [],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    {"series": f'{m.GPU_MEMORY_USED}{{gpu="0",{labels}}}', "values": "30x5"},
                    {"series": f'{m.GPU_MEMORY_TOTAL}{{gpu="0",{labels}}}', "values": "60x5"},
                    {"series": f'{m.GPU_MEMORY_USED}{{gpu="1",{labels}}}', "values": "15x5"},
                    {"series": f'{m.GPU_MEMORY_TOTAL}{{gpu="1",{labels}}}', "values": "60x5"},
                ],
                "promql_expr_test": [
                    {
                        "expr": executable(expr),
                        "eval_time": "3m",
                        "exp_samples": [{"labels": '{gpu="0"}', "value": 0.5}, {"labels": '{gpu="1"}', "value": 0.25}],
                    }
                    for expr in exprs
                ],
            }
        ],
    }
    test_file = tmp_path / "gpu-panel.test.yml"
    with test_file.open("w") as handle:
        YAML(typ="safe", pure=True).dump(tests, handle)
    result = subprocess.run([shutil.which("promtool") or "promtool", "test", "rules", str(test_file)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr

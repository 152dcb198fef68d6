"""`gpugate plan`: the offline plan lists what `pulumi up` would create, judges it, sizes it and prices it."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import typer
from typer.testing import CliRunner

from gpugate.cli.plan import plan, plan_command, plan_stack
from gpugate.plan.cost import price_table
from gpugate.targets import render_bundle
from gpugate.stackfile import load_stack
from infra.aws import AwsGateway, args_from_bundle
from infra.network import IngressRule

app = typer.Typer()
app.callback()(lambda: None)  # a group, so `plan` is a subcommand as under `gpugate`
app.command("plan")(plan_command)


def gpugate_plan(*args: str):
    return CliRunner().invoke(app, ["plan", *args])


@pytest.mark.parametrize(("stack", "machine"), [("staging", "g6.xlarge"), ("dev", "g2-standard-8")])
def test_plan_lists_a_gpu_vm_a_firewall_a_dns_record_and_a_monthly_cost(stack, machine):
    report = plan_stack(stack)
    roles = {row.role for row in report.resources}
    assert {"gpu-vm", "firewall", "dns-record", "static-ip", "identity"} <= roles
    vm = next(row for row in report.resources if row.role == "gpu-vm")
    assert machine in vm.properties.values()
    assert report.cost is not None and report.cost.monthly_usd and report.cost.monthly_usd > 100
    assert report.capacity is not None and report.capacity.fits
    assert report.ok


def test_staging_costs_what_the_price_table_says_for_its_machine_disk_ip_and_zone():
    prices = price_table()
    aws = prices["aws"]["us-east-1"]
    expected = (
        aws["instance"]["g6.xlarge"]["on_demand_hour"] * 730
        + aws["disk"]["gp3"]["gb_month"] * 200
        + aws["static_ip"]["hour"] * 730
        + prices["aws"]["dns_zone"]["month"]
    )
    cost = plan_stack("staging").cost
    assert cost.monthly_usd == pytest.approx(expected, abs=0.02)
    assert [line.item.split(" ")[0] for line in cost.lines] == ["g6.xlarge", "gp3", "static", "DNS"]
    assert all(line.source.startswith("https://") for line in cost.lines)
    assert cost.prices_as_of == str(prices["meta"]["as_of"])


def test_dev_is_priced_as_spot_with_the_on_demand_figure_beside_it():
    cost = plan_stack("dev").cost
    assert cost.lines[0].item == "g2-standard-8 (spot)"
    assert cost.alternative.startswith("on-demand: g2-standard-8")


def test_planning_twice_in_one_process_gives_the_same_report():
    first, second = plan_stack("staging"), plan_stack("staging")
    assert first.model_dump() == second.model_dump()
    assert plan_stack("dev").target == "gcp" and plan_stack("staging").target == "aws"


def test_the_report_is_a_table_for_people_and_json_for_machines():
    result = gpugate_plan("--stack", "staging")
    assert result.exit_code == 0, result.output
    for words in ("gpugate-staging-vm", "g6.xlarge", "web-only-from-world", "pass", "capacity", "607.65", "plan ok"):
        assert words in result.output
    data = json.loads(gpugate_plan("--stack", "dev", "--json").output)
    assert data["ok"] is True and data["cost"]["monthly_usd"] > 0 and data["violations"] == []


def test_a_stack_change_that_opens_ssh_to_the_world_fails_the_plan_naming_the_rule(stack_copy):
    # given staging with admin_cidrs that are the whole internet in two halves (the spec refuses 0.0.0.0/0 itself)
    path = stack_copy(
        "staging", lambda c: c.__setitem__("gpugate:admin_cidrs", ["0.0.0.0/1", "128.0.0.0/1"]), name="open22"
    )
    # when planned through the CLI
    result = gpugate_plan("--stack", str(path))
    # then it exits 1 and says which rule and which resource
    assert result.exit_code == 1, result.output
    assert "no-world-ssh" in result.output and "FAIL" in result.output and "plan failed" in result.output
    assert "gpugate-open22-in-ssh-0 opens SSH to 0.0.0.0/1" in result.output


def test_a_component_built_with_ssh_open_to_the_world_fails_both_ingress_rules():
    # given the staging component with its ingress overridden below the spec (which refuses 0.0.0.0/0)
    stack = load_stack("staging")

    def build(s):
        args = args_from_bundle(s, render_bundle(s))
        wide_open = args.ingress + (IngressRule("ssh-world", 22, ("0.0.0.0/0",), "SSH from anywhere"),)
        return AwsGateway(f"gpugate-{s.name}", replace(args, ingress=wide_open))

    # when planned
    report = plan(stack, build=build)
    # then the plan is not ok and names both rules on that one resource
    assert not report.ok
    assert {(v.policy, v.resource) for v in report.violations} == {
        ("no-world-ssh", "gpugate-staging-in-ssh-world-0"),
        ("web-only-from-world", "gpugate-staging-in-ssh-world-0"),
    }


def test_a_model_that_does_not_fit_the_gpu_fails_the_plan(stack_copy):
    # given a 14B model in bfloat16 (about 28 GiB of weights) on one 24 GiB L4
    def bigger(config):
        config["gpugate:model"]["id"] = "Qwen/Qwen2.5-14B-Instruct"

    path = stack_copy("staging", bigger, name="big")
    result = gpugate_plan("--stack", str(path))
    assert result.exit_code == 1, result.output
    assert "does not fit" in result.output
    assert plan_stack(path).violations == []  # it is the capacity, not a policy


def test_a_stack_the_spec_refuses_exits_2_with_the_reason(stack_copy):
    path = stack_copy("staging", lambda c: c.__setitem__("gpugate:admin_cidrs", ["0.0.0.0/0"]), name="world")
    result = gpugate_plan("--stack", str(path))
    assert result.exit_code == 2
    assert "0.0.0.0/0 would open SSH to the world" in result.output
    assert gpugate_plan("--stack", "no-such-stack").exit_code == 2

"""The runbook tasks on a stack with model tiers know each `vllm-<tier>` service from the deployed bundle and the
service table: `logs` shows a tier's output, `restart` accepts a tier and names the host's real services when
refusing one. The tasks run their real commands on this machine through an invoke Context standing in for the
SSH connection, against a rendered bundle; no service is started."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
from gpugate_runtime.contract.host import HostLayout
from gpugate_runtime.contract.services import services
from invoke import Config, Context
from invoke.exceptions import Exit

from gpugate.cli.run import task_collection
from gpugate.local.bundle import local_facts, render_local
from gpugate.render.bundle import write_bundle
from gpugate.stackfile import load_stack
from runbooks.tasks.host import GatewayHost, Host, with_tiers
from tests.gpugate.test_routing_render import local_model


class LocalConnection(Context):
    """What the tasks use of a Fabric connection (run, config, user, host, port), running on this machine."""

    user, host, port = "operator", "127.0.0.1", 22


def two_tiers(config: dict[str, Any]) -> None:
    config["gpugate:tiers"] = {"fast": {"model": local_model("smollm2-fast")}, "think": {"model": local_model("smollm2-think")}}


@pytest.fixture
def deployed(stack_copy, tmp_path: Path) -> tuple[LocalConnection, HostLayout, Any]:
    """A routed local stack's bundle written to a state dir, and a connection whose `gpugate` facts point at it."""
    stack = load_stack(stack_copy("local", two_tiers, name="tiers"))
    layout = HostLayout(tmp_path / "state")
    write_bundle(render_local(stack, layout, tmp_path / "model"), layout.etc)
    facts = GatewayHost(
        stack="tiers", root=str(layout.root), supervisor="supervisord", python=sys.executable,
        service_user=None, caddy_user=None, become_root=False,
    )  # fmt: skip
    return LocalConnection(Config(overrides={"gpugate": facts.model_dump(mode="json")})), layout, stack


def test_the_hosts_services_are_the_service_tables_with_a_vllm_per_tier(deployed):
    conn, layout, stack = deployed
    host = Host(conn)
    assert host.tiers() == ("fast", "think")
    # every service of the table the bundle was rendered from (and the ones other stacks add: the alert sink)
    table = {s.name for s in services(local_facts(stack, layout))}
    assert table <= set(host.names()) and {"vllm-fast", "vllm-think", "router"} <= table
    assert host.names()[:3] == ("vllm", "vllm-fast", "vllm-think")
    assert with_tiers(()) == tuple(n for n in host.names() if not n.startswith("vllm-"))


def test_logs_shows_a_tiers_output(deployed, capsys):
    conn, layout, _ = deployed
    layout.logs.mkdir(parents=True, exist_ok=True)
    (layout.logs / "vllm-fast.log").write_text("INFO started tier fast\nINFO Application startup complete.\n")
    task_collection()["logs"](conn, service="vllm-fast", lines=5)
    out = capsys.readouterr().out
    assert "INFO started tier fast" in out and "Application startup complete" in out


def test_restart_refuses_a_tier_the_host_does_not_have_naming_the_ones_it_has(deployed):
    conn, _, _ = deployed
    with pytest.raises(Exit) as refused:
        task_collection()["restart"](conn, service="vllm-nope")
    assert refused.value.code == 2
    assert "no service 'vllm-nope'" in str(refused.value.message)
    assert "vllm, vllm-fast, vllm-think, authz" in str(refused.value.message)

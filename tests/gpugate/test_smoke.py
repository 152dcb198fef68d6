"""`gpugate smoke` against a real gateway on loopback: real Caddy and authz, a stand-in for vLLM that answers like it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from gpugate.promote import smoke_gate
from gpugate.release import release_of
from gpugate.cli.smoke import smoke_command
from gpugate.smoke import INTERNAL_PATHS, closed_check_name
from gpugate.stackfile import load_stack
from tests.conftest import STACKS
from tests.e2e.gateway_fixtures import HOSTNAME, Gateway, running_gateway

pytestmark = pytest.mark.e2e  # starts Caddy and authz (a few seconds)

app = typer.Typer()
app.callback()(lambda: None)  # a group, so `smoke` is a subcommand as under `gpugate`
app.command("smoke")(smoke_command)

STUB_MODEL = "stub"  # what the stand-in lists


def gpugate_smoke(*args: str):
    return CliRunner().invoke(app, ["smoke", *args])


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with running_gateway(tmp_path_factory.mktemp("smoke-gateway")) as running:
        yield running


@pytest.fixture(scope="module")
def key_file(gateway: Gateway, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("smoke-key") / "key"
    path.write_text(gateway.new_key("smoke").token + "\n")
    return path


def url(gateway: Gateway) -> str:
    return f"https://{HOSTNAME}:{gateway.https_port}"


def checks_of(output: str) -> dict[str, dict]:
    return {c["check"]: c for c in json.loads(output)["checks"]}


def test_smoke_passes_every_check_against_a_healthy_gateway(gateway, key_file):
    # when smoked with the gateway's CA and a valid key
    result = gpugate_smoke("--url", url(gateway), "--key-file", str(key_file), "--ca-file", str(gateway.ca_file),
                           "--model", STUB_MODEL, "--latency-slo", "10", "--json")
    # then every check passed: TLS+HSTS, models, chat, stream, 401 for a wrong key, internal paths closed
    assert result.exit_code == 0, result.output
    checks = checks_of(result.output)
    assert set(checks) == {"tls-hsts", "models-listed", "chat", "chat-stream", "wrong-key-401",
                           *(closed_check_name(p) for _, p in INTERNAL_PATHS)}
    assert all(c["ok"] for c in checks.values())
    assert checks["wrong-key-401"]["evidence"] == "HTTP 401"
    assert checks["closed /metrics"]["evidence"].startswith("GET /metrics -> HTTP 404")
    assert "max-age=31536000" in checks["tls-hsts"]["evidence"]


def test_a_client_without_the_private_ca_fails_the_tls_check_and_runs_nothing_else(gateway, key_file):
    # when smoked trusting only the system CAs, which never signed Caddy's internal CA
    result = gpugate_smoke("--url", url(gateway), "--key-file", str(key_file), "--model", STUB_MODEL)
    # then it exits 1, names the TLS check and why, and runs no request over the unverified connection
    assert result.exit_code == 1, result.output
    assert "FAIL tls-hsts: TLS: unable to get local issuer certificate" in result.output
    assert "0 passed, 1 failed, 8 not run" in result.output


def test_a_stream_slower_than_the_latency_slo_fails_the_stream_check(gateway, key_file):
    # given the stand-in streams its 3 chunks 0.3 s apart, and an SLO of 0.2 s
    result = gpugate_smoke("--url", url(gateway), "--key-file", str(key_file), "--ca-file", str(gateway.ca_file),
                           "--model", STUB_MODEL, "--latency-slo", "0.2", "--json")
    # then only the stream check fails, with what it measured and the threshold
    assert result.exit_code == 1
    failed = {name: c for name, c in checks_of(result.output).items() if not c["ok"]}
    assert list(failed) == ["chat-stream"]
    assert "3 chunks" in failed["chat-stream"]["evidence"]
    assert failed["chat-stream"]["threshold"] == "streamed chunks, all within 0.2 s"


def test_a_model_the_gateway_does_not_list_fails_the_models_check(gateway, key_file):
    result = gpugate_smoke("--url", url(gateway), "--key-file", str(key_file), "--ca-file", str(gateway.ca_file),
                           "--model", "not-served", "--json")
    checks = checks_of(result.output)
    assert result.exit_code == 1
    assert not checks["models-listed"]["ok"]
    assert checks["models-listed"]["evidence"] == f"listed: {STUB_MODEL}"


def test_a_recorded_smoke_of_staging_satisfies_promotes_smoke_gate(gateway, key_file, tmp_path):
    # given a smoke run with --stack staging and --record (the gateway stands in for staging's)
    record = tmp_path / "smoke-staging.json"
    result = gpugate_smoke("--stack", str(STACKS / "Pulumi.staging.yaml"), "--url", url(gateway), "--key-file", str(key_file),
                           "--ca-file", str(gateway.ca_file), "--model", STUB_MODEL, "--record", str(record))
    assert result.exit_code == 0, result.output
    # when promote's smoke gate reads it for staging's release
    gate = smoke_gate(release_of(load_stack("staging")), record)
    # then the gate passes and names the run
    assert gate.ok, gate.evidence
    assert json.loads(record.read_text())["release"]["pins"]["vllm_image"] == load_stack("staging").spec.vllm.image


def test_a_missing_key_file_is_bad_input(tmp_path):
    result = gpugate_smoke("--url", "https://127.0.0.1:1", "--key-file", str(tmp_path / "nope"))
    assert result.exit_code == 2
    assert "cannot read the key file" in result.output

"""`gpugate smoke` against the running local stack (real vLLM): it passes, and it names the check a broken variant fails."""

from __future__ import annotations

import json
import os
import re
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from gpugate_runtime.contract.host import ENV_VLLM_KEY, HostLayout, Ports

from tests.conftest import edit_stack, run_gpugate, run_gpugate_script
from tests.e2e.gateway_fixtures import CADDY, free_internal_base, free_port, wait_until

pytestmark = pytest.mark.e2e

UP_TIMEOUT_S = 900
SMOKE_TIMEOUT_S = 180


@dataclass
class LocalStack:
    stack_file: Path
    env: dict[str, str]
    url: str
    ca_file: Path
    key_file: Path
    layout: HostLayout
    ports: Ports

    def smoke(self, *args: str) -> subprocess.CompletedProcess:
        return run_gpugate_smoke("--key-file", str(self.key_file), *args, env=self.env)


def run_gpugate_smoke(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    # the user's command: `gpugate smoke ...`, through the installed entry point
    return run_gpugate_script("smoke", *args, env=env, timeout=SMOKE_TIMEOUT_S)


@pytest.fixture(scope="module")
def stack(tmp_path_factory, vllm_python, smollm_dir) -> Iterator[LocalStack]:
    """A private copy of the local stack on free ports with its own state dir, up for the whole module."""
    root = tmp_path_factory.mktemp("smoke-local")
    https, http, base = free_port(), free_port(), free_internal_base()

    def ports(config):
        config["gpugate:ports"]["https"] = https
        config["gpugate:ports"]["http"] = http
        config["gpugate:ports"]["internal_base"] = base

    stack_file = edit_stack("local", root / "Pulumi.smoke.yaml", ports)
    env = {**os.environ, "GPUGATE_STATE_DIR": str(root / "state")}
    try:
        result = run_gpugate("up", "--stack", str(stack_file), env=env, timeout=UP_TIMEOUT_S)
        assert result.returncode == 0, result.stdout + result.stderr
        key_file = root / "client.key"
        key_file.write_text(re.search(r"\b(ggk_[A-Za-z0-9_-]+)", result.stdout).group(1) + "\n")
        ca_file = Path(re.search(r"CA file\s+(\S+)", result.stdout).group(1))
        yield LocalStack(
            stack_file=stack_file, env=env, url=f"https://localhost:{https}", ca_file=ca_file, key_file=key_file,
            layout=HostLayout(root / "state" / "smoke"), ports=Ports(base),
        )
    finally:
        run_gpugate("down", "--stack", str(stack_file), env=env, timeout=120)


@dataclass
class Variant:
    url: str
    ca_file: Path


@pytest.fixture(scope="module")
def open_metrics_variant(stack: LocalStack, tmp_path_factory) -> Iterator[Variant]:
    """A second Caddy in front of the same authz and vLLM, from a modified copy of the stack's rendered
    Caddyfile that also routes /metrics to vLLM. It has its own storage, so its own internal CA."""
    root = tmp_path_factory.mktemp("open-metrics")
    https, http, metrics = free_port(), free_port(), free_port()
    text = (stack.layout.etc / "caddy" / "Caddyfile").read_text()
    text = re.sub(r"^\tadmin .*$", "\tadmin off", text, count=1, flags=re.MULTILINE)  # not the stack's admin socket
    text = re.sub(r"\bhttp_port \d+", f"http_port {http}", text)
    text = re.sub(r"\bhttps_port \d+", f"https_port {https}", text)
    text = text.replace(f"http://127.0.0.1:{stack.ports.caddy_metrics} {{", f"http://127.0.0.1:{metrics} {{")
    text = text.replace(f"{{host}}:{stack.url.rsplit(':', 1)[1]}{{uri}}", f"{{host}}:{https}{{uri}}")
    text = re.sub(r"(storage file_system \{\s*root )\S+", rf"\g<1>{root / 'caddy'}", text)
    catch_all = "\thandle {\n\t\theader Content-Type application/json"
    assert catch_all in text, "the rendered Caddyfile changed shape; update this variant"
    text = text.replace(catch_all, f"\thandle /metrics {{\n\t\treverse_proxy 127.0.0.1:{stack.ports.vllm}\n\t}}\n\n{catch_all}")
    caddyfile = root / "Caddyfile"
    caddyfile.write_text(text)
    home = root / "home"
    home.mkdir()
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "XDG_CONFIG_HOME": str(home), "XDG_DATA_HOME": str(home),
        ENV_VLLM_KEY: stack.layout.vllm_key_file.read_text().strip(),
    }
    with (root / "caddy.log").open("wb") as log:
        caddy = subprocess.Popen([CADDY, "run", "--adapter", "caddyfile", "--config", str(caddyfile)], env=env, stdout=log, stderr=log)
    variant = Variant(url=f"https://localhost:{https}", ca_file=root / "caddy" / "pki" / "authorities" / "local" / "root.crt")
    try:
        wait_until(variant.ca_file.exists, 30, what="the variant's own CA")
        trust = ssl.create_default_context(cafile=str(variant.ca_file))
        wait_until(lambda: httpx.get(f"{variant.url}/healthz", verify=trust, timeout=2).status_code == 200, 30, what="the variant Caddy")
        yield variant
    finally:
        caddy.terminate()
        try:
            caddy.wait(timeout=10)
        except subprocess.TimeoutExpired:
            caddy.kill()
            caddy.wait()


def checks(result: subprocess.CompletedProcess) -> dict[str, dict]:
    return {c["check"]: c for c in json.loads(result.stdout)["checks"]}


def test_smoke_passes_against_the_running_local_stack(stack):
    # when the running local stack is smoked with its CA, its SLOs and model
    result = stack.smoke("--url", stack.url, "--ca-file", str(stack.ca_file), "--stack", str(stack.stack_file), "--json")
    # then every check passes, the chats within the stack's 20 s latency SLO
    assert result.returncode == 0, result.stdout + result.stderr
    found = checks(result)
    assert all(c["ok"] for c in found.values()), found
    assert found["chat"]["threshold"] == "an answer within the latency SLO of 20 s"
    assert found["models-listed"]["evidence"] == "listed: smollm2-135m-instruct"


def test_smoke_fails_naming_closed_metrics_when_a_variant_routes_metrics_to_vllm(stack, open_metrics_variant):
    # when a gateway whose Caddyfile routes /metrics to vLLM is smoked (its TLS valid for its own CA)
    result = stack.smoke("--url", open_metrics_variant.url, "--ca-file", str(open_metrics_variant.ca_file),
                         "--stack", str(stack.stack_file))
    # then it exits 1 and names that one check, with what it saw
    assert result.returncode == 1, result.stdout + result.stderr
    assert re.search(r"FAIL closed /metrics: GET /metrics -> HTTP 200 \(text/plain", result.stdout), result.stdout
    assert "8 passed, 1 failed" in result.stdout


def test_smoke_fails_naming_tls_when_the_gateway_serves_a_certificate_from_another_ca(stack, open_metrics_variant):
    # when the variant (its certificate from its own CA) is smoked trusting the stack's CA
    result = stack.smoke("--url", open_metrics_variant.url, "--ca-file", str(stack.ca_file), "--stack", str(stack.stack_file))
    # then the TLS check fails with the verification error, and nothing else is tried
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAIL tls-hsts: TLS: unable to get local issuer certificate" in result.stdout, result.stdout
    assert "0 passed, 1 failed, 8 not run" in result.stdout

"""Every target's Caddyfile, as Caddy itself adapts it: one canonical path form, refused before authz otherwise.

The behaviour itself (JSON 400, nothing reaches vLLM) is shown against real Caddy in
tests/e2e/test_gateway_proxy.py and against real vLLM in tests/e2e/test_gateway_with_vllm.py.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from gpugate.kubernetes.objects import CADDY_CONFIG, CADDYFILE_PATH
from gpugate.render.caddy import CANONICAL_URI
from gpugate.stackfile import load_stack
from gpugate.targets import render_bundle
from tests.e2e.paths import NON_CANONICAL

CADDY = shutil.which("caddy") or "/usr/bin/caddy"
PUBLIC_PATHS = ("/healthz", "/v1/models", "/v1/chat/completions", "/v1/completions")


def caddyfile_of(stack: str | Path) -> str:
    """The Caddyfile a stack's proxy runs: the host file (local, VMs) or the proxy pods' ConfigMap (Kubernetes)."""
    files = render_bundle(load_stack(stack)).files
    if "caddy/Caddyfile" in files:
        return files["caddy/Caddyfile"].decode()
    config_map = next(data for path, data in files.items() if path.endswith(f"configmap-{CADDY_CONFIG}.yaml"))
    return YAML(typ="safe", pure=True).load(config_map)["data"][CADDYFILE_PATH.name]


def adapted(text: str, tmp_path: Path) -> dict:
    source = tmp_path / "Caddyfile"
    source.write_text(text)
    argv = [CADDY, "adapt", "--adapter", "caddyfile", "--config", str(source)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def gateway_routes(config: dict) -> list[dict]:
    """The routes of the public site (the one serving /v1/chat/completions), in the order Caddy runs them."""
    for server in config["apps"]["http"]["servers"].values():
        for route in server["routes"]:
            for handler in route["handle"]:
                if handler["handler"] == "subroute" and "/v1/chat/completions" in json.dumps(handler):
                    return handler["routes"]
    raise AssertionError("no site serves the public API")


@pytest.mark.parametrize("stack", ["local", "staging", "dev", "prod"])
def test_every_targets_caddyfile_refuses_non_canonical_paths_before_authz_or_any_proxy(stack, tmp_path):
    # given the Caddyfile of a local, AWS VM, GCP VM and Kubernetes pod stack, as Caddy adapts it
    routes = gateway_routes(adapted(caddyfile_of(stack), tmp_path))
    # then the first handle block is the canonical-path check, answering 400 ...
    first = next(index for index, route in enumerate(routes) if "group" in route)
    guard = json.dumps(routes[first])
    assert routes[first]["match"] == [{"not": [{"vars_regexp": {"{http.request.orig_uri}": {"pattern": CANONICAL_URI}}}]}]
    assert '"status_code": 400' in guard and "non_canonical_path" in guard
    # ... and nothing before it asks authz or reaches vLLM
    assert not [r for r in routes[:first] if "reverse_proxy" in json.dumps(r)]


def test_the_canonical_form_takes_every_public_path_and_no_probe_variant():
    # Caddy's regexp engine (RE2) and Python's agree on this pattern (no look-around, no back-references) except at a
    # final newline, which Python's `$` lets through: tests/gpugate/test_fuzz_paths.py reads it as RE2 does.
    canonical = re.compile(CANONICAL_URI)
    assert [p for p in PUBLIC_PATHS if not canonical.match(p)] == []
    assert canonical.match("/v1/models?after=a%2F..") and canonical.match("/")
    assert len(NON_CANONICAL) > 40
    assert [p for p in NON_CANONICAL if canonical.match(p)] == []


def listens(config: dict) -> set[str]:
    return {address for server in config["apps"]["http"]["servers"].values() for address in server["listen"]}


def test_the_local_stack_listens_on_loopback_only_unless_the_stack_exposes_it(stack_copy, tmp_path):
    # given the local stack as shipped, and a copy that sets gpugate:local.expose
    shipped = listens(adapted(caddyfile_of("local"), tmp_path))
    exposed_stack = stack_copy("local", lambda c: c.update({"gpugate:local": {"expose": True}}))
    exposed = listens(adapted(caddyfile_of(exposed_stack), tmp_path))
    # then as shipped every Caddy listener (https, http, metrics) is on 127.0.0.1 ...
    assert shipped == {"127.0.0.1:8443", "127.0.0.1:8080", "127.0.0.1:18005"}
    # ... and exposed, the public ports listen on every interface (metrics stay on loopback)
    assert exposed == {":8443", ":8080", "127.0.0.1:18005"}


def test_cloud_hosts_listen_on_every_interface_for_their_public_ports(tmp_path):
    assert {":443", ":80"} <= listens(adapted(caddyfile_of("staging"), tmp_path))


def proxies_to_vllm(routes: list[dict]) -> dict[str, dict]:
    """The proxy to vLLM of each public route (its last reverse_proxy: forward_auth's comes first), by its first path."""
    found = {}
    for route in routes:
        paths = [path for match in route.get("match", []) for path in match.get("path", [])]
        handlers = [h for sub in route["handle"] for r in sub.get("routes", []) for h in r["handle"]]
        proxies = [h for h in handlers if h["handler"] == "reverse_proxy"]
        if paths and proxies:
            found[paths[0]] = proxies[-1]
    return found


@pytest.mark.parametrize("stack", ["local", "staging", "dev", "prod"])
def test_every_hop_has_a_timeout_from_the_stack(stack, stack_copy, tmp_path):
    # given a stack with its own timeouts
    timeouts = {"read_header_seconds": 7, "read_body_seconds": 45, "idle_seconds": 90, "upstream_dial_seconds": 3,
                "upstream_header_seconds": 20, "max_stream_seconds": 900}  # fmt: skip
    config = adapted(caddyfile_of(stack_copy(stack, lambda c: c.update({"gpugate:timeouts": timeouts}))), tmp_path)
    # then every server bounds a client's headers, its whole request, an idle connection and a whole response
    seconds = 1_000_000_000
    for server in config["apps"]["http"]["servers"].values():
        assert (server["read_header_timeout"], server["read_timeout"], server["idle_timeout"], server["write_timeout"]) == (
            7 * seconds, 45 * seconds, 90 * seconds, 900 * seconds
        )
    # and each proxy to vLLM bounds the dial and the response headers: short where nothing is generated
    proxies = proxies_to_vllm(gateway_routes(config))
    assert sorted(proxies) == ["/healthz", "/v1/chat/completions", "/v1/models"]
    header_timeouts = {path: proxy["transport"]["response_header_timeout"] for path, proxy in proxies.items()}
    assert header_timeouts == {"/healthz": 20 * seconds, "/v1/models": 20 * seconds, "/v1/chat/completions": 900 * seconds}
    assert {proxy["transport"]["dial_timeout"] for proxy in proxies.values()} == {3 * seconds}

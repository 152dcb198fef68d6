"""The bundle: deterministic, complete, listed in its manifest, free of secrets."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest

from gpugate.render.bundle import PACKED_SUFFIXES
from gpugate.targets import render_bundle
from gpugate.stackfile import load_stack, stack_names
from tests.conftest import run_gpugate


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("stack", ["prod", "staging", "local"])
def test_rendering_twice_gives_byte_identical_bundles(tmp_path, stack):
    # given the same commit and stack file, rendered into two directories by two processes
    a, b = tmp_path / "A", tmp_path / "B"
    assert run_gpugate("render", "--stack", stack, "--out", str(a)).returncode == 0
    assert run_gpugate("render", "--stack", stack, "--out", str(b)).returncode == 0
    # then `diff -r A B` is empty
    diff = subprocess.run(["diff", "-r", str(a), str(b)], capture_output=True, text=True)
    assert diff.returncode == 0, diff.stdout
    assert _tree(a) == _tree(b)


@pytest.mark.parametrize("stack", ["local", "dev", "staging", "prod"])
def test_manifest_lists_every_file_with_its_sha256_and_the_spec_hash(tmp_path, stack):
    assert run_gpugate("render", "--stack", stack, "--out", str(tmp_path)).returncode == 0
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    on_disk = {p for p in _tree(tmp_path) if p != "manifest.json"}
    # every file is hashed but those derived from the hashed ones (VM user data and the archive carry the hash)
    assert set(manifest["files"]) | set(manifest["derived"]) == on_disk
    assert not set(manifest["files"]) & set(manifest["derived"])
    assert bool(manifest["derived"]) == (stack in ("dev", "staging"))
    for relpath, digest in manifest["files"].items():
        assert hashlib.sha256((tmp_path / relpath).read_bytes()).hexdigest() == digest
    assert manifest["spec_sha256"] == load_stack(stack).spec_sha256


def test_each_target_gets_its_service_definitions():
    files = {name: set(render_bundle(load_stack(name)).files) for name in stack_names()}
    assert "supervisor/supervisord.conf" in files["local"]
    for vm in ("dev", "staging"):
        assert "cloud-init/user-data.yaml" in files[vm]
        assert {f"systemd/gpugate-{s}.service" for s in ("caddy", "authz", "vllm", "prober", "prometheus", "alertmanager")} <= files[vm]
    hosts = {"caddy/Caddyfile", "vllm/launch.json", "prometheus/prometheus.yml", "prometheus/rules/gpugate.rules.yml",
             "alertmanager/alertmanager.yml", "runtime/gpugate.env", "manifest.json"}
    assert all(hosts <= files[name] for name in ("local", "dev", "staging"))
    # A cluster's bundle is the objects it applies: the proxy's Caddyfile and settings are ConfigMaps there.
    assert files["prod"] - {"manifest.json"} and all(p.startswith("kubernetes/") for p in files["prod"] - {"manifest.json"})


def test_caddy_runs_with_the_same_go_runtime_settings_on_every_target():
    # one P, GOGC and a memory limit (measured in docs/performance.md): supervisord, systemd, Kubernetes
    from configparser import RawConfigParser

    from ruamel.yaml import YAML

    from gpugate_runtime.contract.host import CADDY_GO_ENV

    local = RawConfigParser()
    local.read_string(render_bundle(load_stack("local")).files["supervisor/supervisord.conf"].decode())
    pairs = dict(item.split("=", 1) for item in local["program:caddy"]["environment"].split(","))
    assert {name: value.strip('"') for name, value in pairs.items()} == CADDY_GO_ENV

    unit = render_bundle(load_stack("staging")).files["systemd/gpugate-caddy.service"].decode()
    assert {line.removeprefix("Environment=").split("=", 1)[0]: line.split("=", 2)[2]
            for line in unit.splitlines() if line.startswith("Environment=")} == CADDY_GO_ENV  # fmt: skip

    yaml = YAML(typ="safe", pure=True)
    objects = [yaml.load(data) for path, data in render_bundle(load_stack("prod")).files.items() if path.startswith("kubernetes/")]
    gateway = next(o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == "gateway")
    [caddy] = [c for c in gateway["spec"]["template"]["spec"]["containers"] if c["name"] == "caddy"]
    assert {e["name"]: e["value"] for e in caddy["env"] if e["name"] in CADDY_GO_ENV} == CADDY_GO_ENV


def test_no_secret_value_reaches_a_bundle(tmp_path):
    # given secrets present in the renderer's environment, as on an operator's laptop
    canary = "canary-0b4d7f1e-not-for-bundles"
    env = {**os.environ, "GPUGATE_VLLM_API_KEY": canary, "GPUGATE_ALERT_CREDENTIAL": canary}
    for stack in stack_names():
        out = tmp_path / stack
        assert run_gpugate("render", "--stack", stack, "--out", str(out), env=env).returncode == 0
        # then no rendered file carries them: configs point at secret files or env placeholders
        for relpath, data in _tree(out).items():
            assert canary.encode() not in data, relpath
    caddyfile = (tmp_path / "staging" / "caddy" / "Caddyfile").read_text()
    assert "{env.GPUGATE_VLLM_API_KEY}" in caddyfile


def test_every_rendered_file_says_it_is_generated(tmp_path):
    assert run_gpugate("render", "--stack", "staging", "--out", str(tmp_path)).returncode == 0
    for relpath, data in _tree(tmp_path).items():
        if relpath.endswith((".json", ".lock", *PACKED_SUFFIXES)):
            # JSON has no comments (manifest.json and launch.json are generated by definition); packed files are
            # bytes; the runtime's requirements.lock travels byte for byte, with scripts/lock's own header
            continue
        assert b"Generated by gpugate" in data[:400], relpath


def test_rerender_into_the_same_directory_removes_files_the_stack_no_longer_has(tmp_path):
    out = tmp_path / "bundle"
    assert run_gpugate("render", "--stack", "staging", "--out", str(out)).returncode == 0
    (out / "operator-notes.txt").write_text("mine")
    # when the directory is re-used for a stack without systemd units
    assert run_gpugate("render", "--stack", "prod", "--out", str(out)).returncode == 0
    # then stale bundle files are gone, and files the bundle never wrote are left alone
    assert not (out / "systemd").exists() or not any((out / "systemd").iterdir())
    assert (out / "operator-notes.txt").read_text() == "mine"

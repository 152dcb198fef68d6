"""Runbook tasks over a real sshd against a real gateway (rendered Caddyfile on Caddy, real authz, a stub vLLM)."""

from __future__ import annotations

import io
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from invoke.exceptions import Exit

from gpugate.cli.run import SshTarget, connect, task_collection
from runbooks.tasks.host import GatewayHost
from gpugate_runtime.keys import read_store
from tests.e2e.gateway_fixtures import Gateway, running_gateway, wait_until
from tests.runbooks.conftest import Sshd, gpugate_run

pytestmark = pytest.mark.e2e

CHAT = {"model": "stub", "messages": [{"role": "user", "content": "hello"}]}


@dataclass
class Fab:
    """Runs a task as `fab -H host TASK` would: a Fabric connection whose `gpugate` config describes the gateway."""

    sshd: Sshd
    facts: dict[str, Any]

    def __call__(self, task: str, /, *, dry_run: bool = False, **kwargs: Any) -> Any:
        target = SshTarget("127.0.0.1", self.sshd.user, self.sshd.port, None, self.facts, "test")
        conn = connect(target, self.sshd.identity, self.sshd.known_hosts, dry_run)
        try:
            return task_collection()[task](conn, **kwargs)
        finally:
            conn.close()


def facts_for(gateway: Gateway) -> dict[str, Any]:
    host = GatewayHost(
        stack="stub", root=str(gateway.layout.root), supervisor="supervisord", python=sys.executable,
        service_user=None, caddy_user=None, become_root=False,
    )  # fmt: skip
    return host.model_dump(mode="json")


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with running_gateway(tmp_path_factory.mktemp("gateway")) as running:
        yield running


@pytest.fixture(scope="module")
def fab(gateway: Gateway, sshd: Sshd) -> Fab:
    return Fab(sshd, facts_for(gateway))


@pytest.fixture
def client(gateway: Gateway) -> Iterator[httpx.Client]:
    with gateway.client() as opened:
        yield opened


def caddy_pid(gateway: Gateway) -> int:
    return gateway.processes[-1].pid  # running_gateway starts authz, then Caddy


# --- drain and an unreachable vLLM ----------------------------------------------------------------


def test_drain_answers_503_with_retry_after_before_any_key_check_and_off_serves_again(gateway, fab, client, capsys):
    token = gateway.new_key("drain-check").token
    fab("drain")
    try:
        for path, auth in (("/v1/models", None), ("/v1/models", token), ("/healthz", None)):
            headers = {"Authorization": f"Bearer {auth}"} if auth else {}
            response = gateway.request(client, "GET", path, headers=headers)
            assert response.status_code == 503, path  # 503 even without a key: authz is not asked
            assert int(response.headers["Retry-After"]) > 0
            assert response.json()["error"]["code"] == "service_unavailable"
        assert "answers 503 on /healthz with Retry-After" in capsys.readouterr().out
    finally:
        fab("drain", off=True)
    response = gateway.request(client, "GET", "/v1/models", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200


def test_draining_a_draining_gateway_changes_nothing(gateway, fab, capsys):
    fab("drain")
    try:
        marker = gateway.layout.drain_marker
        before = (marker.stat().st_mtime_ns, marker.read_bytes())
        fab("drain")
        assert "already draining: nothing to do" in capsys.readouterr().out
        assert (marker.stat().st_mtime_ns, marker.read_bytes()) == before
    finally:
        fab("drain", off=True)
    fab("drain", off=True)
    assert "not draining: nothing to do" in capsys.readouterr().out


def test_unreachable_vllm_gets_503_with_retry_after_instead_of_502(tmp_path):
    with running_gateway(tmp_path) as gateway, gateway.client() as client:
        token = gateway.new_key("down-check").token
        gateway.upstream.stop()
        response = gateway.request(client, "POST", "/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 503
        assert int(response.headers["Retry-After"]) > 0
        assert response.headers["Strict-Transport-Security"]


# --- reload-proxy ---------------------------------------------------------------------------------


def test_reload_proxy_swaps_in_a_valid_caddyfile_without_restarting_caddy_and_keeps_the_one_before(gateway, fab, client, tmp_path):
    deployed = gateway.layout.etc / "caddy" / "Caddyfile"
    before = deployed.read_text()
    candidate = tmp_path / "Caddyfile"
    candidate.write_text(before.replace('"message":"Not found."', '"message":"Nothing here (reloaded)."'))
    pid = caddy_pid(gateway)
    fab("reload-proxy", caddyfile=str(candidate))
    assert deployed.read_text() == candidate.read_text()
    assert (deployed.parent / "Caddyfile.previous").read_text() == before
    assert "Nothing here (reloaded)." in gateway.request(client, "GET", "/nowhere").text
    assert caddy_pid(gateway) == pid and gateway.processes[-1].poll() is None


def test_reload_proxy_without_a_file_reloads_the_deployed_caddyfile_and_changes_nothing(gateway, fab, client):
    deployed = gateway.layout.etc / "caddy" / "Caddyfile"
    before = deployed.read_bytes()
    fab("reload-proxy")
    fab("reload-proxy")
    assert deployed.read_bytes() == before
    assert gateway.request(client, "GET", "/healthz").status_code == 200


# --- keys -----------------------------------------------------------------------------------------


def test_revoke_by_the_leaked_key_on_stdin_rejects_it_within_two_seconds_and_prints_only_its_id(gateway, fab, client, capsys, monkeypatch):
    leaked = gateway.new_key("leaky")
    headers = {"Authorization": f"Bearer {leaked.token}"}
    assert gateway.request(client, "POST", "/v1/chat/completions", json=CHAT, headers=headers).status_code == 200
    monkeypatch.setattr("sys.stdin", io.StringIO(leaked.token + "\n"))
    fab("revoke-key", key_id="-")
    started = time.monotonic()
    wait_until(lambda: gateway.request(client, "POST", "/v1/chat/completions", json=CHAT, headers=headers).status_code == 401, 2, what="401")
    assert time.monotonic() - started < 2
    out = capsys.readouterr().out
    assert leaked.record.id in out and leaked.token not in out


def test_revoking_a_revoked_key_changes_nothing(gateway, fab, capsys):
    key = gateway.new_key("twice")
    fab("revoke-key", key_id=key.record.id)
    store_before = gateway.layout.key_store.read_bytes()
    fab("revoke-key", key_id=key.record.id)
    assert "already revoked" in capsys.readouterr().out
    assert gateway.layout.key_store.read_bytes() == store_before


def test_revoking_an_unknown_id_exits_2(gateway, fab):
    with pytest.raises(Exit) as refused:
        fab("revoke-key", key_id="0123456789ab")
    assert refused.value.code == 2 and "no key with id 0123456789ab" in refused.value.message


def test_revoke_refuses_the_key_itself_as_an_argument_without_echoing_it(gateway, fab):
    key = gateway.new_key("in-argv")
    with pytest.raises(Exit) as refused:
        fab("revoke-key", key_id=key.token)
    assert refused.value.code == 2 and "not a key id" in refused.value.message and "stdin" in refused.value.message
    assert key.token not in refused.value.message
    assert next(k for k in read_store(gateway.layout.key_store).keys if k.id == key.record.id).revoked_at is None


def test_rotating_a_name_without_an_active_key_exits_2_and_issues_nothing(gateway, fab):
    before = read_store(gateway.layout.key_store)
    with pytest.raises(Exit) as refused:
        fab("rotate-key", name="nobody")
    assert refused.value.code == 2 and "no active key" in refused.value.message
    assert read_store(gateway.layout.key_store) == before


def test_dry_run_of_a_revoke_sends_only_the_key_id_and_revokes_nothing(gateway, fab, capsys, monkeypatch):
    key = gateway.new_key("dry")
    monkeypatch.setattr("sys.stdin", io.StringIO(key.token))
    fab("revoke-key", key_id="-", dry_run=True)
    out = capsys.readouterr().out
    assert f"would revoke key {key.record.id}" in out and key.token not in out
    assert next(k for k in read_store(gateway.layout.key_store).keys if k.id == key.record.id).revoked_at is None


# --- connecting -----------------------------------------------------------------------------------


def test_an_unknown_host_key_is_refused_with_how_to_check_it(sshd, tmp_path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "GPUGATE_STATE_DIR": str(tmp_path / "state")}  # no ~/.ssh here
    result = gpugate_run("status", "--stack", "local", "--host", sshd.host, "--identity", str(sshd.identity), env=env, timeout=60)
    assert result.returncode == 1
    assert "host key" in result.stderr and "unknown" in result.stderr and "ssh-keyscan" in result.stderr


def test_a_vm_host_without_a_bundle_is_reported_as_such(sshd, tmp_path):
    result = gpugate_run("status", "--stack", "staging", *sshd.ssh_args(), timeout=60)
    assert result.returncode == 1
    assert "no gpugate bundle" in result.stderr and "/etc/gpugate/runtime/gpugate.env" in result.stderr


def test_a_wrong_identity_is_refused_with_what_to_pass(sshd, tmp_path):
    stranger = tmp_path / "stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)], check=True)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "GPUGATE_STATE_DIR": str(tmp_path / "state")}
    args = ["--host", sshd.host, "--identity", str(stranger), "--known-hosts", str(sshd.known_hosts)]
    result = gpugate_run("status", "--stack", "local", *args, env=env, timeout=60)
    assert result.returncode == 1
    assert "refused the login" in result.stderr and "--identity" in result.stderr

"""`gpugate run TASK` over a real sshd against a running private local stack (real Caddy, authz, vLLM CPU, prober)."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import pytest

from tests.e2e.local_stack import RunningStack, running_local_stack, wait_until
from tests.runbooks.conftest import Sshd, gpugate_run

pytestmark = pytest.mark.e2e

CANARY = "CANARY-7d41c9-runbook-prompt-that-must-never-be-shown"
CLIENTS = 8
AFTER_RESTART_S = 120  # each client's time to succeed once the restart is done
CLIENT_DEADLINE_S = 900  # no client loops longer than this, whatever happens
TOKEN = re.compile(r"\bggk_[0-9a-f]{12}_[0-9a-f]{64}\b")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    with running_local_stack(tmp_path_factory.mktemp("runbook-stack")) as running:
        yield running


def run(stack: RunningStack, sshd: Sshd, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    """`gpugate run TASK --stack <the copy> ...` over the test's sshd, from a shell with the stack's state dir."""
    task, *rest = args
    return gpugate_run(task, "--stack", str(stack.stack_file), *sshd.ssh_args(), *rest, env=stack.env, timeout=timeout)


def create_key(stack: RunningStack, name: str) -> tuple[str, str]:
    created = stack.keys("create", name)
    return created["key"], created["id"]


def chat(stack: RunningStack, key: str, content: str = "Say hi", **extra) -> str | None:
    reply = stack.client(key).chat.completions.create(
        model=stack.model, messages=[{"role": "user", "content": content}], max_tokens=2, **extra
    )
    return reply.choices[0].message.content


def caddyfile(stack: RunningStack) -> Path:
    return stack.state / "etc" / "gpugate" / "caddy" / "Caddyfile"


def test_status_reports_every_service_running_and_the_prober_green(stack, sshd):
    wait_until(lambda: run(stack, sshd, "status", timeout=120).returncode == 0, 60, 2, "status to report healthy")
    result = run(stack, sshd, "status", "--json", timeout=120)
    report = json.loads(result.stdout)
    assert report["healthy"] is True and report["draining"] is False
    assert {s["name"] for s in report["services"]} >= {"vllm", "authz", "caddy", "prober", "prometheus", "alertmanager"}
    assert all(s["state"] == "RUNNING" for s in report["services"])
    assert {c["check"] for c in report["checks"] if c["ok"]} >= {"vllm_health", "models", "completion", "tls"}
    assert report["keys"]["active"] >= 2  # the quick-start key and the prober's


def test_dry_run_of_every_changing_task_prints_what_it_would_do_and_changes_nothing(stack, sshd, tmp_path):
    token, key_id = create_key(stack, "dry-run")
    candidate = tmp_path / "Caddyfile"
    candidate.write_text(caddyfile(stack).read_text() + "\n# edited\n")
    marker = stack.state / "var" / "lib" / "gpugate" / "drain"

    def snapshot():
        pids = {s["name"]: s["pid"] for s in stack.status()["services"]}
        return pids, stack.key_store.read_bytes(), caddyfile(stack).read_bytes(), marker.exists()

    before = snapshot()
    for args in (
        ("restart",),
        ("restart", "--service", "authz"),
        ("drain",),
        ("rotate-key", "dry-run"),
        ("revoke-key", key_id),
        ("reload-proxy", "--caddyfile", str(candidate)),
    ):
        result = run(stack, sshd, *args, "--dry-run", timeout=120)
        assert result.returncode == 0, f"{args}: {result.stdout}{result.stderr}"
        assert "would " in result.stdout and "dry run" in result.stderr, args
    assert snapshot() == before
    assert chat(stack, token) is not None  # the key that a real revoke would have killed


def test_rotate_key_returns_a_working_new_key_while_the_old_one_keeps_working(stack, sshd):
    old, old_id = create_key(stack, "team-rotate")
    assert chat(stack, old) is not None
    result = run(stack, sshd, "rotate-key", "team-rotate", "--overlap", "1h", timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    new = TOKEN.search(result.stdout).group(0)
    assert new != old
    # authz picks up the store within its reload interval (0.5 s); give it a few
    wait_until(lambda: _works(stack, new), 5, 0.5, "the new key to work")
    assert chat(stack, old) is not None
    retiring = next(k for k in stack.keys("list") if k["id"] == old_id)
    assert retiring["status"] == "active" and retiring["expires_at"] in result.stdout


def _works(stack: RunningStack, key: str) -> bool:
    try:
        return chat(stack, key) is not None
    except openai.AuthenticationError:
        return False


def test_logs_show_request_metadata_and_never_a_prompt_or_a_key(stack, sshd):
    request_id = "runbook-logs-check-0001"
    assert chat(stack, stack.key, CANARY, extra_headers={"X-Request-Id": request_id}) is not None
    key_id = stack.key.split("_")[1]
    access = run(stack, sshd, "logs", "--lines", "200", timeout=120)
    assert access.returncode == 0, access.stderr
    line = next(line for line in access.stdout.splitlines() if request_id in line)
    assert key_id in line and "/v1/chat/completions" in line and "\t200\t" in line
    for service in ("access", "authz", "vllm", "caddy"):
        shown = run(stack, sshd, "logs", "--service", service, "--lines", "1000", timeout=120)
        assert shown.returncode == 0, shown.stderr
        assert CANARY not in shown.stdout and stack.key not in shown.stdout and not TOKEN.search(shown.stdout)


def test_reload_proxy_refuses_a_broken_caddyfile_and_the_gateway_keeps_serving(stack, sshd, tmp_path):
    deployed = caddyfile(stack)
    before = deployed.read_bytes()
    caddy_pid = stack.pid_of("caddy")
    broken = tmp_path / "Caddyfile"
    broken.write_text(deployed.read_text().replace("handle @generate {", "handle @generate {\n\t\tnot_a_directive on", 1))
    result = run(stack, sshd, "reload-proxy", "--caddyfile", str(broken), timeout=120)
    assert result.returncode == 1
    assert "refused" in result.stderr and "not_a_directive" in result.stderr
    assert deployed.read_bytes() == before
    assert not (deployed.parent / ".Caddyfile.candidate").exists()
    assert stack.pid_of("caddy") == caddy_pid
    assert chat(stack, stack.key) is not None


def test_reload_proxy_puts_the_previous_caddyfile_back_when_caddy_cannot_load_the_new_one(stack, sshd, tmp_path):
    deployed = caddyfile(stack)
    before = deployed.read_bytes()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        candidate = tmp_path / "Caddyfile"  # valid for `caddy validate`, which binds nothing; Caddy cannot listen
        candidate.write_text(deployed.read_text() + f"\nhttp://127.0.0.1:{port} {{\n\trespond ok\n}}\n")
        result = run(stack, sshd, "reload-proxy", "--caddyfile", str(candidate), timeout=300)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "rolled back" in result.stderr and "address already in use" in result.stderr
    assert deployed.read_bytes() == before
    for _ in range(20):  # every new connection, each with its own TLS handshake, is served
        with httpx.Client(verify=stack.tls(), timeout=10) as client:
            assert client.get(f"{stack.url}/healthz").status_code == 200
    assert chat(stack, stack.key) is not None


@dataclass
class ClientLog:
    successes: int = 0
    succeeded_after_restart: bool = False
    unavailable: list[str | None] = field(default_factory=list)  # Retry-After of each 503
    other_statuses: list[int] = field(default_factory=list)
    connection_errors: list[str] = field(default_factory=list)


def _client(stack: RunningStack, key: str, log: ClientLog, restarted: threading.Event, restarted_at: list[float]) -> None:
    """Send small completions until one succeeds after the restart (or time is up); honour Retry-After."""
    client = stack.client(key)
    deadline = time.monotonic() + CLIENT_DEADLINE_S
    while time.monotonic() < deadline:
        after = restarted.is_set()
        if after and time.monotonic() > restarted_at[0] + AFTER_RESTART_S:
            return
        try:
            client.chat.completions.create(model=stack.model, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
        except openai.APIStatusError as err:
            if err.status_code == 503:
                retry_after = err.response.headers.get("retry-after")
                log.unavailable.append(retry_after)
                time.sleep(min(float(retry_after or 1), 10))
            else:
                log.other_statuses.append(err.status_code)
                time.sleep(1)
            continue
        except openai.APIConnectionError as err:
            log.connection_errors.append(f"{type(err).__name__}: {err}")
            time.sleep(1)
            continue
        log.successes += 1
        if after:
            log.succeeded_after_restart = True
            return
        time.sleep(0.2)


def test_restart_while_8_clients_send_requests_gives_no_connection_error_and_every_client_succeeds(stack, sshd):
    keys = [create_key(stack, f"client-{i}")[0] for i in range(CLIENTS)]  # one each: no client's limit is the story
    logs = [ClientLog() for _ in range(CLIENTS)]
    restarted, restarted_at = threading.Event(), [0.0]
    threads = [threading.Thread(target=_client, args=(stack, k, log, restarted, restarted_at), daemon=True) for k, log in zip(keys, logs)]
    for thread in threads:
        thread.start()
    old_pid = stack.pid_of("vllm")
    try:
        wait_until(lambda: all(log.successes for log in logs), 120, 0.5, "every client to be served before the restart")
        result = run(stack, sshd, "restart", timeout=900)
    finally:
        restarted_at[0] = time.monotonic()
        restarted.set()
        for thread in threads:
            thread.join(AFTER_RESTART_S + 60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert stack.pid_of("vllm") != old_pid
    assert [e for log in logs for e in log.connection_errors] == []
    assert [s for log in logs for s in log.other_statuses] == []
    unavailable = [r for log in logs for r in log.unavailable]
    assert unavailable, "no client saw the drain: the restart was not exercised under traffic"
    assert all(r is not None and int(r) > 0 for r in unavailable)
    assert all(log.succeeded_after_restart for log in logs), [log.successes for log in logs]

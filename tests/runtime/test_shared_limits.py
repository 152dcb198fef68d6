"""Two authz processes sharing one real redis-server hold a key's rpm, concurrency and budget together (issue 15).

Each authz is a real process on its own loopback port, as two proxy replicas' authz containers are; both read
the same key store. The control case (no Redis) shows what the test would catch: each replica alone
allows the key its whole rpm, so two allow twice as much.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from gpugate_runtime.contract import metrics as metricnames
from gpugate_runtime.contract.routing import RouteRecord
from gpugate_runtime.keys import Scope, create_key
from tests.apt import ensure_packages
from tests.runtime.test_authz import DAY, AuthzProcess, error_of, free_port, start_authz, stop, wait_for

pytestmark = pytest.mark.e2e

REDIS_SERVER = "/usr/bin/redis-server"


@dataclass
class Redis:
    port: int
    password_file: Path
    root: Path
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        password = self.password_file.read_text().strip()
        self.process = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--requirepass", password, "--dir", str(self.root)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip

        def up() -> bool:
            try:
                return b"PONG" in subprocess.run(
                    ["redis-cli", "-p", str(self.port), "--no-auth-warning", "-a", password, "ping"], capture_output=True, timeout=5
                ).stdout
            except (subprocess.TimeoutExpired, FileNotFoundError):
                return False

        wait_for(up, 10, "redis-server to answer")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Redis]:
    ensure_packages({"redis-server": REDIS_SERVER, "redis-tools": "/usr/bin/redis-cli"})
    root = tmp_path_factory.mktemp("redis")
    password_file = root / "password"
    password_file.write_text(secrets.token_hex(16) + "\n")
    password_file.chmod(0o600)
    server = Redis(free_port(), password_file, root)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def replicas(tmp_path: Path, redis_server: Redis) -> Iterator[callable]:
    """Start N authz processes on one key store; with `shared`, all on the one Redis."""
    started: list[AuthzProcess] = []

    def start(count: int = 2, shared: bool = True) -> list[AuthzProcess]:
        settings = {"redis_url": redis_server.url, "redis_password_file": str(redis_server.password_file)} if shared else {}
        store = tmp_path / "keys.json"
        for n in range(count):
            authz = start_authz(tmp_path / f"replica{len(started)}-{n}", **settings)
            # one key store for every replica, as a ConfigMap or a shared volume gives them
            authz.key_store.unlink(missing_ok=True)
            authz.key_store.symlink_to(store)
            authz.key_store = store
            started.append(authz)
        return started[-count:]

    try:
        yield start
    finally:
        for authz in started:
            stop(authz)


def key_for(authz: AuthzProcess, name: str, **kwargs: object):  # noqa: ANN201
    issued = create_key(authz.key_store, name, expires=DAY, **kwargs)  # type: ignore[arg-type]
    wait_for(lambda: authz.ask(issued.token, request_id=f"warm-{name}").status_code != 401, 3, "the key to load")
    return issued


def alternate(replicas: list[AuthzProcess], token: str, count: int, prefix: str) -> list[tuple[int, int]]:
    """`count` requests, sent to each replica in turn; (replica index, status) per request."""
    sent = []
    for n in range(count):
        index = n % len(replicas)
        sent.append((index, replicas[index].ask(token, request_id=f"{prefix}-{n:04d}").status_code))
    assert len(sent) == count
    return sent


def test_two_replicas_on_one_redis_hold_a_keys_rpm_together(replicas) -> None:  # noqa: ANN001
    # given two authz replicas sharing Redis and a key allowed 10 requests a minute (its warm-up took one)
    a, b = replicas(2)
    key = key_for(a, "shared-rpm", rpm=10, max_concurrent=100)  # (no request here ends: only rpm may refuse)
    # when 30 requests go to the two in turn
    sent = alternate([a, b], key.token, 30, "rpm")
    # then 9 more are allowed in all (one token refills in 6 s, longer than this takes), and both refused some
    allowed = [s for s in sent if s[1] == 200]
    assert len(allowed) == 9, sent
    assert {i for i, status in sent if status == 429} == {0, 1}
    assert {i for i, _ in allowed} == {0, 1}


def test_control_without_redis_each_replica_allows_the_whole_rpm(replicas) -> None:  # noqa: ANN001
    a, b = replicas(2, shared=False)
    key = key_for(a, "alone-rpm", rpm=10, max_concurrent=100)
    key_for(b, "alone-rpm-b")  # b has loaded the store once
    sent = alternate([a, b], key.token, 30, "alone")
    # 9 left on a after its warm-up, 10 on b: what two replicas gave one key before this change
    assert sum(status == 200 for _, status in sent) == 19


def test_two_replicas_hold_a_keys_concurrency_together_and_either_log_gives_slots_back(replicas) -> None:  # noqa: ANN001
    # given a key allowed 3 in flight, its warm-up slot given back
    a, b = replicas(2)
    key = key_for(a, "shared-conc", max_concurrent=3)
    a.finish(key.record.id, "warm-shared-conc")
    time.sleep(0.3)
    # when two start on a and one on b
    assert [a.ask(key.token, request_id=f"conc-a{n}").status_code for n in range(2)] == [200, 200]
    assert b.ask(key.token, request_id="conc-b0").status_code == 200
    # then a fourth is refused by either
    assert a.ask(key.token, request_id="conc-a-over").status_code == 429
    assert b.ask(key.token, request_id="conc-b-over").status_code == 429
    # when b's request ends (b's Caddy logs it) / then a may take the slot
    b.finish(key.record.id, "conc-b0")
    wait_for(lambda: a.ask(key.token, request_id=f"conc-a-after-{time.monotonic_ns()}").status_code == 200, 2, "b's slot back")
    assert b.ask(key.token, request_id="conc-b-still-full").status_code == 429


def test_a_budget_spent_through_one_replica_is_refused_by_the_other(replicas) -> None:  # noqa: ANN001
    a, b = replicas(2)
    # (room for every poll below in flight at once: none of them ends, and only the budget may refuse)
    key = key_for(a, "shared-budget", scope=Scope(budget_tokens=100), max_concurrent=1000)
    record = RouteRecord(
        ts=time.time(), request_id="spent", key_id=key.record.id, family=key.record.id, model="smol", policy="local-first",
        route="tier:general", status=200, input_tokens=60, output_tokens=40,
    )  # fmt: skip
    with (a.log_file.parent / "route.log").open("a") as handle:  # a's router wrote it
        handle.write(record.to_json() + "\n")
    # (a pushes its route log's spend to Redis at its next store check: a few seconds on a busy machine)
    response = wait_for(lambda: (r := b.ask(key.token)).status_code != 200 and r, 15, "b to see a's spend")
    assert response.status_code == 429, response.text
    assert "token budget 'month'" in error_of(response)["message"]
    assert a.metric(metricnames.SPEND_RECORDS) == 1 and b.metric(metricnames.SPEND_RECORDS) == 0


def test_with_redis_down_limits_fail_closed_with_503_and_a_bad_key_still_gets_401(replicas, redis_server: Redis) -> None:  # noqa: ANN001
    # given a replica on Redis with a working key
    (a,) = replicas(1)
    key = key_for(a, "store-down")
    assert a.ask(key.token).status_code == 200
    # when Redis goes away
    redis_server.stop()
    try:
        response = a.ask(key.token)
        # then a valid key gets 503 with Retry-After (never an unlimited 200), and a bad key its 401 as before
        assert response.status_code == 503 and response.headers["Retry-After"] == "1"
        assert "shared limits store is unreachable" in error_of(response)["message"]
        assert a.ask("ggk_" + "0" * 12 + "_" + "f" * 64).status_code == 401
        assert a.metric(metricnames.AUTHZ_DECISIONS, f'key_id="{key.record.id}",outcome="limits_unavailable"') >= 1
    finally:
        redis_server.start()
    # and once Redis is back, the key is served again
    wait_for(lambda: a.ask(key.token).status_code == 200, 5, "Redis to be used again")



def test_the_kubernetes_stores_rendered_command_runs_on_debians_redis_server_and_holds_authzs_limits(tmp_path: Path) -> None:
    # given the prod stack's rendered store container: its argv as the pod runs it, with only the config
    # file, the data directory and the port moved here (the config file holds what the Secret does)
    from ruamel.yaml import YAML  # noqa: PLC0415

    from gpugate.kubernetes.objects import LIMITS, LIMITS_PORT  # noqa: PLC0415
    from gpugate.stackfile import load_stack  # noqa: PLC0415
    from gpugate.targets import render_bundle  # noqa: PLC0415

    ensure_packages({"redis-server": REDIS_SERVER, "redis-tools": "/usr/bin/redis-cli"})
    files = render_bundle(load_stack("prod")).files
    deployment = next(
        doc for path, data in files.items() if path.endswith(f"deployment-{LIMITS}.yaml") for doc in [YAML(typ="safe", pure=True).load(data)]
    )
    argv = list(deployment["spec"]["template"]["spec"]["containers"][0]["command"])
    password = secrets.token_hex(16)
    (tmp_path / "redis.conf").write_text(f"requirepass {password}\n")
    (tmp_path / "password").write_text(password + "\n")
    (tmp_path / "data").mkdir()
    port = free_port()
    argv[1] = str(tmp_path / "redis.conf")
    argv[argv.index("--dir") + 1] = str(tmp_path / "data")
    argv[argv.index("--port") + 1] = str(port)
    argv[argv.index("--bind") + 1] = "127.0.0.1"
    assert argv[0] == "redis-server" and str(LIMITS_PORT) not in argv
    server = subprocess.Popen([REDIS_SERVER, *argv[1:]], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    authz = None
    try:
        cli = ["redis-cli", "-p", str(port), "--no-auth-warning"]
        wait_for(lambda: b"NOAUTH" in subprocess.run([*cli, "ping"], capture_output=True, timeout=5).stdout, 10, "redis to ask for its password")
        # when an authz uses it with the password file
        authz = start_authz(tmp_path / "authz", redis_url=f"redis://127.0.0.1:{port}/0", redis_password_file=str(tmp_path / "password"))
        key = create_key(authz.key_store, "k8s", expires=DAY, rpm=2)
        statuses = [authz.ask(key.token).status_code for _ in range(3)]
        # then the limits hold through it, and it writes its append-only file for spend to survive a restart
        assert statuses == [200, 200, 429]
        held = subprocess.run([*cli, "-a", password, "--scan", "--pattern", "gpugate:*"], capture_output=True, text=True, timeout=5).stdout
        assert f"gpugate:rpm:{key.record.id}" in held.split()
        assert any((tmp_path / "data").rglob("*.aof")) or any((tmp_path / "data").rglob("appendonly*"))
    finally:
        if authz is not None:
            stop(authz)
        server.terminate()
        server.wait(timeout=10)

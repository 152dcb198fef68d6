"""The authz service alone, over real HTTP on loopback: decisions, limits, hot reload, metrics, logs."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import httpx
import pytest

from gpugate.spec import KeyLimits, PortsSpec
from gpugate_runtime.contract import metrics as metricnames
from gpugate_runtime.accesslog import ACCESS_LOG_IDS_FIELD
from gpugate_runtime.authz import BODY_LENGTH_HEADER
from gpugate_runtime.limits import Inflight, TokenBuckets
from gpugate_runtime.contract.host import KEY_ID_HEADER, REQUEST_ID_HEADER, Ports
from gpugate_runtime.keys import IssuedKey, create_key, revoke_key, utcnow, write_store, read_store
from gpugate_runtime.settings import AuthzSettings

REPO = Path(__file__).resolve().parents[2]
DAY = timedelta(days=1)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class AuthzProcess:
    port: int
    key_store: Path
    access_log: Path
    log_file: Path
    process: subprocess.Popen
    seq: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ask(self, key: str | None = None, request_id: str | None = None, **headers: str) -> httpx.Response:
        """What Caddy's forward_auth sends: a GET /authz with the client's headers."""
        self.seq += 1
        sent = {REQUEST_ID_HEADER: request_id or f"test-request-{self.seq:06d}", "X-Forwarded-Method": "GET", **headers}
        if key is not None:
            sent["Authorization"] = f"Bearer {key}"
        return httpx.get(f"{self.url}/authz", headers=sent, timeout=5)

    def key(self, name: str, **kwargs: object) -> IssuedKey:
        kwargs.setdefault("expires", DAY)
        return create_key(self.key_store, name, **kwargs)  # type: ignore[arg-type]

    def finish(self, key_id: str, request_id: str) -> None:
        """Append the access-log entry Caddy writes when a request ends (same compact JSON shape)."""
        entry = {
            "level": "info",
            "logger": "http.log.access.log0",
            "msg": "handled request",
            "request": {"method": "POST", "uri": "/v1/chat/completions"},
            ACCESS_LOG_IDS_FIELD: f"{key_id} {request_id}",
            "duration": 0.01,
            "size": 12,
            "status": 200,
        }
        with self.access_log.open("a") as handle:
            handle.write(json.dumps(entry, separators=(",", ":")) + "\n")

    def metrics(self) -> str:
        return httpx.get(f"{self.url}/metrics", timeout=5).text

    def metric(self, name: str, labels: str = "") -> float:
        series = f"{name}{{{labels}}}" if labels else name
        for line in self.metrics().splitlines():
            if line.startswith(series + " "):
                return float(line.split()[-1])
        return 0.0

    def log_entries(self) -> list[dict]:
        return [json.loads(line) for line in self.log_file.read_text().splitlines()]


def wait_for(predicate, timeout: float, what: str):  # noqa: ANN001, ANN201
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s: {what}")
        time.sleep(0.02)


def start_authz(root: Path, create_access_log: bool = True, **settings: str) -> AuthzProcess:
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    access_log = root / "access.log"
    if create_access_log:
        access_log.touch()
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        # (and what the caller's PYTHONPATH adds, e.g. a package the venv does not have yet)
        "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "runtime"), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "GPUGATE_AUTHZ_PORT": str(port),
        "GPUGATE_AUTHZ_KEY_STORE": str(root / "keys.json"),
        "GPUGATE_AUTHZ_LOG_FILE": str(root / "authz.log"),
        "GPUGATE_AUTHZ_ACCESS_LOG": str(access_log),
        "GPUGATE_AUTHZ_MAX_BODY_BYTES": "1000",
        **{f"GPUGATE_AUTHZ_{k.upper()}": v for k, v in settings.items()},
    }
    stderr = (root / "stderr.log").open("wb")
    process = subprocess.Popen([sys.executable, "-m", "gpugate_runtime", "authz", "serve"], env=env, stderr=stderr, stdout=stderr)
    stderr.close()
    authz = AuthzProcess(port, root / "keys.json", access_log, root / "authz.log", process)

    def up() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"authz exited {process.returncode}: {(root / 'stderr.log').read_text()}")
        try:
            return httpx.get(f"{authz.url}/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(up, 20, "authz to listen")
    return authz


def stop(authz: AuthzProcess) -> None:
    authz.process.send_signal(signal.SIGTERM)
    try:
        authz.process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        authz.process.kill()
        authz.process.wait(timeout=5)


@pytest.fixture(scope="module")
def authz(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthzProcess]:
    process = start_authz(tmp_path_factory.mktemp("authz"))
    try:
        yield process
    finally:
        stop(process)


@pytest.fixture
def own_authz(tmp_path: Path) -> Iterator[callable]:
    """Start an authz with its own settings; stopped at the end of the test."""
    started: list[AuthzProcess] = []

    def start(**kwargs: object) -> AuthzProcess:
        process = start_authz(tmp_path / f"authz{len(started)}", **kwargs)  # type: ignore[arg-type]
        started.append(process)
        return process

    try:
        yield start
    finally:
        for process in started:
            stop(process)


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "code"}
    return body["error"]


# --- decisions ------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_valid_key_is_allowed_and_named_by_its_key_id(authz: AuthzProcess) -> None:
    key = authz.key("valid")
    response = authz.ask(key.token)
    assert response.status_code == 200
    assert response.headers[KEY_ID_HEADER] == key.record.id


@pytest.mark.e2e
def test_missing_key_gets_401_with_an_openai_error(authz: AuthzProcess) -> None:
    response = authz.ask(None)
    assert response.status_code == 401
    assert error_of(response)["code"] == "invalid_api_key"
    assert error_of(response)["type"] == "invalid_request_error"
    assert KEY_ID_HEADER not in response.headers


@pytest.mark.e2e
@pytest.mark.parametrize(
    "authorization",
    ["Basic dXNlcjpwYXNz", "Bearer", "Bearer sk-0123456789abcdef", "Bearer ggk_123_abc", "Token ggk_" + "a" * 12 + "_" + "b" * 64],
)
def test_malformed_key_gets_401(authz: AuthzProcess, authorization: str) -> None:
    before = authz.metric(metricnames.AUTHZ_DECISIONS, 'key_id="-",outcome="malformed_key"')
    response = httpx.get(f"{authz.url}/authz", headers={"Authorization": authorization}, timeout=5)
    assert response.status_code == 401 and error_of(response)["code"] == "invalid_api_key"
    assert authz.metric(metricnames.AUTHZ_DECISIONS, 'key_id="-",outcome="malformed_key"') == before + 1


@pytest.mark.e2e
def test_right_id_with_a_wrong_secret_gets_401(authz: AuthzProcess) -> None:
    key = authz.key("wrong-secret")
    forged = key.token[:-4] + ("0000" if not key.token.endswith("0000") else "1111")
    response = authz.ask(forged)
    assert response.status_code == 401 and KEY_ID_HEADER not in response.headers


@pytest.mark.e2e
def test_unknown_well_formed_key_gets_401(authz: AuthzProcess) -> None:
    assert authz.ask("ggk_" + "0" * 12 + "_" + "f" * 64).status_code == 401


@pytest.mark.e2e
def test_expired_key_gets_401_saying_expired(authz: AuthzProcess) -> None:
    key = authz.key("expired", now=utcnow() - timedelta(days=2), expires=DAY)
    response = authz.ask(key.token)
    assert response.status_code == 401 and "expired" in error_of(response)["message"]


@pytest.mark.e2e
def test_revoked_key_gets_401_saying_revoked(authz: AuthzProcess) -> None:
    key = authz.key("revoked")
    revoke_key(authz.key_store, key.record.id)
    # (authz may have loaded the key before the revocation: the change reaches it within a reload)
    response = wait_for(lambda: (r := authz.ask(key.token)).status_code == 401 and r, 2, "the revocation")
    assert "revoked" in error_of(response)["message"]


@pytest.mark.e2e
def test_key_over_its_rpm_gets_429_with_retry_after(authz: AuthzProcess) -> None:
    # given a key allowed 3 requests per minute
    key = authz.key("rpm-3", rpm=3)
    statuses = [authz.ask(key.token).status_code for _ in range(3)]
    # when a 4th comes within the minute
    response = authz.ask(key.token)
    # then it is refused with the seconds until the next token (one per 20 s)
    assert statuses == [200, 200, 200]
    assert response.status_code == 429 and error_of(response)["code"] == "rate_limit_exceeded"
    assert 1 <= int(response.headers["Retry-After"]) <= 20


@pytest.mark.e2e
def test_body_over_the_limit_gets_413(authz: AuthzProcess) -> None:
    key = authz.key("big-body")
    response = authz.ask(key.token, **{BODY_LENGTH_HEADER: "1001", "X-Forwarded-Method": "POST"})
    assert response.status_code == 413 and error_of(response)["code"] == "request_too_large"


@pytest.mark.e2e
def test_body_at_the_limit_is_allowed(authz: AuthzProcess) -> None:
    key = authz.key("limit-body")
    assert authz.ask(key.token, **{BODY_LENGTH_HEADER: "1000", "X-Forwarded-Method": "POST"}).status_code == 200


@pytest.mark.e2e
def test_post_without_a_length_gets_411(authz: AuthzProcess) -> None:
    key = authz.key("chunked")
    response = authz.ask(key.token, **{BODY_LENGTH_HEADER: "", "X-Forwarded-Method": "POST"})
    assert response.status_code == 411


@pytest.mark.e2e
def test_an_unauthenticated_huge_body_gets_401_not_413(authz: AuthzProcess) -> None:
    # Limits are nobody's business but a key holder's.
    assert authz.ask("nope", **{BODY_LENGTH_HEADER: "99999999", "X-Forwarded-Method": "POST"}).status_code == 401


# --- concurrency ----------------------------------------------------------------------------------


@pytest.mark.e2e
def test_key_at_its_concurrency_limit_gets_429_until_a_request_finishes(authz: AuthzProcess) -> None:
    # given a key allowed 2 requests in flight, with 2 in flight
    key = authz.key("conc-2", max_concurrent=2)
    assert [authz.ask(key.token, request_id=f"conc-2-{i}").status_code for i in range(2)] == [200, 200]
    # when a third arrives / then it is refused
    refused = authz.ask(key.token, request_id="conc-2-third")
    assert refused.status_code == 429 and refused.headers["Retry-After"] == "1"
    # when the access log says one finished / then the next is allowed
    authz.finish(key.record.id, "conc-2-0")
    assert authz.ask(key.token, request_id="conc-2-fourth").status_code == 200


@pytest.mark.e2e
def test_back_to_back_requests_at_max_concurrent_1_are_never_refused(authz: AuthzProcess) -> None:
    # given a key with one slot, used by a client that starts each request as soon as the last ends
    key = authz.key("serial", max_concurrent=1)
    statuses = []
    for i in range(30):
        statuses.append(authz.ask(key.token, request_id=f"serial-{i}").status_code)
        authz.finish(key.record.id, f"serial-{i}")  # Caddy logs the end; the next request follows at once
    assert statuses == [200] * 30


@pytest.mark.e2e
def test_another_keys_log_entry_with_the_same_request_id_releases_nothing(authz: AuthzProcess) -> None:
    # given a key with its one slot taken by request "shared-id"
    key = authz.key("victim", max_concurrent=1)
    assert authz.ask(key.token, request_id="shared-id-000").status_code == 200
    # when a request of another key with the same client-chosen id ends
    authz.finish("aaaaaaaaaaaa", "shared-id-000")
    time.sleep(0.2)
    # then the slot is still taken
    assert authz.ask(key.token, request_id="shared-id-001").status_code == 429


@pytest.mark.e2e
def test_slot_is_released_after_the_ttl_when_no_log_entry_comes(own_authz) -> None:  # noqa: ANN001
    authz = own_authz(inflight_ttl_seconds="1")
    key = authz.key("lost", max_concurrent=1)
    assert authz.ask(key.token).status_code == 200
    assert authz.ask(key.token).status_code == 429
    wait_for(lambda: authz.ask(key.token).status_code == 200, 3, "the TTL to release the slot")


@pytest.mark.e2e
def test_without_a_readable_access_log_concurrency_is_not_enforced(own_authz) -> None:  # noqa: ANN001
    # given authz whose access log does not exist (nothing could ever give slots back)
    authz = own_authz(create_access_log=False)
    key = authz.key("no-log", max_concurrent=1)
    # when the key sends more requests than its limit / then none is refused, and the log says why
    assert [authz.ask(key.token).status_code for _ in range(3)] == [200, 200, 200]
    assert any("concurrency limits are off" in e.get("event", "") for e in authz.log_entries())


@pytest.mark.e2e
def test_a_rolled_access_log_is_followed(own_authz) -> None:  # noqa: ANN001
    # given a key with its one slot taken
    authz = own_authz()
    key = authz.key("rolled", max_concurrent=1)
    assert authz.ask(key.token, request_id="rolled-1").status_code == 200
    # when Caddy rolls the log (rename, new file) and the request's entry lands in the new file
    authz.access_log.rename(authz.access_log.with_name("access-rolled.log"))
    authz.access_log.touch()
    time.sleep(0.7)  # one store/rotation check interval
    authz.finish(key.record.id, "rolled-1")
    # then the slot comes back
    wait_for(lambda: authz.ask(key.token).status_code == 200, 2, "the slot to be released from the new file")


# --- hot reload -----------------------------------------------------------------------------------


@pytest.mark.e2e
def test_key_issued_after_start_works_on_its_first_request(authz: AuthzProcess) -> None:
    key = authz.key("fresh")
    assert authz.ask(key.token).status_code == 200


@pytest.mark.e2e
def test_revoked_key_is_rejected_within_two_seconds(authz: AuthzProcess) -> None:
    key = authz.key("soon-revoked")
    assert authz.ask(key.token).status_code == 200
    revoke_key(authz.key_store, key.record.id)
    started = time.monotonic()
    wait_for(lambda: authz.ask(key.token).status_code == 401, 2, "the revocation to take effect")
    assert time.monotonic() - started < 2


@pytest.mark.e2e
def test_corrupt_store_is_refused_counted_and_previous_keys_keep_working(own_authz) -> None:  # noqa: ANN001
    # given a served key
    authz = own_authz()
    key = authz.key("survivor")
    assert authz.ask(key.token).status_code == 200
    reloads = authz.metric(metricnames.KEYSTORE_RELOADS)
    good = read_store(authz.key_store)
    # when the store is overwritten with something that does not parse
    authz.key_store.write_text('{"version": 1, "keys": [{"id": "trunc')
    # then the failure is counted and logged, and the key still works
    wait_for(lambda: authz.metric(metricnames.KEYSTORE_RELOAD_FAILURES) == 1, 2, "the failure to be counted")
    assert authz.ask(key.token).status_code == 200
    assert authz.metric(metricnames.KEYSTORE_RELOADS) == reloads
    assert any("refused key store" in e.get("event", "") for e in authz.log_entries())
    # and a good store is taken again
    write_store(authz.key_store, good)
    wait_for(lambda: authz.metric(metricnames.KEYSTORE_RELOADS) == reloads + 1, 2, "the good store to be reloaded")


# --- metrics and logs -----------------------------------------------------------------------------


@pytest.mark.e2e
def test_metrics_export_the_names_the_alert_rules_use(authz: AuthzProcess) -> None:
    key = authz.key("metered")
    authz.ask(key.token)
    text = authz.metrics()
    for name in (metricnames.AUTHZ_DECISIONS, metricnames.KEYSTORE_RELOADS, metricnames.KEYSTORE_RELOAD_FAILURES):
        assert f"\n{name} " in text or f"\n{name}{{" in text, name
    assert f'{metricnames.AUTHZ_DECISIONS}{{key_id="{key.record.id}",outcome="allowed"}} 1.0' in text
    assert f"{metricnames.AUTHZ_DECISION_SECONDS}_bucket" in text
    assert f'{metricnames.KEY_AGE_SECONDS}{{key_id="{key.record.id}",name="metered"}}' in text
    assert f'{metricnames.KEY_LAST_USED}{{key_id="{key.record.id}"}}' in text


@pytest.mark.e2e
def test_unknown_key_ids_do_not_become_metric_labels(authz: AuthzProcess) -> None:
    # Anyone can invent key ids; as labels they would grow the series without bound.
    invented = "ggk_" + "9" * 12 + "_" + "e" * 64
    authz.ask(invented)
    assert "999999999999" not in authz.metrics()


@pytest.mark.e2e
def test_decision_log_follows_logrotate_moving_it(authz: AuthzProcess) -> None:
    # logrotate (create mode) renames authz.log and expects the writer to start a new file.
    key = authz.key("rotated")

    def logged(request_id: str, *files: Path) -> bool:
        return any(f.exists() and f'"request_id":"{request_id}"' in f.read_text() for f in files)

    authz.ask(key.token, request_id="before-rotation")
    wait_for(lambda: logged("before-rotation", authz.log_file), 2, "a decision in authz.log")
    rotated = authz.log_file.with_name("authz.log.1")
    authz.log_file.rename(rotated)
    authz.ask(key.token, request_id="during-rotation")
    wait_for(lambda: logged("during-rotation", authz.log_file, rotated), 2, "the decision made while rotating")
    time.sleep(0.2)  # past the next maintenance tick: authz has reopened authz.log
    authz.ask(key.token, request_id="after-rotation")
    wait_for(lambda: logged("after-rotation", authz.log_file), 2, "a decision in the new authz.log")
    assert not logged("after-rotation", rotated) and logged("before-rotation", rotated)
    # and both files, the first and the one reopened after the move, are authz's own only (umask 022 here)
    assert [oct(stat.S_IMODE(f.stat().st_mode)) for f in (rotated, authz.log_file)] == ["0o600", "0o600"]


@pytest.mark.e2e
def test_one_json_log_line_per_decision_with_request_id_and_no_key(authz: AuthzProcess) -> None:
    key = authz.key("logged")
    authz.ask(key.token, request_id="log-line-check-1")
    authz.ask("ggk_" + "1" * 12 + "_" + "2" * 64, request_id="log-line-check-2")

    def both_logged() -> dict[str, dict]:
        # Decision lines are buffered and written on authz's 50 ms maintenance tick.
        entries = {e["request_id"]: e for e in authz.log_entries() if e.get("request_id", "").startswith("log-line-check")}
        return entries if len(entries) == 2 else {}

    entries = wait_for(both_logged, 2, "both decisions in authz.log")
    assert entries["log-line-check-1"]["key_id"] == key.record.id
    assert entries["log-line-check-1"]["outcome"] == "allowed" and entries["log-line-check-1"]["latency_ms"] >= 0
    assert entries["log-line-check-2"] == {**entries["log-line-check-2"], "key_id": "-", "outcome": "unknown_key", "status": 401}
    text = authz.log_file.read_text()
    assert key.token not in text and key.token.rsplit("_", 1)[1] not in text and "2" * 64 not in text


def wakeups_per_second(pid: int, seconds: float) -> float:
    """How often the process's main thread woke from sleep (voluntary context switches) over `seconds`."""

    def switches() -> int:
        status = Path(f"/proc/{pid}/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("voluntary_ctxt_switches")))

    before = switches()
    time.sleep(seconds)
    return (switches() - before) / seconds


@pytest.mark.e2e
def test_an_idle_authz_sleeps_until_its_store_check_and_a_decision_still_reaches_its_log_at_once(own_authz) -> None:  # noqa: ANN001
    # The store check every 10 s is then the only timer of authz's own: with no slot open there is
    # nothing to read in the access log, so nothing wakes it 20 times a second (bench/idle_cpu.py).
    authz = own_authz(reload_interval_seconds="10")
    key = authz.key("idle", max_concurrent=1)
    time.sleep(0.5)
    # Was 30 a second: the old 50 ms tick, plus uvicorn's housekeeping at 10 Hz (now 1 Hz: QuietServer).
    assert wakeups_per_second(authz.process.pid, 3) < 5

    # Each decision wakes it: its line is written within a tick, not at the next store check up to
    # 10 s away (which could serve at most one of these three).
    delays = []
    for n in range(3):
        started = time.monotonic()
        assert authz.ask(key.token, request_id=f"after-idle-{n}").status_code == 200
        wait_for(lambda: any(e.get("request_id") == f"after-idle-{n}" for e in authz.log_entries()), 11, "the line")
        delays.append(time.monotonic() - started)
        authz.finish(key.record.id, f"after-idle-{n}")  # gives the slot back, so authz is idle again
        time.sleep(1.2)
    assert len(delays) == 3 and max(delays) < 0.75, delays


@pytest.mark.e2e
def test_sigterm_stops_authz_at_once_though_its_server_ticks_once_a_second(own_authz) -> None:  # noqa: ANN001
    # A stop that waited for the next 1 s tick would take 0.1-1.1 s; three stops rule out luck.
    stops = []
    for _ in range(3):
        authz = own_authz()
        time.sleep(0.3)
        started = time.monotonic()
        authz.process.send_signal(signal.SIGTERM)
        authz.process.wait(timeout=10)
        stops.append(time.monotonic() - started)
    assert len(stops) == 3 and max(stops) < 0.45, stops


@pytest.mark.e2e
def test_other_paths_are_404(authz: AuthzProcess) -> None:
    assert httpx.get(f"{authz.url}/v1/models", timeout=5).status_code == 404


# --- settings -------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_a_misspelt_authz_setting_in_the_env_file_stops_the_service_with_exit_2(tmp_path: Path) -> None:
    env_file = tmp_path / "gpugate.env"
    env_file.write_text("GPUGATE_AUTHZ_PROT=18001\nGPUGATE_PROBER_INTERVAL=5\n")
    result = subprocess.run(
        [sys.executable, "-m", "gpugate_runtime", "authz", "serve"],
        env={"PATH": os.environ.get("PATH", ""), "PYTHONPATH": f"{REPO}:{REPO / 'runtime'}", "GPUGATE_ENV_FILE": str(env_file)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "prot" in result.stderr and "prober" not in result.stderr.lower()


def test_access_log_defaults_to_the_log_directory_of_authz_log(tmp_path: Path) -> None:
    settings = AuthzSettings(log_file=tmp_path / "logs" / "authz.log")
    assert settings.access_log == tmp_path / "logs" / "access.log"


def test_authz_settings_defaults_match_the_spec_defaults() -> None:
    limits, fields = KeyLimits(), AuthzSettings.model_fields
    assert fields["default_rpm"].default == limits.rpm
    assert fields["default_max_concurrent"].default == limits.max_concurrent
    assert fields["max_body_bytes"].default == limits.max_body_kib * 1024
    assert fields["port"].default == Ports(PortsSpec().internal_base).authz


# --- the limiters on their own --------------------------------------------------------------------


def test_token_bucket_allows_a_minutes_burst_then_refills_at_rpm_over_60() -> None:
    buckets = TokenBuckets()
    assert [buckets.take("k", 60, 0.0) for _ in range(60)] == [0.0] * 60
    assert buckets.take("k", 60, 0.0) == pytest.approx(1.0)
    assert buckets.take("k", 60, 1.0) == 0.0


def test_inflight_counts_per_key_and_expires_after_the_ttl() -> None:
    inflight = Inflight(ttl=10)
    inflight.acquire("a", "r1", 0.0)
    inflight.acquire("a", "r1", 1.0)  # the same request id twice: two slots
    inflight.acquire("b", "r2", 2.0)
    assert (inflight.count("a"), inflight.count("b")) == (2, 1)
    assert inflight.release("a", "r1") and not inflight.release("b", "r1")
    assert inflight.expire(11.5) == 1  # a's second slot (t=1) is past the TTL; a's first was released
    assert (inflight.count("a"), inflight.count("b"), inflight.total()) == (0, 1, 1)

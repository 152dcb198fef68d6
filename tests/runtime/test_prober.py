"""The prober checks a gateway through real Caddy (its internal CA) and reports each failure with its reason."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from gpugate_runtime.contract import metrics as m
from gpugate_runtime.cli.prober import app
from gpugate_runtime.prober import PROMPT, Check, Prober, ProbeRun
from gpugate_runtime.prober_settings import ProberSettings

MODEL = "smollm2"
KEY = "ggk_0123456789ab_prober-secret-never-logged-5e1d"
REPLY = "REPLY-CONTENT-NEVER-LOGGED-91c4"
STARTUP_TIMEOUT_S = 20
SLOW_UPSTREAM_S = 3.0


def find_free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- a stub OpenAI-compatible upstream (real HTTP on loopback) ------------------------------------


@dataclass
class Upstream:
    """What the stub serves; tests change it, the `upstream` fixture resets it."""

    port: int = 0
    served: list[str] = field(default_factory=lambda: [MODEL])
    status: int | None = None  # answer every /v1 request with this status
    delay: float = 0.0  # sleep before answering /v1 requests
    requests: list[dict[str, Any]] = field(default_factory=list)

    def reset(self) -> None:
        self.served, self.status, self.delay = [MODEL], None, 0.0
        self.requests.clear()

    @property
    def health_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/health"


class _Handler(BaseHTTPRequestHandler):
    server: ThreadingHTTPServer
    protocol_version = "HTTP/1.1"

    @property
    def stub(self) -> Upstream:
        return self.server.stub  # type: ignore[attr-defined]

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass

    def _send(self, status: int, body: dict[str, Any] | None = None) -> None:
        data = json.dumps(body or {}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _v1(self, answer: dict[str, Any]) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        self.stub.requests.append({"method": self.command, "path": self.path, "body": body})
        time.sleep(self.stub.delay)
        if self.stub.status is not None:
            self._send(self.stub.status, {"error": {"message": "stub failure"}})
        elif self.headers.get("Authorization") != f"Bearer {KEY}":
            self._send(401, {"error": {"message": "invalid key"}})
        else:
            self._send(200, answer)

    def do_GET(self) -> None:
        if self.path == "/health":
            self._send(200)
        elif self.path == "/v1/models":
            self._v1({"object": "list", "data": [{"id": name, "object": "model"} for name in self.stub.served]})
        else:
            self._send(404)

    def do_POST(self) -> None:
        if self.path != "/v1/chat/completions":
            self._send(404)
            return
        self._v1(
            {
                "id": "chatcmpl-1",
                "object": "chat.completion",
                "model": MODEL,
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": REPLY}, "finish_reason": "length"}
                ],
                "usage": {"prompt_tokens": 9, "completion_tokens": 1, "total_tokens": 10},
            }
        )


@pytest.fixture(scope="module")
def upstream_server() -> Iterator[Upstream]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    stub = Upstream(port=server.server_address[1])
    server.stub = stub  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    yield stub
    server.shutdown()
    server.server_close()


@pytest.fixture
def upstream(upstream_server: Upstream) -> Iterator[Upstream]:
    upstream_server.reset()
    yield upstream_server
    upstream_server.reset()


# -- real Caddy with `tls internal` in front of the stub ------------------------------------------


@dataclass(frozen=True)
class Gateway:
    port: int
    root_ca: Path

    @property
    def url(self) -> str:
        return f"https://localhost:{self.port}"


def _handshake(port: int, cafile: Path) -> bytes:
    """The DER certificate Caddy serves for `localhost`, verified against `cafile`."""
    context = ssl.create_default_context(cafile=str(cafile))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=2) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        return tls.getpeercert(binary_form=True) or b""


@pytest.fixture(scope="module")
def gateway(upstream_server: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    caddy = shutil.which("caddy")
    assert caddy, "Caddy is required (apt-get install caddy)"
    workdir = tmp_path_factory.mktemp("caddy")
    port = find_free_port()
    caddyfile = workdir / "Caddyfile"
    caddyfile.write_text(
        f"""{{
\tadmin off
\tskip_install_trust
\tstorage file_system {{
\t\troot {workdir}/data
\t}}
\thttp_port {find_free_port()}
\thttps_port {port}
\tauto_https disable_redirects
\tservers {{
\t\tprotocols h1 h2
\t}}
}}
localhost:{port} {{
\tbind 127.0.0.1
\ttls internal
\treverse_proxy 127.0.0.1:{upstream_server.port}
}}
"""
    )
    env = {
        **os.environ,
        "HOME": str(workdir),
        "XDG_DATA_HOME": str(workdir / "xdg"),
        "XDG_CONFIG_HOME": str(workdir / "xdg"),
    }
    log_path = workdir / "caddy.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [caddy, "run", "--config", str(caddyfile), "--adapter", "caddyfile"],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
        )
    root_ca = workdir / "data" / "pki" / "authorities" / "local" / "root.crt"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            assert process.poll() is None, f"Caddy exited:\n{log_path.read_text()}"
            try:
                _handshake(port, root_ca)
                break
            except (OSError, ssl.SSLError):
                assert time.monotonic() < deadline, (
                    f"Caddy not serving TLS after {STARTUP_TIMEOUT_S}s:\n{log_path.read_text()}"
                )
                time.sleep(0.1)
        yield Gateway(port=port, root_ca=root_ca)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "prober_api_key"
    path.write_text(KEY + "\n")
    return path


def settings_for(gateway: Gateway, upstream: Upstream, key_file: Path, **changes: Any) -> ProberSettings:
    fields: dict[str, Any] = {
        "public_url": gateway.url,
        "model": MODEL,
        "vllm_health_url": upstream.health_url,
        "key_file": key_file,
        "ca_file": gateway.root_ca,
        "timeout_seconds": 5,
    }
    return ProberSettings(**{**fields, **changes})


def probe(settings: ProberSettings) -> tuple[ProbeRun, Prober]:
    prober = Prober(settings)
    return asyncio.run(prober.run_once()), prober


def samples(exposition: bytes | str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = exposition.decode() if isinstance(exposition, bytes) else exposition
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def success(values: dict, check: str) -> float | None:
    return values.get((m.PROBE_SUCCESS, (("check", check),)))


# -- success through the real proxy ----------------------------------------------------------------


@pytest.mark.e2e
def test_every_check_passes_through_real_caddy_with_its_local_ca(
    gateway: Gateway, upstream: Upstream, key_file: Path
) -> None:
    run, _ = probe(settings_for(gateway, upstream, key_file))

    outcomes = {r.check: r.ok for r in run.results}
    assert outcomes == {
        Check.VLLM_HEALTH: True,
        Check.MODELS: True,
        Check.COMPLETION: True,
        Check.TLS: True,
        Check.GPU: None,
    }
    assert run.ok
    assert run.result(Check.MODELS).detail == f"HTTP 200, serves {MODEL}"
    assert run.result(Check.COMPLETION).detail == "HTTP 200, 1 token"


@pytest.mark.e2e
def test_tls_check_exports_the_expiry_of_the_certificate_caddy_serves(
    gateway: Gateway, upstream: Upstream, key_file: Path
) -> None:
    served = x509.load_der_x509_certificate(_handshake(gateway.port, gateway.root_ca))

    run, prober = probe(settings_for(gateway, upstream, key_file))

    expected = served.not_valid_after_utc
    assert run.tls_not_after == expected
    assert samples(prober.metrics())[(m.TLS_CERT_NOT_AFTER, ())] == expected.timestamp()
    # Caddy's internal CA issues 12-hour leaf certificates: the detail says hours, not days.
    expires = f"expires {expected.astimezone(UTC):%Y-%m-%dT%H:%M:%SZ}"
    assert re.fullmatch(rf"valid for localhost, {expires} \(in 1[12]\.\d hours\)", run.result(Check.TLS).detail)


@pytest.mark.e2e
def test_completion_sends_the_fixed_prompt_for_one_token(gateway: Gateway, upstream: Upstream, key_file: Path) -> None:
    probe(settings_for(gateway, upstream, key_file))

    completions = [r for r in upstream.requests if r["path"] == "/v1/chat/completions"]
    assert [r["body"] for r in completions] == [
        {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 1, "stream": False}
    ]


@pytest.mark.e2e
def test_tls_host_names_the_certificate_when_the_public_url_is_an_address(
    gateway: Gateway, upstream: Upstream, key_file: Path
) -> None:
    by_address = settings_for(gateway, upstream, key_file, public_url=f"https://127.0.0.1:{gateway.port}")
    assert probe(by_address)[0].result(Check.TLS).ok is False  # Caddy has no certificate for a bare address

    run, _ = probe(by_address.model_copy(update={"tls_host": "localhost"}))

    assert run.ok, run.results


# -- failures, each with its reason ----------------------------------------------------------------


@pytest.mark.e2e
def test_certificate_not_chaining_to_the_configured_ca_fails_tls_and_api_checks(
    gateway: Gateway, upstream: Upstream, key_file: Path
) -> None:
    # No ca_file: the system trust store, which does not know Caddy's local CA.
    run, prober = probe(settings_for(gateway, upstream, key_file, ca_file=None))

    for check in (Check.TLS, Check.MODELS, Check.COMPLETION):
        result = run.result(check)
        assert result.ok is False
        assert result.detail.startswith("certificate not trusted: unable to get local issuer certificate"), (
            result.detail
        )
    assert run.result(Check.VLLM_HEALTH).ok is True
    assert (m.TLS_CERT_NOT_AFTER, ()) not in samples(prober.metrics())


@pytest.mark.e2e
def test_missing_ca_file_fails_the_public_checks_naming_the_file(
    gateway: Gateway, upstream: Upstream, key_file: Path, tmp_path: Path
) -> None:
    missing = tmp_path / "no-such-root.crt"

    run, _ = probe(settings_for(gateway, upstream, key_file, ca_file=missing))

    for check in (Check.TLS, Check.MODELS, Check.COMPLETION):
        assert run.result(check).ok is False
        assert run.result(check).detail == f"CA file {missing} not found"


@pytest.mark.e2e
def test_a_run_loads_no_ca_bundle_once_one_is_loaded_and_a_changed_ca_file_is_read_again(
    gateway: Gateway, upstream: Upstream, key_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ca_file = tmp_path / "root.crt"  # absent at first: Caddy writes its local CA after the prober starts
    prober = Prober(settings_for(gateway, upstream, key_file, ca_file=ca_file))
    assert asyncio.run(prober.run_once()).result(Check.TLS).detail == f"CA file {ca_file} not found"
    shutil.copy(gateway.root_ca, ca_file)
    assert asyncio.run(prober.run_once()).ok

    # Loading a CA bundle costs ~35 ms of CPU, more than the rest of a run (bench/idle_cpu.py): the
    # next runs reuse the contexts, and each check still makes its own connection and handshake.
    loaded: list[object] = []
    real = ssl.create_default_context
    monkeypatch.setattr(ssl, "create_default_context", lambda *a, **k: loaded.append(k) or real(*a, **k))
    before = len(upstream.requests)
    assert asyncio.run(prober.run_once()).ok
    assert loaded == []
    assert len(upstream.requests) - before == 2  # /v1/models and /v1/chat/completions, through Caddy

    ca_file.write_text("not a certificate\n")  # replaced (a renewed CA): read again on the next run
    run = asyncio.run(prober.run_once())
    assert loaded == [{"cafile": str(ca_file)}]
    assert run.result(Check.TLS).ok is False and run.result(Check.TLS).detail.startswith(f"cannot load CA file {ca_file}")


@pytest.mark.e2e
def test_missing_served_model_fails_the_models_check_naming_what_is_served(
    gateway: Gateway, upstream: Upstream, key_file: Path
) -> None:
    upstream.served = ["other-model"]

    run, _ = probe(settings_for(gateway, upstream, key_file))

    result = run.result(Check.MODELS)
    assert result.ok is False
    assert result.detail == f"model '{MODEL}' is not served (served: other-model)"


@pytest.mark.e2e
def test_rejected_key_fails_the_authenticated_checks_as_http_401(
    gateway: Gateway, upstream: Upstream, key_file: Path
) -> None:
    key_file.write_text("ggk_000000000000_not-the-right-key\n")

    run, _ = probe(settings_for(gateway, upstream, key_file))

    for check in (Check.MODELS, Check.COMPLETION):
        assert run.result(check).ok is False
        assert run.result(check).detail == "HTTP 401: the prober's key was rejected"
    assert run.result(Check.TLS).ok is True


@pytest.mark.e2e
def test_upstream_error_fails_the_completion_with_its_status(
    gateway: Gateway, upstream: Upstream, key_file: Path
) -> None:
    upstream.status = 500

    run, _ = probe(settings_for(gateway, upstream, key_file))

    assert run.result(Check.COMPLETION).ok is False
    assert run.result(Check.COMPLETION).detail == "HTTP 500: Internal Server Error"


@pytest.mark.e2e
def test_slow_upstream_fails_the_api_checks_within_the_timeout(
    gateway: Gateway, upstream: Upstream, key_file: Path
) -> None:
    upstream.delay = SLOW_UPSTREAM_S

    run, _ = probe(settings_for(gateway, upstream, key_file, timeout_seconds=0.5))

    for check in (Check.MODELS, Check.COMPLETION):
        result = run.result(check)
        assert result.ok is False
        assert result.detail == "timed out after 0.5s"
        assert result.seconds < SLOW_UPSTREAM_S - 1


@pytest.mark.e2e
def test_missing_key_file_fails_the_authenticated_checks_without_sending_a_request(
    gateway: Gateway, upstream: Upstream, tmp_path: Path
) -> None:
    missing = tmp_path / "secrets" / "prober_api_key"

    run, _ = probe(settings_for(gateway, upstream, missing))

    for check in (Check.MODELS, Check.COMPLETION):
        assert run.result(check).ok is False
        assert (
            run.result(check).detail
            == f"the prober's key file {missing} is missing: write a client key named prober there"
        )
    assert run.result(Check.TLS).ok is True
    assert upstream.requests == []


@pytest.mark.e2e
def test_vllm_down_fails_the_health_check(gateway: Gateway, upstream: Upstream, key_file: Path) -> None:
    closed = f"http://127.0.0.1:{find_free_port()}/health"

    run, _ = probe(settings_for(gateway, upstream, key_file, vllm_health_url=closed))

    assert run.result(Check.VLLM_HEALTH).ok is False
    assert run.result(Check.VLLM_HEALTH).detail.startswith("cannot connect: ")


# -- GPU ----------------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_gpu_check_is_not_applicable_on_a_host_without_nvidia_gpu(
    gateway: Gateway, upstream: Upstream, key_file: Path
) -> None:
    run, prober = probe(settings_for(gateway, upstream, key_file))

    gpu = run.result(Check.GPU)
    assert gpu.ok is None
    assert gpu.detail.startswith("not applicable: ")
    assert run.ok
    assert success(samples(prober.metrics()), "gpu") is None
    assert not [name for name, _ in samples(prober.metrics()) if name.startswith("gpugate_gpu_")]


@pytest.mark.e2e
def test_gpu_check_fails_when_a_gpu_is_expected_but_none_is_visible(
    gateway: Gateway, upstream: Upstream, key_file: Path
) -> None:
    run, prober = probe(settings_for(gateway, upstream, key_file, expect_gpu=True))

    assert run.result(Check.GPU).ok is False
    assert run.result(Check.GPU).detail.startswith("no GPU visible: ")
    assert success(samples(prober.metrics()), "gpu") == 0


# -- metrics, status and serve ---------------------------------------------------------------------


@pytest.mark.e2e
def test_metrics_show_one_for_each_passing_check_and_zero_for_each_failing_one(
    gateway: Gateway, upstream: Upstream, key_file: Path
) -> None:
    key_file.write_text("ggk_000000000000_not-the-right-key\n")

    _, prober = probe(settings_for(gateway, upstream, key_file))

    values = samples(prober.metrics())
    assert {c: success(values, c) for c in ("vllm_health", "models", "completion", "tls")} == {
        "vllm_health": 1,
        "models": 0,
        "completion": 0,
        "tls": 1,
    }
    assert values[(m.PROBE_DURATION, (("check", "completion"),))] > 0


@pytest.mark.e2e
def test_until_every_check_has_passed_once_the_prober_retries_within_seconds_then_keeps_its_interval(
    gateway: Gateway, upstream: Upstream, key_file: Path
) -> None:
    # `gpugate up` waits for the first all-green run: a gateway that has just become healthy is seen
    # within seconds, not up to an interval later. A gateway that fails after that is not probed harder.
    upstream.status = 503  # vLLM still starting
    prober = Prober(settings_for(gateway, upstream, key_file, interval_seconds=60))

    def completions() -> int:
        return sum(r["path"] == "/v1/chat/completions" for r in upstream.requests)

    async def scenario() -> tuple[float, int, int]:
        task = asyncio.create_task(prober.run_forever())
        await asyncio.sleep(0.5)
        assert prober.last is not None and not prober.last.ok
        upstream.status = None
        started = time.monotonic()
        while not (prober.last and prober.last.ok) and time.monotonic() - started < 10:
            await asyncio.sleep(0.05)
        green_after = time.monotonic() - started
        upstream.status = 503  # fails again: the next run is an interval away
        before = completions()
        await asyncio.sleep(4)
        task.cancel()
        return green_after, before, completions()

    green_after, before, after = asyncio.run(scenario())

    assert green_after < 3.5
    assert before >= 2 and after == before


@pytest.mark.e2e
def test_neither_the_key_nor_the_reply_appears_in_logs_or_output(
    gateway: Gateway, upstream: Upstream, key_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    settings = settings_for(gateway, upstream, key_file)
    prober = Prober(settings)

    first = asyncio.run(prober.run_once())
    upstream.status = 401  # a failing run logs its reasons
    second = asyncio.run(prober.run_once())

    exposed = "\n".join([caplog.text, first.model_dump_json(), second.model_dump_json(), prober.metrics().decode()])
    assert "check models failed" in caplog.text  # the log is not empty: it says what failed
    assert KEY not in exposed
    assert "prober-secret" not in exposed
    assert REPLY not in exposed


def write_env_file(path: Path, settings: dict[str, Any]) -> Path:
    lines = [
        "# rendered by gpugate: several services share this file",
        "GPUGATE_AUTHZ_PORT=18001",
        "GPUGATE_AUTHZ_KEY_STORE=/var/lib/gpugate/keys.json",
        *(f"GPUGATE_PROBER_{name.upper()}={value}" for name, value in settings.items()),
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def env_settings(gateway: Gateway, upstream: Upstream, key_file: Path, **changes: Any) -> dict[str, Any]:
    return {
        "public_url": gateway.url,
        "model": MODEL,
        "vllm_health_url": upstream.health_url,
        "key_file": key_file,
        "ca_file": gateway.root_ca,
        "timeout_seconds": 5,
        **changes,
    }


@pytest.mark.e2e
@pytest.mark.parametrize(("key", "exit_code"), [(KEY, 0), ("ggk_000000000000_wrong", 1)], ids=["all-pass", "one-fails"])
def test_status_exits_zero_only_when_every_applicable_check_passes(
    gateway: Gateway, upstream: Upstream, key_file: Path, tmp_path: Path, key: str, exit_code: int
) -> None:
    key_file.write_text(key)
    env_path = write_env_file(tmp_path / "gpugate.env", env_settings(gateway, upstream, key_file))

    result = CliRunner().invoke(app, ["status", "--json"], env={"GPUGATE_ENV_FILE": str(env_path)})

    assert result.exit_code == exit_code, result.output
    run = ProbeRun.model_validate_json(result.stdout)
    assert run.result(Check.GPU).ok is None
    assert run.ok is (exit_code == 0)


@pytest.mark.e2e
def test_status_table_shows_each_check_with_its_outcome(
    gateway: Gateway, upstream: Upstream, key_file: Path, tmp_path: Path
) -> None:
    upstream.served = ["other-model"]
    env_path = write_env_file(tmp_path / "gpugate.env", env_settings(gateway, upstream, key_file))

    result = CliRunner().invoke(app, ["status"], env={"GPUGATE_ENV_FILE": str(env_path), "COLUMNS": "200"})

    assert result.exit_code == 1, result.output
    rows = {line.split("│")[1].strip(): line for line in result.stdout.splitlines() if line.count("│") == 5}
    assert set(rows) == {"vllm_health", "models", "completion", "tls", "gpu"}
    assert "FAIL" in rows["models"] and "is not served (served: other-model)" in rows["models"]
    assert " ok " in rows["completion"]
    assert "n/a" in rows["gpu"]
    assert KEY not in result.output and REPLY not in result.output


def test_status_refuses_a_plain_http_public_url_with_exit_2(tmp_path: Path) -> None:
    env_path = tmp_path / "gpugate.env"
    env_path.write_text("GPUGATE_PROBER_PUBLIC_URL=http://gateway.example\nGPUGATE_PROBER_MODEL=m\n")

    result = CliRunner().invoke(app, ["status"], env={"GPUGATE_ENV_FILE": str(env_path)})

    assert result.exit_code == 2
    assert "public_url must be https://" in result.output


@pytest.mark.e2e
def test_serve_exports_metrics_and_status_with_settings_from_the_env_file(
    gateway: Gateway, upstream: Upstream, key_file: Path, tmp_path: Path
) -> None:
    port = find_free_port()
    env_path = write_env_file(
        tmp_path / "gpugate.env", env_settings(gateway, upstream, key_file, port=port, interval_seconds=0.5)
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUGATE_")} | {"GPUGATE_ENV_FILE": str(env_path)}
    log_path = tmp_path / "prober.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "gpugate_runtime", "prober", "serve"],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        values: dict = {}
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        with httpx.Client(timeout=2, trust_env=False) as client:
            while success(values, "completion") != 1:
                assert process.poll() is None, log_path.read_text()
                assert time.monotonic() < deadline, f"no passing completion in /metrics:\n{log_path.read_text()}"
                time.sleep(0.2)
                try:
                    values = samples(client.get(f"{base}/metrics").text)
                except httpx.TransportError:
                    continue
            status = client.get(f"{base}/status")
            missing = client.get(f"{base}/nope")
        assert {c: success(values, c) for c in ("vllm_health", "models", "completion", "tls", "gpu")} == {
            "vllm_health": 1,
            "models": 1,
            "completion": 1,
            "tls": 1,
            "gpu": None,
        }
        assert status.status_code == 200
        assert ProbeRun.model_validate_json(status.text).ok
        assert missing.status_code == 404
    finally:
        process.terminate()
        process.wait(timeout=10)
    assert KEY not in log_path.read_text()

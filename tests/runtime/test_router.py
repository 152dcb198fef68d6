"""The router against real loopback HTTP servers: policies, scopes, fallback before the first byte, the
model rewrite, the route header, streams passed through unbuffered, and the route log's fields.

The upstreams here are small OpenAI-shaped servers on loopback (the e2e tests put real vLLM processes
in their place); the router runs in its real uvicorn server, reached over real HTTP.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from gpugate_runtime.contract.host import KEY_ID_HEADER, REQUEST_ID_HEADER
from gpugate_runtime.contract.routing import (
    KEY_SCOPE_HEADER,
    ROUTE_HEADER,
    ROUTE_POLICY_HEADER,
    KeyScope,
    RoutePolicy,
    RouteRecord,
)
from gpugate_runtime.quietserver import loopback_server
from gpugate_runtime.router import Router
from gpugate_runtime.routetable import ModelRoute, ProviderRoute, Route, Routes, RouteTable, TierRoute

# Every test here runs the router and its upstreams as loopback servers: not part of the service-free fast subset.
pytestmark = pytest.mark.e2e

VLLM_KEY = "internal-vllm-key"
PROVIDER_KEY = "sk-provider-secret"
CANARY = "canary-7f3e1c prompt text that must never be logged"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class OpenAIUpstream:
    """A real HTTP server answering chat completions like vLLM does: usage in the answer, SSE streams
    with a usage-only final chunk when `stream_options.include_usage` is asked. `status` makes it fail;
    `gate` holds a stream after its first chunk until set."""

    def __init__(self, name: str, key: str, port: int | None = None) -> None:
        self.name, self.key = name, key
        self.port = port or free_port()
        self.requests: list[dict[str, Any]] = []
        self.status: int | None = None
        self.gate = threading.Event()
        self.gate.set()
        self._server: ThreadingHTTPServer | None = None

    def start(self) -> None:
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, status: int, payload: Any) -> None:
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _chunk(self, data: bytes) -> None:
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()

            def do_GET(self) -> None:
                self._send(200 if upstream.status is None else upstream.status, {})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                seen = {"path": self.path, "body": body, "authorization": self.headers.get("Authorization")}
                seen |= {"scope": self.headers.get(KEY_SCOPE_HEADER), "key_id": self.headers.get(KEY_ID_HEADER)}
                upstream.requests.append(seen)
                if upstream.status is not None:
                    self._send(upstream.status, {"error": {"message": "failing on purpose"}})
                    return
                if self.headers.get("Authorization") != f"Bearer {upstream.key}":
                    self._send(401, {"error": {"message": "bad key"}})
                    return
                usage = {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}
                if not body.get("stream"):
                    message = {"role": "assistant", "content": f"from {upstream.name}"}
                    answer = {"object": "chat.completion", "model": body["model"], "usage": usage}
                    self._send(200, {**answer, "choices": [{"index": 0, "message": message}]})
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for i in range(3):
                    self._chunk(f'data: {{"choices":[{{"index":0,"delta":{{"content":"t{i}"}}}}]}}\n\n'.encode())
                    if i == 0:
                        upstream.gate.wait(10)
                if (body.get("stream_options") or {}).get("include_usage"):
                    self._chunk(f'data: {{"choices":[],"usage":{json.dumps(usage)}}}\n\n'.encode())
                self._chunk(b"data: [DONE]\n\n")
                self._chunk(b"")

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class RunningRouter:
    def __init__(self, router: Router, port: int, log_file: Path) -> None:
        self.router, self.port, self.log_file = router, port, log_file
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10)

    def chat(self, model: str, scope: KeyScope | None = None, policy: str | None = None, **body: Any) -> httpx.Response:
        headers = {REQUEST_ID_HEADER: f"req-{time.monotonic_ns()}", KEY_ID_HEADER: "key-1", "Authorization": f"Bearer {VLLM_KEY}"}
        if scope is not None:
            headers[KEY_SCOPE_HEADER] = scope.to_header()
        if policy is not None:
            headers[ROUTE_POLICY_HEADER] = policy
        payload = {"model": model, "messages": [{"role": "user", "content": CANARY}], **body}
        return self.http.post("/v1/chat/completions", json=payload, headers=headers)

    def records(self) -> list[RouteRecord]:
        return [RouteRecord.from_json(line) for line in self.log_file.read_text().splitlines()]

    def metrics(self) -> str:
        return self.http.get("/metrics").text


@pytest.fixture
def upstreams() -> Iterator[dict[str, OpenAIUpstream]]:
    servers = {"general": OpenAIUpstream("general", VLLM_KEY), "fast": OpenAIUpstream("fast", VLLM_KEY),
               "cloud": OpenAIUpstream("cloud", PROVIDER_KEY)}  # fmt: skip
    for server in servers.values():
        server.start()
    yield servers
    for server in servers.values():
        server.stop()


@pytest.fixture
def gateway(tmp_path: Path, upstreams: dict[str, OpenAIUpstream]) -> Iterator[RunningRouter]:
    (tmp_path / "vllm_api_key").write_text(VLLM_KEY + "\n")
    (tmp_path / "provider_cloud_api_key").write_text(PROVIDER_KEY + "\n")
    table = RouteTable(
        default_policy=RoutePolicy.LOCAL_FIRST,
        tiers={
            "general": TierRoute(url=upstreams["general"].url, served_name="general"),
            "fast": TierRoute(url=upstreams["fast"].url, served_name="fast"),
        },  # fmt: skip
        providers={
            "cloud": ProviderRoute(
                base_url=upstreams["cloud"].url + "/v1",
                key_file=tmp_path / "provider_cloud_api_key",
                models={"general": "cloud-large", "fast": "cloud-small"},
                input_usd_per_mtok=1.0,
                output_usd_per_mtok=4.0,
            )  # fmt: skip
        },
        models={"general": ModelRoute(tier="general", provider="cloud"), "fast": ModelRoute(tier="fast")},
        first_byte_timeout_seconds=5,
        hold_down_seconds=0.3,
        probe_interval_seconds=0.1,
        retry_after_seconds=7,
    )
    log_file = tmp_path / "logs" / "route.log"
    router = Router(table, log_file, tmp_path / "vllm_api_key")
    port = free_port()
    server = loopback_server(router, port, "warning")
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "the router did not start"
        time.sleep(0.01)
    running = RunningRouter(router, port, log_file)
    yield running
    running.http.close()
    server.handle_exit(signal.SIGTERM, None)  # wakes its loop at once (should_exit waits for a 1 s tick)
    thread.join(10)
    assert not thread.is_alive()


def test_local_first_is_answered_by_the_local_tier_with_the_internal_key(
    gateway: RunningRouter, upstreams: dict[str, OpenAIUpstream]
) -> None:
    answer = gateway.chat("general")
    assert answer.status_code == 200
    assert answer.headers[ROUTE_HEADER] == "tier:general"
    assert answer.json()["choices"][0]["message"]["content"] == "from general"
    (seen,) = upstreams["general"].requests
    assert seen["authorization"] == f"Bearer {VLLM_KEY}" and seen["body"]["model"] == "general"
    assert seen["scope"] is None and seen["key_id"] is None, "identity and scope headers stay at the router"
    assert upstreams["cloud"].requests == []
    (record,) = gateway.records()
    assert (record.route, record.status, record.fallback, record.policy) == ("tier:general", 200, False, "local-first")
    assert (record.input_tokens, record.output_tokens, record.cost_usd, record.key_id) == (11, 3, 0.0, "key-1")


def test_a_refused_connection_to_the_tier_falls_back_to_the_provider_with_its_model_and_key(
    gateway: RunningRouter, upstreams: dict[str, OpenAIUpstream]
) -> None:
    upstreams["general"].stop()
    started = time.monotonic()
    answer = gateway.chat("general")
    assert time.monotonic() - started < 2
    assert answer.status_code == 200 and answer.headers[ROUTE_HEADER] == "provider:cloud"
    (seen,) = upstreams["cloud"].requests
    assert seen["body"]["model"] == "cloud-large" and seen["authorization"] == f"Bearer {PROVIDER_KEY}"
    assert PROVIDER_KEY not in str(answer.headers) and PROVIDER_KEY not in answer.text
    (record,) = gateway.records()
    assert (record.route, record.fallback) == ("provider:cloud", True)
    assert record.cost_usd == pytest.approx((11 * 1.0 + 3 * 4.0) / 1e6)
    metrics = gateway.metrics()
    assert (
        'gpugate_route_fallbacks_total{from_route="tier:general",policy="local-first",to_route="provider:cloud"} 1.0' in metrics
    )
    assert 'gpugate_route_tier_up{tier="general"} 0.0' in metrics


@pytest.mark.parametrize("status", [503, 429])
def test_a_5xx_or_429_from_the_tier_falls_back_before_the_first_byte(
    gateway: RunningRouter, upstreams: dict[str, OpenAIUpstream], status: int
) -> None:
    upstreams["general"].status = status
    answer = gateway.chat("general")
    assert answer.status_code == 200 and answer.headers[ROUTE_HEADER] == "provider:cloud"
    assert len(upstreams["general"].requests) == 1
    reason = "status_429" if status == 429 else "status_5xx"
    assert f'gpugate_route_errors_total{{reason="{reason}",route="tier:general"}} 1.0' in gateway.metrics()


def test_local_only_never_leaves_and_answers_503_with_retry_after_when_the_tier_is_down(
    gateway: RunningRouter, upstreams: dict[str, OpenAIUpstream]
) -> None:
    upstreams["general"].stop()
    answer = gateway.chat("general", policy="local-only")
    assert answer.status_code == 503
    assert answer.headers["Retry-After"] == "7"
    assert "local-only" in answer.json()["error"]["message"] and "general" in answer.json()["error"]["message"]
    assert upstreams["cloud"].requests == []
    (record,) = gateway.records()
    assert (record.route, record.status, record.policy) == ("none", 503, "local-only")


def test_traffic_returns_to_the_tier_once_its_health_answers_again(
    gateway: RunningRouter, upstreams: dict[str, OpenAIUpstream]
) -> None:
    upstreams["general"].stop()
    assert gateway.chat("general").headers[ROUTE_HEADER] == "provider:cloud"
    held = gateway.chat("general", policy="local-only")
    assert held.status_code == 503, "while held down the tier is not even tried"
    upstreams["general"] = restarted = OpenAIUpstream("general", VLLM_KEY, port=upstreams["general"].port)
    restarted.start()
    deadline = time.monotonic() + 5
    while gateway.router.routes.down_until:
        assert time.monotonic() < deadline, "the probe never found the tier healthy"
        time.sleep(0.05)
    answer = gateway.chat("general")
    assert answer.headers[ROUTE_HEADER] == "tier:general"
    assert 'gpugate_route_tier_up{tier="general"} 1.0' in gateway.metrics()


def test_cloud_first_asks_the_provider_first(gateway: RunningRouter, upstreams: dict[str, OpenAIUpstream]) -> None:
    answer = gateway.chat("general", policy="cloud-first")
    assert answer.headers[ROUTE_HEADER] == "provider:cloud"
    assert upstreams["general"].requests == []


def test_a_policy_outside_the_keys_scope_is_refused_naming_it(
    gateway: RunningRouter, upstreams: dict[str, OpenAIUpstream]
) -> None:
    pinned = KeyScope(family="fam-1", default_policy=RoutePolicy.LOCAL_ONLY, policies=(RoutePolicy.LOCAL_ONLY,))
    answer = gateway.chat("general", scope=pinned, policy="cloud-first")
    assert answer.status_code == 403
    assert "cloud-first" in answer.json()["error"]["message"]
    assert answer.json()["error"]["code"] == "route_policy_not_allowed"
    assert all(not u.requests for u in upstreams.values())
    (record,) = gateway.records()
    assert (record.family, record.status) == ("fam-1", 403)


def test_a_model_outside_the_scope_is_403_and_an_unknown_model_404(gateway: RunningRouter) -> None:
    scoped = KeyScope(family="fam-2", models=("fast",))
    refused = gateway.chat("general", scope=scoped)
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "model_not_allowed"
    unknown = gateway.chat("no-such-model")
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
    assert gateway.chat("fast", scope=scoped).headers[ROUTE_HEADER] == "tier:fast"


def test_the_keys_default_policy_applies_without_a_header(gateway: RunningRouter, upstreams: dict[str, OpenAIUpstream]) -> None:
    answer = gateway.chat("general", scope=KeyScope(family="f", default_policy=RoutePolicy.CLOUD_FIRST))
    assert answer.headers[ROUTE_HEADER] == "provider:cloud"


def test_a_stream_passes_through_unbuffered_and_its_usage_is_counted_but_not_added(
    gateway: RunningRouter, upstreams: dict[str, OpenAIUpstream]
) -> None:
    upstreams["general"].gate.clear()
    headers = {REQUEST_ID_HEADER: "req-stream-1", KEY_ID_HEADER: "key-1"}
    body = {"model": "general", "stream": True, "messages": [{"role": "user", "content": CANARY}]}
    with gateway.http.stream("POST", "/v1/chat/completions", json=body, headers=headers) as stream:
        assert stream.headers[ROUTE_HEADER] == "tier:general"
        lines = stream.iter_lines()
        first = next(line for line in lines if line)
        assert '"t0"' in first, "the first chunk arrives while the upstream still holds the rest"
        upstreams["general"].gate.set()
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]"
    assert not any('"usage"' in line for line in rest), "the usage chunk the router asked for is not the client's"
    assert upstreams["general"].requests[0]["body"]["stream_options"] == {"include_usage": True}
    (record,) = gateway.records()
    assert (record.input_tokens, record.output_tokens) == (11, 3)
    assert record.ttft_ms is not None and record.ttft_ms < record.latency_ms


def test_a_client_that_asks_for_usage_in_a_stream_gets_it(gateway: RunningRouter) -> None:
    body = {
        "model": "fast",
        "stream": True,
        "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": "hi"}],
    }
    answer = gateway.http.post("/v1/chat/completions", json=body)
    assert any('"usage"' in line for line in answer.text.splitlines())


def test_the_route_log_is_owner_only_and_holds_no_content(gateway: RunningRouter, upstreams: dict[str, OpenAIUpstream]) -> None:
    gateway.chat("general")
    upstreams["general"].stop()
    gateway.chat("general")
    assert stat.S_IMODE(os.stat(gateway.log_file).st_mode) == 0o600
    text = gateway.log_file.read_text()
    assert len(text.splitlines()) == 2
    assert CANARY not in text and "from general" not in text and PROVIDER_KEY not in text


def test_models_lists_every_public_model(gateway: RunningRouter) -> None:
    listed = gateway.http.get("/v1/models").json()
    assert [m["id"] for m in listed["data"]] == ["fast", "general"]


def test_cost_optimized_prefers_the_provider_only_when_the_tier_misses_the_latency_objective(tmp_path: Path) -> None:
    table = RouteTable(
        tiers={"general": TierRoute(url="http://127.0.0.1:1", served_name="general")},
        providers={
            "cloud": ProviderRoute(
                base_url="http://127.0.0.1:2/v1",
                key_file=tmp_path / "k",
                models={"general": "big"},
                input_usd_per_mtok=1,
                output_usd_per_mtok=1,
            )
        },  # fmt: skip
        models={"general": ModelRoute(tier="general", provider="cloud")},
    )
    routes = Routes(table)
    local, remote = Route("tier", "general", "general"), Route("provider", "cloud", "big")
    assert routes.plan("general", RoutePolicy.COST_OPTIMIZED, 500) == [local, remote], "unmeasured: the free route first"
    for _ in range(20):
        routes.observe_ttft(local, 2.0)
        routes.observe_ttft(remote, 0.2)
    assert routes.plan("general", RoutePolicy.COST_OPTIMIZED, 500) == [remote, local]
    assert routes.plan("general", RoutePolicy.COST_OPTIMIZED, 5000) == [local, remote]
    assert routes.plan("general", RoutePolicy.LOCAL_ONLY, 500) == [local]


def test_a_provider_without_its_key_file_is_skipped_not_crashed_on(
    gateway: RunningRouter, upstreams: dict[str, OpenAIUpstream]
) -> None:
    gateway.router.routes.table.providers["cloud"].key_file.unlink()
    upstreams["general"].stop()
    answer = gateway.chat("general")
    assert answer.status_code == 503 and answer.json()["error"]["code"] == "route_unavailable"
    assert 'gpugate_route_errors_total{reason="no_key",route="provider:cloud"} 1.0' in gateway.metrics()
    assert upstreams["cloud"].requests == []


def test_caddys_placeholder_for_a_scope_authz_did_not_send_means_no_scope(gateway: RunningRouter) -> None:
    # Caddy 2.6 copies `{http.reverse_proxy.header.X-Gpugate-Key-Scope}` literally when authz sends no scope
    headers = {KEY_SCOPE_HEADER: "{http.reverse_proxy.header.X-Gpugate-Key-Scope}", KEY_ID_HEADER: "key-9"}
    answer = gateway.http.post("/v1/chat/completions", json={"model": "general", "messages": []}, headers=headers)
    assert answer.status_code == 200 and answer.headers[ROUTE_HEADER] == "tier:general"
    (record,) = gateway.records()
    assert (record.family, record.policy) == ("key-9", "local-first")


def test_requests_sent_past_a_held_down_tier_count_as_fallbacks(
    gateway: RunningRouter, upstreams: dict[str, OpenAIUpstream]
) -> None:
    upstreams["general"].stop()
    gateway.chat("general")  # refused: the tier is held down
    second = gateway.chat("general")  # not even tried
    assert second.headers[ROUTE_HEADER] == "provider:cloud"
    assert [r.fallback for r in gateway.records()] == [True, True]
    assert (
        'gpugate_route_fallbacks_total{from_route="tier:general",policy="local-first",to_route="provider:cloud"} 2.0'
        in gateway.metrics()
    )

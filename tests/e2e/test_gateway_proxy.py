"""The gateway end to end: rendered Caddyfile on real Caddy, real authz, a stub vLLM that records what reaches it."""

from __future__ import annotations

import json
import re
import socket
import ssl
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest

from gpugate_runtime.contract import metrics as metricnames
from gpugate_runtime.contract.host import KEY_ID_HEADER, REQUEST_ID_HEADER
from gpugate_runtime.keys import read_store, revoke_key, rotate_key, utcnow, write_store
from tests.e2e.gateway_fixtures import HOSTNAME, INTERNAL_KEY, Gateway, running_gateway, wait_until
from tests.e2e.paths import NON_CANONICAL
from tests.e2e.paths import raw_https as raw_request

pytestmark = pytest.mark.e2e

CANARY = "CANARY-5f2b8e-prompt-text-that-must-never-be-logged"
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with running_gateway(tmp_path_factory.mktemp("gateway")) as running:
        yield running


@pytest.fixture
def client(gateway: Gateway) -> Iterator[httpx.Client]:
    with gateway.client() as opened:
        yield opened


_sequence = iter(range(1_000_000))


def rid(label: str) -> str:
    return f"e2e-{label}-{next(_sequence):06d}"


def chat(gateway: Gateway, client: httpx.Client, token: str | None, request_id: str, body: dict | None = None, **headers: str) -> httpx.Response:
    sent = {REQUEST_ID_HEADER: request_id, **headers}
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    payload = body or {"model": "stub", "messages": [{"role": "user", "content": "hello"}]}
    return gateway.request(client, "POST", "/v1/chat/completions", json=payload, headers=sent)


def raw_https(gateway: Gateway, request: bytes) -> bytes:
    """Send bytes exactly as given (httpx would normalise a path like /v1/../metrics)."""
    context = ssl.create_default_context(cafile=str(gateway.ca_file))
    with socket.create_connection(("127.0.0.1", gateway.https_port), timeout=10) as plain:
        with context.wrap_socket(plain, server_hostname=HOSTNAME) as tls:
            tls.sendall(request)
            chunks = []
            while chunk := tls.recv(65536):
                chunks.append(chunk)
    return b"".join(chunks)


def access_entries(gateway: Gateway) -> list[dict]:
    return [json.loads(line) for line in gateway.access_log.read_text().splitlines() if line.strip()]


# --- keys at the proxy ----------------------------------------------------------------------------


def test_valid_key_reaches_vllm_with_the_internal_key_and_authz_key_id_only(gateway: Gateway, client: httpx.Client) -> None:
    # given a client key
    key = gateway.new_key("valid")
    request_id = rid("valid")
    # when a chat completion is sent with it
    response = chat(gateway, client, key.token, request_id)
    # then it is answered, and vLLM saw the internal key and the key id, never the client key
    assert response.status_code == 200
    (seen,) = gateway.upstream.seen_with(request_id)
    assert seen.authorization == f"Bearer {INTERNAL_KEY}"
    assert seen.key_id == key.record.id
    assert key.token not in (seen.authorization or "")


@pytest.mark.parametrize("case", ["missing", "malformed", "unknown", "revoked", "expired"])
def test_refused_key_gets_401_and_vllm_sees_nothing(gateway: Gateway, client: httpx.Client, case: str) -> None:
    # given a key that must not pass
    token = {
        "missing": lambda: None,
        "malformed": lambda: "sk-not-ours",
        "unknown": lambda: "ggk_" + "0" * 12 + "_" + "a" * 64,
        "revoked": lambda: _revoked(gateway),
        "expired": lambda: gateway.new_key("expired", now=utcnow() - timedelta(days=2), expires=timedelta(days=1)).token,
    }[case]()
    request_id = rid(case)
    # when it is used
    response = chat(gateway, client, token, request_id)
    # then the client gets an OpenAI-style 401 and vLLM never hears of the request
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"
    assert gateway.upstream.seen_with(request_id) == []


def _revoked(gateway: Gateway) -> str:
    key = gateway.new_key("revoked")
    revoke_key(gateway.layout.key_store, key.record.id)
    # authz may have loaded the key before it was revoked; the revocation reaches it within a reload.
    with gateway.client() as client:
        wait_until(lambda: chat(gateway, client, key.token, rid("revoking")).status_code == 401, 2, what="revocation")
    return key.token


def test_key_over_its_rpm_gets_429_with_retry_after(gateway: Gateway, client: httpx.Client) -> None:
    key = gateway.new_key("rpm-3", rpm=3)
    request_ids = [rid("rpm") for _ in range(4)]
    statuses = [chat(gateway, client, key.token, r).status_code for r in request_ids[:3]]
    refused = chat(gateway, client, key.token, request_ids[3])
    assert statuses == [200, 200, 200]
    assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert gateway.upstream.seen_with(request_ids[3]) == []


def test_concurrency_limit_refuses_the_extra_request_and_frees_the_slot_when_one_ends(gateway: Gateway) -> None:
    # given a key allowed 2 requests in flight, and 2 requests held open by vLLM
    key = gateway.new_key("conc-2", max_concurrent=2)
    held = [rid("held") for _ in range(2)]
    results: list[int] = []
    gateway.upstream.hold()

    def send(request_id: str) -> None:
        with gateway.client() as own:
            results.append(chat(gateway, own, key.token, request_id, {"hold": 10}).status_code)

    threads = [threading.Thread(target=send, args=(r,)) for r in held]
    try:
        for t in threads:
            t.start()
        wait_until(lambda: all(gateway.upstream.seen_with(r) for r in held), 5, what="both held requests at vLLM")
        # when a third request comes / then it is refused and never reaches vLLM
        with gateway.client() as third_client:
            third_id = rid("third")
            third = chat(gateway, third_client, key.token, third_id)
            assert third.status_code == 429 and third.headers["Retry-After"] == "1"
            assert gateway.upstream.seen_with(third_id) == []
            # when the held requests end / then the key gets its slots back from Caddy's access log
            gateway.upstream.release()
            for t in threads:
                t.join(timeout=10)
            assert results == [200, 200]
            started = time.monotonic()
            fourth = chat(gateway, third_client, key.token, rid("fourth"))
            assert fourth.status_code == 200 and time.monotonic() - started < 1
    finally:
        gateway.upstream.release()
        for t in threads:
            t.join(timeout=10)


def test_back_to_back_requests_at_max_concurrent_1_are_never_refused(gateway: Gateway, client: httpx.Client) -> None:
    # The slot comes back through Caddy's access log as each request ends, in time for the next.
    key = gateway.new_key("serial", max_concurrent=1)
    statuses = [chat(gateway, client, key.token, rid("serial")).status_code for _ in range(25)]
    assert statuses == [200] * 25


def test_rotation_under_load_fails_no_request_of_either_key(gateway: Gateway) -> None:
    # given 8 clients busy with a key
    old = gateway.new_key("rotating", rpm=1_000_000, max_concurrent=64)
    new: dict[str, str] = {}
    rotated = threading.Event()
    outcomes = {"old": Counter(), "new": Counter()}
    lock = threading.Lock()
    stop_at = time.monotonic() + 3.0

    def client_loop(which: str) -> None:
        if which == "new" and not rotated.wait(timeout=5):
            return
        token = old.token if which == "old" else new["token"]
        with gateway.client() as own:
            while time.monotonic() < stop_at:
                try:
                    status = chat(gateway, own, token, rid(which)).status_code
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                with lock:
                    outcomes[which][status] += 1

    threads = [threading.Thread(target=client_loop, args=(w,)) for w in ["old"] * 8 + ["new"] * 8]
    for t in threads:
        t.start()
    # when the key is rotated a second into it, and 8 more clients start with the new key at once
    time.sleep(1.0)
    rotation = rotate_key(gateway.layout.key_store, "rotating", overlap=timedelta(hours=1), expires=timedelta(days=1))
    new["token"] = rotation.issued.token
    rotated.set()
    for t in threads:
        t.join(timeout=15)
    # then every request of both keys was answered 200
    assert set(outcomes["old"]) == {200} and outcomes["old"][200] > 50, outcomes
    assert set(outcomes["new"]) == {200} and outcomes["new"][200] > 50, outcomes


def test_revoked_key_is_rejected_within_two_seconds(gateway: Gateway, client: httpx.Client) -> None:
    key = gateway.new_key("to-revoke")
    assert chat(gateway, client, key.token, rid("pre-revoke")).status_code == 200
    revoked_at = time.monotonic()
    revoke_key(gateway.layout.key_store, key.record.id)
    wait_until(lambda: chat(gateway, client, key.token, rid("post-revoke")).status_code == 401, 2, what="revocation")
    assert time.monotonic() - revoked_at < 2


def test_corrupt_store_keeps_serving_previous_keys_and_counts_the_failure(gateway: Gateway, client: httpx.Client) -> None:
    # given a served key
    key = gateway.new_key("survivor")
    assert chat(gateway, client, key.token, rid("survivor")).status_code == 200
    store = gateway.layout.key_store
    good = read_store(store)
    failures = gateway.metric(metricnames.KEYSTORE_RELOAD_FAILURES)
    try:
        # when someone leaves a broken store behind
        store.write_text('{"version": 1, "keys": [')
        wait_until(lambda: gateway.metric(metricnames.KEYSTORE_RELOAD_FAILURES) == failures + 1, 3, what="failure count")
        # then the key still works
        assert chat(gateway, client, key.token, rid("survivor")).status_code == 200
    finally:
        write_store(store, good)


# --- what reaches vLLM ----------------------------------------------------------------------------


def test_spoofed_identity_headers_do_not_reach_vllm(gateway: Gateway, client: httpx.Client) -> None:
    # given a valid key and a client that also claims another key id and a tiny body
    key = gateway.new_key("spoofer")
    allowed_id, refused_id, health_id = rid("spoof-ok"), rid("spoof-no"), rid("spoof-health")
    spoof = {KEY_ID_HEADER: "ffffffffffff", "X-Gpugate-Content-Length": "1"}
    # when it sends requests with and without its key, and to the public health check
    allowed = chat(gateway, client, key.token, allowed_id, **spoof)
    refused = chat(gateway, client, None, refused_id, **spoof)
    health = gateway.request(client, "GET", "/healthz", headers={REQUEST_ID_HEADER: health_id, **spoof})
    # then vLLM sees authz's key id only, nothing of the keyless request, no id on the health check,
    # and the access log (which gives slots back) credits no request to the claimed key
    assert (allowed.status_code, refused.status_code, health.status_code) == (200, 401, 200)
    (seen,) = gateway.upstream.seen_with(allowed_id)
    assert seen.key_id == key.record.id
    assert gateway.upstream.seen_with(refused_id) == []
    (seen_health,) = gateway.upstream.seen_with(health_id)
    assert seen_health.key_id is None
    logged = {e["key_and_request_id"] for e in access_entries(gateway)}
    assert {f"- {refused_id}", f"- {health_id}"} <= logged
    assert not any(entry.startswith("ffffffffffff") for entry in logged)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/metrics"),
        ("POST", "/v1/load_lora_adapter"),
        ("POST", "/v1/unload_lora_adapter"),
        ("GET", "/docs"),
        ("GET", "/health"),
        ("POST", "/tokenize"),
        ("POST", "/detokenize"),
    ],
)
def test_internal_endpoints_are_404_even_with_a_valid_key(gateway: Gateway, method: str, path: str) -> None:
    key = gateway.new_key(f"prober-{abs(hash(path)) % 10**8}")
    request_id = rid("internal")
    response = raw_https(
        gateway,
        f"{method} {path} HTTP/1.1\r\nHost: {HOSTNAME}\r\nAuthorization: Bearer {key.token}\r\n"
        f"{REQUEST_ID_HEADER}: {request_id}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode(),
    )
    assert response.startswith(b"HTTP/1.1 404"), response[:200]
    assert gateway.upstream.seen_with(request_id) == []


@pytest.mark.parametrize(
    "path",
    [
        *NON_CANONICAL,
        "/openapi.json",  # private, and a dot is never canonical: 400 rather than 404
        "/v1/models/../../metrics",
        "/v1/%2e%2e/metrics",
        "/v1/chat/completions/../../load_lora_adapter",
    ],
)
def test_non_canonical_paths_get_json_400_before_authz_and_vllm_sees_nothing(gateway: Gateway, path: str) -> None:
    # given a valid key and a path that is not in canonical form (most clean to /v1/models)
    key = gateway.new_key(f"path-prober-{abs(hash(path)) % 10**8}")
    request_id = rid("non-canonical")
    # when it is sent byte for byte
    context = ssl.create_default_context(cafile=str(gateway.ca_file))
    response = raw_request(
        gateway.https_port, HOSTNAME, context, "GET", path,
        {"Authorization": f"Bearer {key.token}", REQUEST_ID_HEADER: request_id},
    )
    # then Caddy refuses it with the JSON 400 ...
    assert response.status == 400, (response.status, response.body[:200])
    assert json.loads(response.body)["error"]["code"] == "non_canonical_path"
    # ... the stub vLLM never saw it, and authz was not asked (no key id in the access log)
    assert gateway.upstream.seen_with(request_id) == []
    entry = wait_until(
        lambda: next((e for e in access_entries(gateway) if e["key_and_request_id"].endswith(request_id)), None),
        2,
        what="the access-log entry",
    )
    assert entry["key_and_request_id"] == f"- {request_id}"
    # ... and the path arrived as sent: no client or proxy normalised it on the way
    assert entry["request"]["uri"] == path


@pytest.mark.parametrize("path", NON_CANONICAL)
def test_non_canonical_paths_over_http2_get_the_same_400(gateway: Gateway, path: str, tmp_path: Path) -> None:
    # given curl speaking HTTP/2 with --path-as-is (it sends the path unchanged), the key in a header file
    key = gateway.new_key(f"h2-prober-{abs(hash(path)) % 10**8}")
    request_id = rid("h2")
    headers = tmp_path / "headers"
    headers.write_text(f"Authorization: Bearer {key.token}\n{REQUEST_ID_HEADER}: {request_id}\n")
    url = f"https://{HOSTNAME}:{gateway.https_port}"
    done = subprocess.run(
        ["curl", "-sS", "--http2", "--path-as-is", "--cacert", str(gateway.ca_file),
         "--resolve", f"{HOSTNAME}:{gateway.https_port}:127.0.0.1", "-H", f"@{headers}",
         "-o", str(tmp_path / "body"), "-w", "%{http_version} %{http_code}", url + path],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    # then it went over HTTP/2, got the JSON 400, and the stub vLLM saw nothing
    assert done.stdout == "2 400", (done.stdout, done.stderr)
    assert json.loads((tmp_path / "body").read_text())["error"]["code"] == "non_canonical_path"
    assert gateway.upstream.seen_with(request_id) == []


def test_the_canonical_public_paths_still_reach_vllm(gateway: Gateway) -> None:
    key = gateway.new_key("canonical")
    context = ssl.create_default_context(cafile=str(gateway.ca_file))
    for method, path in (("GET", "/v1/models"), ("GET", "/v1/models?limit=1"), ("GET", "/healthz")):
        request_id = rid("canonical")
        response = raw_request(
            gateway.https_port, HOSTNAME, context, method, path,
            {"Authorization": f"Bearer {key.token}", REQUEST_ID_HEADER: request_id},
        )
        assert response.status == 200, (path, response.status)
        assert len(gateway.upstream.seen_with(request_id)) == 1, path


def test_healthz_is_public_and_vllm_never_sees_a_client_key_on_it(gateway: Gateway, client: httpx.Client) -> None:
    key = gateway.new_key("health-caller")
    request_id = rid("healthz")
    response = gateway.request(client, "GET", "/healthz", headers={"Authorization": f"Bearer {key.token}", REQUEST_ID_HEADER: request_id})
    assert response.status_code == 200
    (seen,) = gateway.upstream.seen_with(request_id)
    assert seen.path == "/health" and seen.authorization is None


def test_huge_header_gets_431(gateway: Gateway, client: httpx.Client) -> None:
    request_id = rid("huge-header")
    response = gateway.request(client, "GET", "/v1/models", headers={"X-Padding": "a" * 20_000, REQUEST_ID_HEADER: request_id})
    assert response.status_code == 431
    assert gateway.upstream.seen_with(request_id) == []


def test_huge_body_gets_413_and_vllm_sees_nothing(gateway: Gateway, client: httpx.Client) -> None:
    key = gateway.new_key("big-body")
    request_id = rid("huge-body")
    over = gateway_limit_bytes(gateway) + 1
    response = gateway.request(
        client,
        "POST",
        "/v1/chat/completions",
        content=b"x" * over,
        headers={"Authorization": f"Bearer {key.token}", REQUEST_ID_HEADER: request_id, "Content-Type": "application/json"},
    )
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
    assert gateway.upstream.seen_with(request_id) == []


def gateway_limit_bytes(gateway: Gateway) -> int:
    env = dict(line.split("=", 1) for line in gateway.layout.runtime_env.read_text().splitlines() if "=" in line and not line.startswith("#"))
    return int(env["GPUGATE_AUTHZ_MAX_BODY_BYTES"])


def test_chunked_body_without_length_gets_411(gateway: Gateway, client: httpx.Client) -> None:
    key = gateway.new_key("chunker")
    response = gateway.request(
        client, "POST", "/v1/chat/completions", content=iter([b'{"model":', b'"stub"}']), headers={"Authorization": f"Bearer {key.token}"}
    )
    assert response.status_code == 411


def framed_request(gateway: Gateway, method: str, path: str, request_id: str, token: str | None, framing: str) -> bytes:
    """One HTTP/1.1 request written byte for byte; `framing`: "chunked" (a 5-byte chunked body) or "none"."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {HOSTNAME}", "Connection: close", f"{REQUEST_ID_HEADER}: {request_id}"]
    if token:
        lines.append(f"Authorization: Bearer {token}")
    if framing == "chunked":
        lines.append("Transfer-Encoding: chunked")
    body = "5\r\nhello\r\n0\r\n\r\n" if framing == "chunked" else ""
    return raw_https(gateway, ("\r\n".join(lines) + "\r\n\r\n" + body).encode())


@pytest.mark.parametrize(("method", "path"), [("GET", "/v1/models"), ("DELETE", "/v1/models"), ("OPTIONS", "/v1/models"), ("GET", "/healthz")])
def test_a_chunked_body_on_any_method_gets_411_and_never_reaches_vllm(gateway: Gateway, method: str, path: str) -> None:
    # given a valid key, and the same request without a body reaching vLLM (the stub records each request)
    key = gateway.new_key(f"chunked-{method.lower()}-{path.strip('/').replace('/', '-')}")
    bare = rid("bare-" + method.lower())
    assert framed_request(gateway, method, path, bare, key.token, "none").startswith(b"HTTP/1.1 ")
    assert [seen.method for seen in gateway.upstream.seen_with(bare)] == [method]
    # when it carries a chunked body (no Content-Length: nothing to check its size against)
    request_id = rid("chunked-" + method.lower())
    response = framed_request(gateway, method, path, request_id, key.token, "chunked")
    # then the gateway refuses it with a JSON 411 and vLLM never sees the request or its body
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 411 "), head
    assert b'"length_required"' in body
    assert gateway.upstream.seen_with(request_id) == []


def test_stream_chunks_arrive_before_the_stream_ends(gateway: Gateway, client: httpx.Client) -> None:
    # given vLLM streaming 4 chunks 0.3 s apart
    key = gateway.new_key("streamer")
    body = {"model": "stub", "stream": True, "chunks": 4, "delay": 0.3, "messages": []}
    arrivals = []
    started = time.monotonic()
    # when the client reads the stream
    with client.stream(
        "POST",
        "/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {key.token}"},
        extensions={"sni_hostname": HOSTNAME},
    ) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: "):
                arrivals.append(time.monotonic() - started)
    # then the first chunk arrived long before the last: nothing was buffered
    assert len(arrivals) == 5
    assert arrivals[0] < 0.3 and arrivals[-1] > 0.85
    assert arrivals[-1] - arrivals[0] > 0.6


# --- headers, logs, secrets -----------------------------------------------------------------------


def test_client_request_id_round_trips_into_vllm_access_log_and_authz_log(gateway: Gateway, client: httpx.Client) -> None:
    key = gateway.new_key("traced")
    request_id = rid("trace")
    response = chat(gateway, client, key.token, request_id)
    assert response.headers[REQUEST_ID_HEADER] == request_id
    assert gateway.upstream.seen_with(request_id)
    entry = wait_until(
        lambda: next((e for e in access_entries(gateway) if e.get("key_and_request_id") == f"{key.record.id} {request_id}"), None),
        2,
        what="the access-log entry",
    )
    assert entry["status"] == 200 and entry["duration"] > 0 and entry["size"] > 0
    # authz writes decision lines on its maintenance tick, up to access_log_poll_seconds after the answer
    def decided() -> bool:
        decisions = [json.loads(line) for line in gateway.authz_log.read_text().splitlines()]
        return any(d.get("request_id") == request_id and d.get("key_id") == key.record.id for d in decisions)

    assert wait_until(decided, 2, what="authz's decision line")


def test_malformed_client_request_id_is_replaced_by_a_fresh_one(gateway: Gateway, client: httpx.Client) -> None:
    response = gateway.request(client, "GET", "/v1/models", headers={REQUEST_ID_HEADER: "bad id with spaces!"})
    assert UUID.match(response.headers[REQUEST_ID_HEADER])


def test_every_response_carries_request_id_and_hsts(gateway: Gateway, client: httpx.Client) -> None:
    key = gateway.new_key("headers")
    responses = [
        chat(gateway, client, key.token, rid("hdr")),  # 200 from vLLM
        chat(gateway, client, None, rid("hdr")),  # 401 from authz
        gateway.request(client, "GET", "/nowhere"),  # 404 from Caddy
    ]
    for response in responses:
        assert REQUEST_ID_HEADER in response.headers, response.status_code
        assert response.headers["Strict-Transport-Security"].startswith("max-age=31536000")
        assert "Server" not in response.headers
        # Only TCP 80/443 are open: advertising HTTP/3 (QUIC, UDP 443) would send clients to a dead port.
        assert "Alt-Svc" not in response.headers


def test_access_log_holds_metadata_only(gateway: Gateway, client: httpx.Client) -> None:
    key = gateway.new_key("metadata")
    chat_id, models_id = rid("meta"), rid("meta-models")
    chat(gateway, client, key.token, chat_id, Cookie="session=abc")
    gateway.request(client, "GET", "/v1/models?api_key=leaked", headers={"Authorization": f"Bearer {key.token}", REQUEST_ID_HEADER: models_id})
    # both requests are in the log (an empty or unwritten log would pass the checks below unseen) ...
    wait_until(lambda: {chat_id, models_id} <= {e.get("key_and_request_id", "").split(" ")[-1] for e in access_entries(gateway)},
               5, what="both requests in the access log")
    ours = [e for e in access_entries(gateway) if e["key_and_request_id"].split(" ")[-1] in (chat_id, models_id)]
    assert len(ours) == 2 and all(e["key_and_request_id"].startswith(key.record.id) for e in ours), ours
    # ... and no entry carries headers, TLS details or a query string
    for entry in access_entries(gateway):
        assert {"status", "duration", "size", "key_and_request_id"} <= set(entry)
        assert "headers" not in entry["request"] and "resp_headers" not in entry and "tls" not in entry["request"]
        assert "leaked" not in entry["request"]["uri"]


def test_http_redirects_to_https(gateway: Gateway) -> None:
    response = httpx.get(f"http://127.0.0.1:{gateway.http_port}/v1/models", headers={"Host": HOSTNAME}, timeout=5)
    assert response.status_code in (301, 308)
    assert response.headers["Location"] == f"https://{HOSTNAME}:{gateway.https_port}/v1/models"


def test_canary_in_prompts_and_client_keys_appear_in_no_log_metric_or_state_file(gateway: Gateway, client: httpx.Client) -> None:
    # given prompts carrying a canary, sent every way a request can go
    key = gateway.new_key("canary")
    prompt = {"model": "stub", "messages": [{"role": "user", "content": CANARY}]}
    chat(gateway, client, key.token, rid("canary"), prompt)  # allowed
    chat(gateway, client, None, rid("canary"), prompt)  # refused
    chat(gateway, client, key.token, rid("canary"), {**prompt, "stream": True, "chunks": 2, "delay": 0.05})
    gateway.request(client, "POST", "/v1/load_lora_adapter", json=prompt, headers={"Authorization": f"Bearer {key.token}"})
    gateway.request(client, "GET", f"/v1/models?q={CANARY}", headers={"Authorization": f"Bearer {key.token}"})
    gateway.request(
        client, "POST", "/v1/completions", content=(CANARY * 40_000).encode(), headers={"Authorization": f"Bearer {key.token}"}
    )  # too large
    time.sleep(0.3)  # let the access log and authz's log be written
    # when every file under the host root, the home of the processes and both metric endpoints are read
    leaks = []
    for path in sorted(p for p in gateway.root.rglob("*") if p.is_file()):
        data = path.read_bytes()
        if CANARY.encode() in data or key.token.encode() in data:
            leaks.append(str(path))
    metrics = gateway.authz_metrics() + httpx.get(f"http://127.0.0.1:{gateway.ports.caddy_metrics}/metrics", timeout=5).text
    # then neither the canary nor the client key is anywhere
    assert leaks == []
    assert CANARY not in metrics and key.token not in metrics
    assert any(p.name == "access.log" for p in Path(gateway.layout.logs).iterdir())

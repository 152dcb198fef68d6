"""Keys and paths at the gateway in front of REAL vLLM: refusals never reach it, limits, rotation under load,
revocation, privacy, non-canonical paths, and a local stack reachable from this machine only."""

from __future__ import annotations

import concurrent.futures
import ipaddress
import json
import socket
import subprocess
import threading
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path

import httpx
import openai
import pytest
from gpugate_runtime.contract.host import HostLayout
from gpugate_runtime.keys import create_key, utcnow

from gpugate.stackfile import load_stack

from tests.e2e.local_stack import COMPLETIONS_SERVED, running_local_stack, wait_until
from tests.e2e.paths import NON_CANONICAL, PRIVATE_ROUTES, raw_https

pytestmark = pytest.mark.e2e

CANARY = "zebra-canary-5f1c2e9a-never-logged"
ROTATION_CLIENTS = 16
ROTATION_SECONDS = 8


@pytest.fixture(scope="module")
def stack(tmp_path_factory, vllm_python, smollm_dir):
    with running_local_stack(tmp_path_factory.mktemp("gateway-vllm")) as running:
        yield running


def _chat(client: openai.OpenAI, model: str, text: str = "Hi", max_tokens: int = 1):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": text}], max_tokens=max_tokens)


def _vllm_requests(stack) -> float:
    """Requests vLLM has served on /v1/completions, which the prober never calls (its chats and model lists would
    move vLLM's own request counters at any moment): must not move for a refused request."""
    return stack.vllm_metric(*COMPLETIONS_SERVED)


def test_refused_keys_get_401_and_vllm_never_sees_the_request(stack):
    # given a revoked key, an expired key, an unknown key and a malformed one
    revoked = stack.keys("create", "to-revoke")
    stack.keys("revoke", revoked["id"])
    expired = create_key(stack.key_store, "expired", expires=timedelta(hours=1), now=utcnow() - timedelta(hours=2))
    unknown = "ggk_0123456789ab_" + "0" * 64
    time.sleep(1.5)  # authz re-reads the store within its reload interval
    # (the counter is seen to count: a valid key's completion moves it by one)
    first = _vllm_requests(stack)
    stack.client().completions.create(model=stack.model, prompt="Hi", max_tokens=1)
    wait_until(lambda: _vllm_requests(stack) == first + 1, 10, 0.2, "vLLM to count the completion")
    before = _vllm_requests(stack)
    # when each calls the API through the gateway
    for key in (revoked["key"], expired.token, unknown, "sk-malformed"):
        with pytest.raises(openai.AuthenticationError) as refused:
            stack.client(key).completions.create(model=stack.model, prompt="Hi", max_tokens=1)
        # then the answer is an OpenAI-style 401 ...
        assert refused.value.status_code == 401
        assert refused.value.body["code"] == "invalid_api_key"
    missing = httpx.post(f"{stack.url}/v1/completions", json={"model": stack.model, "prompt": "Hi"}, verify=stack.tls(), timeout=10)
    assert missing.status_code == 401
    # ... and vLLM served none of them
    time.sleep(1)
    assert _vllm_requests(stack) == before


def test_key_over_its_rate_limit_gets_429_with_retry_after(stack):
    limited = stack.keys("create", "slow-client", "--rpm", "2")
    time.sleep(1.5)
    client = stack.client(limited["key"])
    _chat(client, stack.model)
    _chat(client, stack.model)
    with pytest.raises(openai.RateLimitError) as limited_error:
        _chat(client, stack.model)
    assert int(limited_error.value.response.headers["Retry-After"]) >= 1


def test_rotation_while_16_clients_keep_sending_fails_no_request(stack):
    # given a key in use by 16 clients at once
    old = stack.keys("create", "busy-team", "--max-concurrent", "64", "--rpm", "100000")
    time.sleep(1.5)
    keys = {"old": old["key"]}
    results: Counter = Counter()
    errors: list[str] = []
    lock = threading.Lock()
    stop = time.monotonic() + ROTATION_SECONDS

    def client_loop(index: int) -> None:
        sent = 0
        while time.monotonic() < stop and sent < 400:
            which = "new" if ("new" in keys and index % 2) else "old"
            try:
                stack.client(keys[which]).models.list()
                with lock:
                    results[which] += 1
            except openai.APIError as err:
                with lock:
                    errors.append(f"{which}: {err}")
            sent += 1

    with concurrent.futures.ThreadPoolExecutor(ROTATION_CLIENTS) as pool:
        futures = [pool.submit(client_loop, i) for i in range(ROTATION_CLIENTS)]
        time.sleep(ROTATION_SECONDS / 3)
        # when the key is rotated mid-traffic, half the clients switching to the new key
        rotated = stack.keys("rotate", "busy-team", "--overlap", "1h")
        keys["new"] = rotated["key"]
        for future in futures:
            future.result(timeout=ROTATION_SECONDS + 60)
    # then not a single request failed, and both keys carried traffic
    assert errors == []
    assert results["old"] > 0 and results["new"] > 0


def test_revoked_key_is_rejected_within_two_seconds(stack):
    key = stack.keys("create", "leaky")
    time.sleep(1.5)
    client = stack.client(key["key"])
    client.models.list()
    stack.keys("revoke", key["id"])
    revoked_at = time.monotonic()

    def refused() -> bool:
        try:
            client.models.list()
            return False
        except openai.AuthenticationError:
            return True

    wait_until(refused, 2, 0.1, "the revoked key to be refused")
    assert time.monotonic() - revoked_at <= 2


def test_corrupt_key_store_keeps_the_previous_keys_serving(stack):
    good = stack.keys("create", "survivor")
    time.sleep(1.5)
    stack.client(good["key"]).models.list()
    saved = stack.key_store.read_bytes()
    failures_before = _authz_metric(stack, "gpugate_keystore_reload_failures_total")
    try:
        stack.key_store.write_text('{"keys": [ this is not json')
        wait_until(lambda: _authz_metric(stack, "gpugate_keystore_reload_failures_total") > failures_before, 10, 0.2,
                   "authz to notice the bad store")
        # the keys it had keep working
        assert _chat(stack.client(good["key"]), stack.model).choices
    finally:
        stack.key_store.write_bytes(saved)


def _authz_metric(stack, name: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{stack.ports['authz']}/metrics", timeout=5).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def test_prompt_and_completion_text_appear_in_no_log_metric_or_state_file(stack):
    # given prompts carrying a canary, plain and streamed, and a refused one
    client = stack.client()
    # vLLM's min_tokens makes each reply at least 16 tokens long, whatever the model would rather say
    reply = client.chat.completions.create(
        model=stack.model, messages=[{"role": "user", "content": f"Repeat exactly: {CANARY}"}], max_tokens=24,
        extra_body={"min_tokens": 16},
    )
    streamed = "".join(
        chunk.choices[0].delta.content or ""
        for chunk in client.chat.completions.create(
            model=stack.model, messages=[{"role": "user", "content": f"Tell me about {CANARY}"}], max_tokens=24, stream=True,
            extra_body={"min_tokens": 16},
        )
        if chunk.choices
    )
    with pytest.raises(openai.AuthenticationError):
        _chat(stack.client("ggk_0123456789ab_" + "1" * 64), stack.model, CANARY)
    # the replies are the whole completion text, long enough that finding them by chance is ruled out
    replies = [text.strip() for text in (reply.choices[0].message.content or "", streamed)]
    assert all(len(text) >= 16 for text in replies), replies
    time.sleep(2)  # let every service flush its logs
    # then neither the canary, the client's key, nor either reply is in any file under the stack's state, logs or config ...
    needles = [CANARY.encode(), stack.key.encode(), *[text.encode() for text in replies]]
    # ... though the same search finds what the logs do hold: the key's id, which authz logs for each decision
    key_id = stack.key.split("_")[1].encode()
    hits, id_seen = [], []
    for path in Path(stack.state).rglob("*"):
        if path.is_file() and path.stat().st_size < 512 * 1024 * 1024:
            data = path.read_bytes()
            hits += [f"{path}: {n[:20]!r}" for n in needles if n in data]
            id_seen += [path.name] if key_id in data else []
    assert hits == []
    assert "authz.log" in id_seen, id_seen
    # ... nor in any service's metrics
    for name in ("vllm", "authz", "prober", "caddy_metrics"):
        text = httpx.get(f"http://127.0.0.1:{stack.ports[name]}/metrics", timeout=5).text
        assert CANARY not in text and stack.key not in text, name


# What only vLLM answers with: Prometheus text, the OpenAPI schema or Swagger page, tokens, FastAPI errors.
VLLM_PRIVATE_MARKS = (b"# HELP", b"# TYPE", b'"openapi"', b"swagger", b'"tokens"', b'"prompt"', b"detail")


def _method(path: str) -> str:
    return "POST" if path.startswith(("/tokenize", "/detokenize")) else "GET"


@pytest.mark.parametrize("path", NON_CANONICAL)
def test_non_canonical_paths_with_a_valid_key_get_json_400_and_no_private_vllm_route_answers(stack, path):
    # given the stack's valid key and a path that is not in canonical form
    request_id = f"e2e-path-{abs(hash(path)) % 10**10:010d}"
    port = int(stack.url.rsplit(":", 1)[1])
    # when it is sent byte for byte (an HTTP client would clean it)
    response = raw_https(
        port, "localhost", stack.tls(), _method(path), path,
        {"Authorization": f"Bearer {stack.key}", "X-Request-Id": request_id},
    )
    # then the gateway answers its own JSON 400, and nothing of vLLM's metrics, schema or tokenizer
    assert response.status == 400, (response.status, response.body[:300])
    assert response.headers["content-type"] == "application/json"
    assert json.loads(response.body)["error"]["code"] == "non_canonical_path"
    assert not [mark for mark in VLLM_PRIVATE_MARKS if mark in response.body]
    # ... and the path reached Caddy exactly as sent, where authz never saw it (no key id logged)
    access_log = stack.state / "var" / "log" / "gpugate" / "access.log"
    wait_until(lambda: request_id in access_log.read_text(), 5, 0.1, "the access-log entry")
    entry = next(json.loads(line) for line in access_log.read_text().splitlines() if request_id in line)
    assert entry["request"]["uri"] == path and entry["status"] == 400
    assert entry["key_and_request_id"] == f"- {request_id}"


@pytest.mark.parametrize("private", PRIVATE_ROUTES)
def test_private_vllm_routes_answer_on_loopback_so_a_probe_that_got_through_would_show(stack, private):
    # given vLLM's own loopback port, each private route answers with one of the marks the probes look for
    key = (stack.state / "etc" / "gpugate" / "secrets" / "vllm_api_key").read_text().strip()
    headers = {"Authorization": f"Bearer {key}"}
    url = f"http://127.0.0.1:{stack.ports['vllm']}{private}"
    if _method(private) == "POST":
        body = {"model": stack.model, "prompt": "hi"} if private == "/tokenize" else {"model": stack.model, "tokens": [1]}
        answer = httpx.post(url, json=body, headers=headers, timeout=30)
    else:
        answer = httpx.get(url, headers=headers, timeout=30)
    assert answer.status_code == 200, (private, answer.status_code, answer.text[:200])
    assert [mark for mark in VLLM_PRIVATE_MARKS if mark in answer.content]


def test_vllm_serves_metrics_under_a_dot_segment_which_is_why_the_gateway_must_refuse_it(stack):
    # /metrics is a prefix mount in vLLM: the raw /metrics/../v1/models, had Caddy forwarded it, is Prometheus text
    with socket.create_connection(("127.0.0.1", stack.ports["vllm"]), timeout=10) as raw:
        raw.sendall(b"GET /metrics/../v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        leaked = b"".join(iter(lambda: raw.recv(65536), b""))
    assert leaked.startswith(b"HTTP/1.1 200") and b"# HELP" in leaked


def _listeners() -> list[tuple[str, int]]:
    """(address, port) of every listening TCP socket on this machine, as `ss` reports them."""
    out = subprocess.run(["ss", "-ltnH"], capture_output=True, text=True, check=True, timeout=30).stdout
    found = []
    for line in out.splitlines():
        local = line.split()[3]
        address, _, port = local.rpartition(":")
        address = address.strip("[]").split("%")[0]
        found.append(("::" if address == "*" else address, int(port)))  # `*`: every address
    return found


def _outside_addresses() -> list[str]:
    """This machine's addresses other than loopback (what another machine on the network would dial)."""
    out = subprocess.run(["hostname", "-I"], capture_output=True, text=True, timeout=10).stdout.split()
    return [a for a in out if not ipaddress.ip_address(a).is_loopback and not ipaddress.ip_address(a).is_link_local]


def test_the_local_stack_listens_on_loopback_only_and_refuses_other_addresses(stack):
    # given the running local stack as shipped (gpugate:local.expose unset)
    ports = load_stack(stack.stack_file).spec.ports
    https, http = ports.https, ports.http
    ours = {https, http, *stack.ports.values()}
    # when its listening sockets are listed
    listening = [(address, port) for address, port in _listeners() if port in ours]
    # then Caddy's https and http ports are among them, and every one of the stack's sockets is on loopback
    assert {https, http} <= {port for _, port in listening}
    assert [(a, p) for a, p in listening if not ipaddress.ip_address(a).is_loopback] == []
    # ... so a connection to this machine's network address is refused
    outside = _outside_addresses()
    if not outside:
        pytest.skip("this machine has no address but loopback")
    for address in outside:
        with pytest.raises(OSError):
            socket.create_connection((address, https), timeout=5).close()


# ---- Schemathesis: vLLM's own OpenAPI schema, fuzzed through the gateway with a valid key ----------------------

PUBLIC_PATHS = frozenset({"/healthz", "/v1/models", "/v1/chat/completions", "/v1/completions"})
FUZZ_EXAMPLES = 4  # per operation and generation mode
FUZZ_BUDGET_S = 120
# Generation lengths a fuzzed body may ask for are cut to this: the point is the gateway, not a 2,000-token story.
FUZZ_MAX_TOKENS = 4


def _made_by_vllm(response) -> bool:  # noqa: ANN001 - a requests.Response from Schemathesis
    """vLLM's own errors are JSON with an integer error code (its HTTP status) or FastAPI's `detail`; the gateway's
    (Caddy's and authz's) carry a string code, or Caddy's empty body."""
    try:
        body = response.json()
    except ValueError:
        return False
    error = body.get("error") if isinstance(body, dict) else None
    return isinstance(body, dict) and (isinstance(error, dict) and isinstance(error.get("code"), int) or "detail" in body)


def _clamp(body: object) -> None:
    """A generation body asks for at most FUZZ_MAX_TOKENS tokens (an absent max_tokens means up to the model's
    length: minutes on a CPU) and one choice."""
    if isinstance(body, dict):
        for name in ("max_tokens", "max_completion_tokens", "min_tokens", "n", "best_of"):
            if isinstance(body.get(name), int) and not isinstance(body.get(name), bool):
                body[name] = max(0, min(body[name], FUZZ_MAX_TOKENS if "tokens" in name else 1))
        if not isinstance(body.get("max_tokens"), int) or isinstance(body.get("max_tokens"), bool):
            body["max_tokens"] = FUZZ_MAX_TOKENS


def test_schemathesis_over_vllms_openapi_through_the_gateway_finds_no_gateway_5xx_no_private_route_and_no_crash(stack):
    import schemathesis  # noqa: PLC0415 - only this test needs it
    from hypothesis import HealthCheck, Phase, given, settings  # noqa: PLC0415
    from hypothesis.errors import Unsatisfiable  # noqa: PLC0415

    # given vLLM's own schema, read from vLLM's loopback port (test only: the gateway never serves it) ...
    raw = httpx.get(f"http://127.0.0.1:{stack.ports['vllm']}/openapi.json", timeout=10).json()
    schema = schemathesis.openapi.from_dict(raw)
    operations = [result.ok() for result in schema.get_all_operations()]
    pids = {s["name"]: s["pid"] for s in stack.status()["services"]}
    seen: Counter = Counter()
    problems: list[str] = []
    unsatisfiable: list[str] = []
    started = time.monotonic()
    auth = {"Authorization": f"Bearer {stack.key}"}

    def send(case) -> None:  # noqa: ANN001 - a schemathesis Case
        if case.path in ("/v1/chat/completions", "/v1/completions"):
            _clamp(case.body)
        try:
            response = case.call(base_url=stack.url, headers=auth, verify=str(stack.ca_file), timeout=60)
        except Exception as exc:  # noqa: BLE001 - a dropped connection is a finding, recorded with its case
            problems.append(f"{case.method} {case.formatted_path}: {type(exc).__name__}: {exc}")
            return
        path = response.request.path_url.split("?", 1)[0]
        seen[(case.operation.label, response.status_code)] += 1
        label = f"{case.method} {response.request.path_url} -> {response.status_code}"
        # ... then no 5xx comes from the gateway's own parts (vLLM's own 5xx are vLLM's to answer for) ...
        if response.status_code >= 500 and not _made_by_vllm(response):
            problems.append(f"gateway 5xx: {label}: {response.text[:200]}")
        # ... and a path outside the public four is refused by the gateway, never answered by vLLM
        if path not in PUBLIC_PATHS:
            marks = [m for m in VLLM_PRIVATE_MARKS if m in response.content]
            if response.status_code not in (400, 404) or marks or _made_by_vllm(response):
                problems.append(f"private route answered: {label}: {marks} {response.text[:200]}")

    # when every operation is fuzzed, with valid and with invalid data, within the time budget
    for operation in operations:
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            if time.monotonic() - started > FUZZ_BUDGET_S:
                break

            @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, phases=[Phase.generate],
                      suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(generation_mode=mode))
            def fuzz(case) -> None:  # noqa: ANN001
                send(case)

            try:
                fuzz()
            except Unsatisfiable:  # nothing of this operation can be made invalid (no parameters, no body)
                unsatisfiable.append(f"{operation.label} {mode.value}")
    # then the fuzzing ran (most operations, each answered) ...
    fuzzed = {label for label, _ in seen}
    assert len(operations) >= 20 and len(fuzzed) >= len(operations) // 2, (len(operations), sorted(fuzzed))
    assert sum(seen.values()) >= 2 * len(fuzzed) and len(unsatisfiable) < len(operations), unsatisfiable
    assert problems == [], problems[:20]
    # ... and nothing crashed: the same processes serve, healthy, and a completion still goes through
    assert {s["name"]: s["pid"] for s in stack.status()["services"]} == pids
    assert httpx.get(f"{stack.url}/healthz", verify=stack.tls(), timeout=10).status_code == 200
    assert _chat(stack.client(), stack.model).choices


# ---- the gateway's own refusals in front of real vLLM (tests/e2e/test_gateway_proxy.py has them against the stub) ----

def _raw(stack, request: bytes) -> bytes:
    port = int(stack.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as plain, stack.tls().wrap_socket(
        plain, server_hostname="localhost"
    ) as tls:
        tls.sendall(request)
        chunks = []
        while chunk := tls.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def _max_body_bytes(stack) -> int:
    env_file = HostLayout(stack.state).runtime_env
    env = dict(line.split("=", 1) for line in env_file.read_text().splitlines() if "=" in line and not line.startswith("#"))
    return int(env["GPUGATE_AUTHZ_MAX_BODY_BYTES"])


@pytest.mark.parametrize(("method", "path"), [("GET", "/metrics"), ("POST", "/tokenize"), ("POST", "/v1/load_lora_adapter"), ("GET", "/docs")])
def test_a_private_route_in_canonical_form_gets_the_gateways_json_404_in_front_of_real_vllm(stack, method, path):
    response = httpx.request(method, f"{stack.url}{path}", headers={"Authorization": f"Bearer {stack.key}"}, json={} if method == "POST" else None,
                             verify=stack.tls(), timeout=10)
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
    assert not [mark for mark in VLLM_PRIVATE_MARKS if mark in response.content]


@pytest.mark.parametrize("case", ["413 body over the limit", "411 chunked body", "431 huge header"])
def test_the_gateways_size_refusals_never_reach_real_vllm(stack, case):
    # given a request vLLM is seen to count when it reaches it
    before = stack.vllm_metric(*COMPLETIONS_SERVED)
    stack.client().completions.create(model=stack.model, prompt="Hi", max_tokens=1)
    wait_until(lambda: stack.vllm_metric(*COMPLETIONS_SERVED) == before + 1, 10, 0.2, "vLLM to count the completion")
    counted = stack.vllm_metric(*COMPLETIONS_SERVED)
    head = f"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nAuthorization: Bearer {stack.key}\r\n"
    head += "Content-Type: application/json\r\n"
    # when the same route gets a body over the limit, a body without a length, or a header over 16 KB
    if case.startswith("413"):
        over = _max_body_bytes(stack) + 1
        # only the headers: authz answers from Content-Length before any byte of the body (the gateway then closes)
        response = _raw(stack, (head + f"Content-Length: {over}\r\n\r\n").encode())
        expected, code = b"HTTP/1.1 413 ", b'"request_too_large"'
    elif case.startswith("411"):
        body = b'{"model":"x","prompt":"Hi","max_tokens":1}'
        response = _raw(stack, (head + "Transfer-Encoding: chunked\r\n\r\n").encode() + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
        expected, code = b"HTTP/1.1 411 ", b'"length_required"'
    else:
        response = _raw(stack, (head + f"X-Padding: {'a' * 20_000}\r\nContent-Length: 2\r\n\r\n{{}}").encode())
        expected, code = b"HTTP/1.1 431 ", b""
    # then the gateway refuses it, and vLLM served nothing more
    assert response.startswith(expected), response[:200]
    assert code in response
    time.sleep(1)
    assert stack.vllm_metric(*COMPLETIONS_SERVED) == counted


def test_a_spoofed_key_id_header_is_replaced_by_authz_in_front_of_real_vllm(stack):
    # given a valid key and a forged identity header
    request_id = f"e2e-spoof-{int(time.time() * 1000)}"
    response = httpx.post(
        f"{stack.url}/v1/completions", json={"model": stack.model, "prompt": "Hi", "max_tokens": 1}, verify=stack.tls(), timeout=60,
        headers={"Authorization": f"Bearer {stack.key}", "X-Gpugate-Key-Id": "000000000000", "X-Request-Id": request_id},
    )
    # then real vLLM answers, and the gateway logged the key's own id, not the forged one
    assert response.status_code == 200 and response.json()["choices"]
    access_log = stack.state / "var" / "log" / "gpugate" / "access.log"
    wait_until(lambda: request_id in access_log.read_text(), 5, 0.1, "the access-log entry")
    entry = next(json.loads(line) for line in access_log.read_text().splitlines() if request_id in line)
    assert entry["key_and_request_id"] == f"{stack.key.split('_')[1]} {request_id}"


def test_plain_http_is_redirected_to_https_in_front_of_real_vllm(stack):
    http_port = load_stack(stack.stack_file).spec.ports.http
    response = httpx.get(f"http://127.0.0.1:{http_port}/v1/models", headers={"Host": "localhost"}, timeout=10)
    assert response.status_code in (301, 308) and response.headers["Location"].startswith("https://localhost:")
    assert response.headers["Location"].endswith("/v1/models")

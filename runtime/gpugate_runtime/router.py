"""The router: sends each completion to a local tier or an external provider by the key's route policy.

Caddy has checked the key (forward_auth) before a request reaches this service, and hands over the
key's scope in KEY_SCOPE_HEADER. The router picks the routes the policy allows, tries them in order,
and falls back only before the first byte of a response has reached the client: on a refused
connection, a time-out, a 5xx or a 429. Streams pass through unbuffered, event by event. Each request
leaves one metadata-only RouteRecord in the route log and its counts in the metrics; no prompt or
completion is ever logged.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from gpugate_runtime.contract.host import KEY_ID_HEADER, REQUEST_ID_HEADER
from gpugate_runtime.contract.metrics import (
    GENAI_TOKEN_USAGE,
    GENAI_TTFT,
    ROUTE_ERRORS,
    ROUTE_FALLBACKS,
    ROUTE_LAST_FAILURE,
    ROUTE_LAST_FALLBACK,
    ROUTE_LAST_SUCCESS,
    ROUTE_REQUESTS,
    ROUTE_TIER_UP,
    ROUTE_TTFT_AVERAGE,
)
from gpugate_runtime.contract.routing import (
    KEY_SCOPE_HEADER,
    ROUTE_HEADER,
    ROUTE_POLICY_HEADER,
    KeyScope,
    RoutePolicy,
    RouteRecord,
)
from gpugate_runtime.routetable import Route, Routes, RouteTable
from gpugate_runtime.upstream import ConnectFailed, FirstByteTimeout, Origin, Response, UpstreamBroken

log = logging.getLogger("gpugate_runtime.router")

Scope = dict[str, Any]
Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]

GENERATE_PATHS = ("/v1/chat/completions", "/v1/completions")
# A non-streamed answer is read for its `usage` up to this size (in memory only, never written anywhere).
USAGE_SCAN_BYTES = 4 * 1024 * 1024
TOKEN_BUCKETS = (16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)
# Answers that say the route failed rather than the request (with any 5xx): its key refused, or its limit hit.
ROUTE_FAILED_STATUS = (401, 403, 429)
# Hop-by-hop and framing headers the router sets itself; the rest of an upstream's headers pass through.
_DROP_RESPONSE = {b"connection", b"keep-alive", b"transfer-encoding", b"server", b"date"}
# Request headers an upstream gets from the client (the key, identity and routing headers stay here; no
# accept-encoding: the router reads each answer's usage, so it asks for it uncompressed).
_PASS_REQUEST = {"content-type", "accept", REQUEST_ID_HEADER.lower(), "user-agent"}


# Caddy 2.6's forward_auth `copy_headers` sets a header authz did not send to its own unresolved
# placeholder (a client's copy is dropped before forward_auth, so only Caddy can send this).
_UNSET_COPY = "{http.reverse_proxy.header."


def error_body(message: str, kind: str, code: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": kind, "code": code}}).encode()


class Refusal(Exception):
    """The router answers itself (403 / 404 / 400 / 500 / 503) with an OpenAI-style JSON error."""

    def __init__(self, status: int, message: str, code: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.retry_after = status, message, code, retry_after

    @property
    def body(self) -> bytes:
        kind = "server_error" if self.status >= 500 else "invalid_request_error"
        return error_body(self.message, kind, self.code)


@dataclass
class Exchange:
    """What the router knows about one request as it goes: the RouteRecord's fields."""

    request_id: str
    key_id: str
    family: str
    model: str = ""
    policy: str = ""
    route: str = "none"
    status: int = 0
    fallback: bool = False
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    started: float = field(default_factory=time.perf_counter)
    ttft_s: float | None = None

    def record(self) -> RouteRecord:
        return RouteRecord(
            ts=time.time(),
            request_id=self.request_id,
            key_id=self.key_id,
            family=self.family,
            model=self.model,
            policy=self.policy,
            route=self.route,
            status=self.status,
            fallback=self.fallback,
            input_tokens=self.input_tokens,
            output_tokens=self.output_tokens,
            cost_usd=round(self.cost_usd, 8),
            latency_ms=round((time.perf_counter() - self.started) * 1000, 3),
            ttft_ms=None if self.ttft_s is None else round(self.ttft_s * 1000, 3),
        )


class RouteLog:
    """The route log: one JSON line per request, appended, owner-only (like authz's decision log)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def append(self, record: RouteRecord) -> None:
        # One write per line: O_APPEND keeps lines whole for a reader following the file (authz).
        os.write(self._fd, (record.to_json() + "\n").encode())

    def close(self) -> None:
        os.close(self._fd)


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            ROUTE_REQUESTS, "Routed requests", ["route", "tier", "provider", "policy", "outcome"], registry=registry
        )
        self.fallbacks = Counter(
            ROUTE_FALLBACKS, "Requests sent on to another route", ["from_route", "to_route", "policy"], registry=registry
        )
        self.errors = Counter(ROUTE_ERRORS, "Failed attempts on a route", ["route", "reason"], registry=registry)
        self.tokens = Histogram(
            GENAI_TOKEN_USAGE, "Tokens per request (OpenTelemetry gen_ai.client.token.usage)",
            ["gen_ai_token_type", "route"], buckets=TOKEN_BUCKETS, registry=registry,
        )  # fmt: skip
        self.ttft = Histogram(
            GENAI_TTFT, "Time to the first byte of the answer (gen_ai.server.time_to_first_token)", ["route"],
            buckets=TTFT_BUCKETS, registry=registry,
        )  # fmt: skip
        self.tier_up = Gauge(
            ROUTE_TIER_UP, "1 while the router sends to the tier, 0 while it holds it down", ["tier"], registry=registry
        )
        self.last_success = Gauge(ROUTE_LAST_SUCCESS, "Unix time of the route's last answer below 400 (0: never)", ["route"], registry=registry)
        self.last_failure = Gauge(ROUTE_LAST_FAILURE, "Unix time of the route's last failed attempt (0: never)", ["route"], registry=registry)
        self.last_fallback = Gauge(
            ROUTE_LAST_FALLBACK, "Unix time a request was last sent on from this route to another (0: never)", ["route"], registry=registry
        )
        self.ttft_average = Gauge(
            ROUTE_TTFT_AVERAGE, "Moving average of the route's time to first token (what cost-optimized compares)", ["route"],
            registry=registry,
        )  # fmt: skip


def _usage(data: Any) -> tuple[int, int] | None:
    usage = data.get("usage") if isinstance(data, dict) else None
    if not isinstance(usage, dict):
        return None
    return int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)


class Router:
    """The ASGI app: /v1/chat/completions and /v1/completions routed, /v1/models, /health, /metrics."""

    def __init__(self, table: RouteTable, log_file: Path, vllm_key_file: Path, registry: CollectorRegistry | None = None) -> None:
        self.routes = Routes(table)
        self.table = table
        self.route_log = RouteLog(log_file)
        self.vllm_key_file = vllm_key_file
        self.registry = registry or CollectorRegistry()
        self.metrics = Metrics(self.registry)
        for tier in table.tiers:
            self.metrics.tier_up.labels(tier).set(1)
        # Every route is in the metrics from the start, its times 0 until something happens on it.
        for label in [f"tier:{name}" for name in table.tiers] + [f"provider:{name}" for name in table.providers]:
            for gauge in (self.metrics.last_success, self.metrics.last_failure, self.metrics.last_fallback):
                gauge.labels(label).set(0)
        self._keys: dict[str, bytes] = {}
        self._probes: dict[str, asyncio.Task[None]] = {}
        connect = table.connect_timeout_seconds
        self.origins = {f"tier:{name}": Origin(tier.url, connect) for name, tier in table.tiers.items()}
        self.origins |= {f"provider:{name}": Origin(p.base_url, connect) for name, p in table.providers.items()}
        # Only for the health probes of held-down tiers (rare); requests go through `origins`.
        self.client = httpx.AsyncClient(timeout=connect)

    def _key(self, route: Route) -> bytes:
        """The Authorization a route takes: the internal vLLM key, or the provider's own (read once, never logged)."""
        if route.label not in self._keys:
            path = self.vllm_key_file if route.local else self.routes.provider(route).key_file
            self._keys[route.label] = b"Bearer " + path.read_text().strip().encode()
        return self._keys[route.label]

    async def aclose(self) -> None:
        for task in self._probes.values():
            task.cancel()
        for origin in self.origins.values():
            origin.close()
        await self.client.aclose()
        self.route_log.close()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await self.aclose()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        if path in GENERATE_PATHS and method == "POST":
            await self.generate(scope, receive, send)
        elif path == "/v1/models" and method == "GET":
            await _respond(send, 200, self.models_body())
        elif path == "/health":
            await _respond(send, 200, b'{"status":"ok"}')
        elif path == "/metrics":
            await _respond(send, 200, generate_latest(self.registry), CONTENT_TYPE_LATEST.encode())
        else:
            await _respond(send, 404, error_body("Not found.", "invalid_request_error", "not_found"))

    def models_body(self) -> bytes:
        data = [{"id": model, "object": "model", "owned_by": "gpugate"} for model in sorted(self.table.models)]
        return json.dumps({"object": "list", "data": data}).encode()

    async def generate(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        exchange = Exchange(
            request_id=headers.get(REQUEST_ID_HEADER.lower(), "-"), key_id=headers.get(KEY_ID_HEADER.lower(), "-"), family="-"
        )
        try:
            body = await _read_body(receive)
            key_scope, policy, payload = self.admit(headers, body, exchange)
            order = self.routes.order(exchange.model, policy, key_scope.latency_objective_ms)
            plan = [r for r in order if not (r.local and not self.routes.tier_up(r.name))]
            if not plan:
                raise self.unavailable(exchange.model, policy)
            tail = await self.forward(scope["path"], headers, payload, plan, order[0], policy, exchange, send)
        except Refusal as refusal:
            exchange.status = refusal.status
            self.route_log.append(exchange.record())
            self.metrics.requests.labels(exchange.route, "", "", exchange.policy, f"refused_{refusal.status}").inc()
            extra = [(b"retry-after", str(refusal.retry_after).encode())] if refusal.retry_after else []
            await _respond(send, refusal.status, refusal.body, extra=extra, route=exchange.route)
            return
        # The record is in the log before the client sees the end of its answer.
        self.route_log.append(exchange.record())
        await send({"type": "http.response.body", "body": tail, "more_body": False})

    def admit(self, headers: dict[str, str], body: bytes, exchange: Exchange) -> tuple[KeyScope, RoutePolicy, dict[str, Any]]:
        """The key's scope, the policy it may use and the parsed body, or a Refusal saying why not."""
        raw_scope = headers.get(KEY_SCOPE_HEADER.lower())
        if raw_scope is not None and raw_scope.startswith(_UNSET_COPY):
            raw_scope = None  # authz sent no scope (a key without one): Caddy 2.6 copied its placeholder
        try:
            key_scope = (
                KeyScope.from_header(raw_scope)
                if raw_scope
                else KeyScope(family=exchange.key_id, default_policy=self.table.default_policy)
            )
        except ValueError:
            log.error("%s from authz is not a key scope: %r", KEY_SCOPE_HEADER, raw_scope[:80])
            raise Refusal(500, "The gateway could not read this key's scope.", "internal_error") from None
        exchange.family = key_scope.family
        policy = key_scope.default_policy
        asked = headers.get(ROUTE_POLICY_HEADER.lower())
        if asked:
            try:
                policy = RoutePolicy(asked)
            except ValueError:
                allowed = ", ".join(p.value for p in RoutePolicy)
                raise Refusal(400, f"Unknown route policy `{asked[:40]}`; allowed: {allowed}.", "invalid_route_policy") from None
            if not key_scope.allows_policy(policy):
                raise Refusal(403, f"This key may not use the route policy `{policy}`.", "route_policy_not_allowed")
        exchange.policy = str(policy)
        try:
            payload = json.loads(body)
        except ValueError:
            raise Refusal(400, "The request body is not valid JSON.", "invalid_json") from None
        model = payload.get("model") if isinstance(payload, dict) else None
        if not isinstance(model, str):
            raise Refusal(400, "The request body needs a `model`.", "missing_model")
        if model not in self.table.models:
            raise Refusal(404, f"The model `{model[:100]}` does not exist or you do not have access to it.", "model_not_found")
        exchange.model = model
        if not key_scope.allows_model(model):
            raise Refusal(403, f"This key may not use the model `{model}`.", "model_not_allowed")
        return key_scope, policy, payload

    def unavailable(self, model: str, policy: RoutePolicy, why: str | None = None) -> Refusal:
        local, remote = self.routes.candidates(model)
        if why is None:
            if policy is RoutePolicy.LOCAL_ONLY:
                why = (
                    f"the local tier `{local.name}` is not serving" if local else f"`{model}` has no local tier"
                ) + "; this request's route policy local-only never sends it off the gateway"
            else:
                why = "no route for this model can serve now"
        return Refusal(
            503,
            f"Cannot serve `{model}`: {why}. Retry after Retry-After seconds.",
            "route_unavailable",
            self.table.retry_after_seconds,
        )

    def _request(self, route: Route, headers: dict[str, str], payload: dict[str, Any]) -> tuple[list[tuple[bytes, bytes]], bytes]:
        body = dict(payload)
        body["model"] = route.upstream_model
        out = [(name.encode(), value.encode("latin-1")) for name, value in headers.items() if name in _PASS_REQUEST]
        out.append((b"authorization", self._key(route)))
        return out, json.dumps(body, separators=(",", ":")).encode()

    async def forward(
        self,
        path: str,
        headers: dict[str, str],
        payload: dict[str, Any],
        plan: list[Route],
        first: Route,
        policy: RoutePolicy,
        exchange: Exchange,
        send: Send,
    ) -> bytes:
        """Try the plan's routes in order until one answers (a 5xx or 429 counts as no answer while another
        route is left); `first` is the policy's first choice, held down or not: any other route that
        answers is a fallback."""
        stream = payload.get("stream") is True
        strip_usage = False
        if stream:
            options = payload.get("stream_options")
            if not (isinstance(options, dict) and options.get("include_usage")):
                # Ask for the final usage chunk to count tokens, and take it out of what the client gets.
                payload = {**payload, "stream_options": {**(options if isinstance(options, dict) else {}), "include_usage": True}}
                strip_usage = True
        response: Response | None = None
        for index, route in enumerate(plan):
            last = index == len(plan) - 1
            sent = time.perf_counter()
            try:
                request_headers, body = self._request(route, headers, payload)
            except OSError:
                log.error("cannot read the key of %s: the route is skipped", route.label)
                self._failed(route, "no_key")
                continue
            upstream_path = path if route.local else path.removeprefix("/v1")
            try:
                response = await self.origins[route.label].post(
                    upstream_path, request_headers, body, self.table.first_byte_timeout_seconds
                )
            except ConnectFailed:
                self._failed(route, "connect", hold=True)
                continue
            except FirstByteTimeout:
                self._failed(route, "timeout")
                continue
            except (UpstreamBroken, OSError):
                self._failed(route, "transport")
                continue
            if (response.status_code >= 500 or response.status_code == 429) and not last:
                self._failed(route, "status_429" if response.status_code == 429 else "status_5xx")
                await response.aclose()
                response = None
                continue
            exchange.route = route.label
            if route != first:
                exchange.fallback = True
                self.metrics.fallbacks.labels(first.label, route.label, str(policy)).inc()
                self.metrics.last_fallback.labels(first.label).set(time.time())
            return await self.relay(route, response, stream, strip_usage, sent, exchange, send, policy)
        exchange.fallback = False  # nothing answered
        raise self.unavailable(
            exchange.model, policy, None if policy is RoutePolicy.LOCAL_ONLY else "every route for this model failed"
        )

    def _failed(self, route: Route, reason: str, hold: bool = False) -> None:
        self.metrics.errors.labels(route.label, reason).inc()
        self.metrics.last_failure.labels(route.label).set(time.time())
        if hold and route.local:
            self.routes.hold_down(route.name)
            self.metrics.tier_up.labels(route.name).set(0)
            if route.name not in self._probes or self._probes[route.name].done():
                self._probes[route.name] = asyncio.get_running_loop().create_task(self._probe(route.name))

    async def _probe(self, tier: str) -> None:
        """Ask a held-down tier's /health until it answers 200; then traffic returns to it."""
        url = self.table.tiers[tier].url.rstrip("/") + "/health"
        while True:
            await asyncio.sleep(self.table.probe_interval_seconds)
            try:
                ok = (await self.client.get(url, timeout=self.table.connect_timeout_seconds)).status_code == 200
            except httpx.HTTPError:
                ok = False
            if ok:
                self.routes.release(tier)
                self.metrics.tier_up.labels(tier).set(1)
                log.info("tier %s is healthy again", tier)
                return
            self.routes.hold_down(tier)

    async def relay(
        self,
        route: Route,
        response: Response,
        stream: bool,
        strip_usage: bool,
        sent: float,
        exchange: Exchange,
        send: Send,
        policy: RoutePolicy,
    ) -> bytes:
        """Pass the chosen route's answer to the client as it arrives; count its tokens on the way. Returns
        the last bytes of an answer with a Content-Length, which the caller sends after the record."""
        exchange.status = response.status_code
        out = [(k, v) for k, v in response.headers if k.lower() not in _DROP_RESPONSE]
        sse = stream and (response.header(b"content-type") or b"").startswith(b"text/event-stream")
        if sse and strip_usage:
            out = [(k, v) for k, v in out if k.lower() != b"content-length"]
        out.append((ROUTE_HEADER.lower().encode(), route.label.encode()))
        await send({"type": "http.response.start", "status": response.status_code, "headers": out})
        usage: tuple[int, int] | None = None
        scanned = bytearray()
        tail = b""
        try:
            chunks = _events(response.chunks()) if sse else response.chunks()
            async for chunk in chunks:
                if exchange.ttft_s is None:
                    exchange.ttft_s = time.perf_counter() - sent
                if sse:
                    found = _event_usage(chunk)
                    if found is not None:
                        usage = found[0]
                        if strip_usage and found[1]:
                            continue
                else:
                    if len(scanned) < USAGE_SCAN_BYTES:
                        scanned += chunk
                    # An answer with a Content-Length is complete for the client with its last byte: hold
                    # each chunk until the next arrives, so the last goes out after the record is written.
                    chunk, tail = tail, chunk
                    if not chunk:
                        continue
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        finally:
            await response.aclose()
        if not sse and scanned:
            try:
                usage = _usage(json.loads(scanned))
            except ValueError:
                usage = None
        if usage is not None:
            exchange.input_tokens, exchange.output_tokens = usage
            if not route.local:
                exchange.cost_usd = self.routes.provider(route).cost_usd(*usage)
            self.metrics.tokens.labels("input", route.label).observe(usage[0])
            self.metrics.tokens.labels("output", route.label).observe(usage[1])
        if exchange.ttft_s is not None and response.status_code < 400:
            self.routes.observe_ttft(route, exchange.ttft_s)
            self.metrics.ttft.labels(route.label).observe(exchange.ttft_s)
            self.metrics.ttft_average.labels(route.label).set(self.routes.ttft[route.label])
        if response.status_code < 400:
            self.metrics.last_success.labels(route.label).set(time.time())
        elif response.status_code in ROUTE_FAILED_STATUS or response.status_code >= 500:
            # The last route's own failure, relayed as it is: the route failed, not the request.
            self.metrics.last_failure.labels(route.label).set(time.time())
        tier, provider = (route.name, "") if route.local else ("", route.name)
        outcome = "ok" if response.status_code < 400 else f"status_{response.status_code}"
        self.metrics.requests.labels(route.label, tier, provider, str(policy), outcome).inc()
        return tail


async def _events(raw: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """An SSE stream cut at event boundaries (a blank line), so that one event can be left out whole."""
    pending = b""
    async for chunk in raw:
        pending += chunk
        lf, crlf = pending.rfind(b"\n\n"), pending.rfind(b"\r\n\r\n")
        if lf < 0 and crlf < 0:
            continue
        end = max(lf + 2 if lf >= 0 else 0, crlf + 4 if crlf >= 0 else 0)
        yield pending[:end]
        pending = pending[end:]
    if pending:
        yield pending


def _event_usage(chunk: bytes) -> tuple[tuple[int, int], bool] | None:
    """The usage an SSE chunk reports, and whether it is the usage-only final chunk (no choices)."""
    if b'"usage"' not in chunk:
        return None
    found = None
    usage_only = False
    for line in chunk.split(b"\n"):
        if not line.startswith(b"data: {") or b'"usage"' not in line:
            continue
        try:
            data = json.loads(line[6:])
        except ValueError:
            continue
        usage = _usage(data)
        if usage is not None:
            found = usage
            usage_only = not data.get("choices")
    return None if found is None else (found, usage_only and chunk.count(b"data: ") == 1)


async def _read_body(receive: Receive) -> bytes:
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            return body


async def _respond(
    send: Send,
    status: int,
    body: bytes,
    content_type: bytes = b"application/json",
    extra: list[tuple[bytes, bytes]] | None = None,
    route: str | None = None,
) -> None:
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode()), *(extra or [])]
    if route is not None:
        headers.append((ROUTE_HEADER.lower().encode(), route.encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})

"""Caddy's forward_auth service: checks client keys, enforces per-key limits, exports metrics."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from gpugate_runtime.accesslog import NO_KEY, AccessLogTail
from gpugate_runtime.contract.host import KEY_ID_HEADER, REQUEST_ID_HEADER
from gpugate_runtime.contract.metrics import (
    AUTHZ_DECISION_SECONDS,
    AUTHZ_DECISIONS,
    KEY_AGE_SECONDS,
    KEY_LAST_USED,
    KEYSTORE_RELOAD_FAILURES,
    KEYSTORE_RELOADS,
)
from gpugate_runtime.decisionlog import sync_decision_log
from gpugate_runtime.keys import KeyStore, KeyStoreError, bearer_key, read_store
from gpugate_runtime.limits import Inflight, TokenBuckets
from gpugate_runtime.settings import AuthzSettings

# forward_auth rewrites the request to a bodyless GET, so Go drops Content-Length on the way to authz;
# the Caddyfile copies it into this header (and overwrites whatever a client put there).
BODY_LENGTH_HEADER = "X-Gpugate-Content-Length"
# How long a request at its key's concurrency limit waits for a just-finished request's log line.
CONCURRENCY_GRACE_SECONDS = 0.02

log = logging.getLogger("gpugate_runtime.authz")

Scope = dict[str, Any]
Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]


class Outcome(StrEnum):
    ALLOWED = "allowed"
    MISSING_KEY = "missing_key"
    MALFORMED_KEY = "malformed_key"
    UNKNOWN_KEY = "unknown_key"
    EXPIRED_KEY = "expired_key"
    REVOKED_KEY = "revoked_key"
    RATE_LIMITED = "rate_limited"
    CONCURRENCY_LIMITED = "concurrency_limited"
    BODY_TOO_LARGE = "body_too_large"
    LENGTH_REQUIRED = "length_required"


def _error(message: str, kind: str, code: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": kind, "code": code}}).encode()


# ASGI servers hand header names over lower-cased.
_KEY_ID = KEY_ID_HEADER.lower().encode()
_REQUEST_ID = REQUEST_ID_HEADER.lower().encode()
_BODY_LENGTH = BODY_LENGTH_HEADER.lower().encode()
_JSON = (b"content-type", b"application/json")
_CHALLENGE = (b"www-authenticate", b'Bearer realm="gpugate"')
_UNAUTHORIZED: dict[Outcome, bytes] = {
    Outcome.MISSING_KEY: _error(
        "Missing API key: send it as `Authorization: Bearer <key>`.", "invalid_request_error", "invalid_api_key"
    ),
    Outcome.MALFORMED_KEY: _error("Malformed API key.", "invalid_request_error", "invalid_api_key"),
    Outcome.UNKNOWN_KEY: _error("Incorrect API key provided.", "invalid_request_error", "invalid_api_key"),
    Outcome.EXPIRED_KEY: _error("This API key has expired.", "invalid_request_error", "invalid_api_key"),
    Outcome.REVOKED_KEY: _error("This API key has been revoked.", "invalid_request_error", "invalid_api_key"),
}
_NOT_FOUND = _error("Not found.", "invalid_request_error", "not_found")


@dataclass(frozen=True, slots=True)
class Decision:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    key_id: str
    outcome: Outcome
    request_id: str
    seconds: float


@dataclass(frozen=True, slots=True)
class LiveKey:
    """A key as authz serves it: times as epoch seconds, limits resolved against the stack defaults."""

    id: str
    name: str
    digest: bytes
    created_at: float
    expires_at: float
    revoked_at: float | None
    rpm: int
    max_concurrent: int


def live_keys(store: KeyStore, default_rpm: int, default_max_concurrent: int) -> dict[str, LiveKey]:
    return {
        k.id: LiveKey(
            id=k.id,
            name=k.name,
            digest=bytes.fromhex(k.sha256),
            created_at=k.created_at.timestamp(),
            expires_at=k.expires_at.timestamp(),
            revoked_at=k.revoked_at.timestamp() if k.revoked_at else None,
            rpm=k.rpm or default_rpm,
            max_concurrent=k.max_concurrent or default_max_concurrent,
        )
        for k in store.keys
    }


class KeyStoreWatcher:
    """Reloads the key store when its inode, size or mtime changes; refuses a store that does not
    parse and keeps serving the keys it had."""

    def __init__(self, settings: AuthzSettings, reloads: Counter, failures: Counter) -> None:
        self.path = settings.key_store
        self._defaults = (settings.default_rpm, settings.default_max_concurrent)
        self._reloads, self._failures = reloads, failures
        self._signature: tuple[int, int, int] | None = None
        self.keys: dict[str, LiveKey] = {}
        self.loaded_once = False

    def check(self) -> None:
        """Reload if the file changed: one stat() when it did not."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            if self.loaded_once and self._signature is not None:
                self._signature = None
                self._failures.inc()
                log.error("key store %s disappeared; still serving the %d keys loaded before", self.path, len(self.keys))
            elif not self.loaded_once and self._signature is None:
                self._signature = (0, 0, 0)
                log.warning("key store %s does not exist yet: every key is rejected until it does", self.path)
            return
        signature = (st.st_ino, st.st_size, st.st_mtime_ns)
        if signature == self._signature:
            return
        self._signature = signature
        try:
            store = read_store(self.path)
        except KeyStoreError as exc:
            self._failures.inc()
            log.error("refused key store: %s; still serving the %d keys loaded before", exc, len(self.keys))
            return
        self.keys = live_keys(store, *self._defaults)
        self.loaded_once = True
        self._reloads.inc()
        log.info("loaded key store %s: %d keys", self.path, len(self.keys))


class KeyCollector:
    """Per-key gauges computed at scrape time, so revoked and expired keys drop out of the series."""

    def __init__(self, authz: Authz) -> None:
        self._authz = authz

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return []

    def collect(self) -> Iterable[GaugeMetricFamily]:
        now = time.time()
        age = GaugeMetricFamily(KEY_AGE_SECONDS, "Age of each active client key.", labels=["key_id", "name"])
        used = GaugeMetricFamily(KEY_LAST_USED, "When each key was last allowed (since authz started).", labels=["key_id"])
        for key in self._authz.watcher.keys.values():
            if key.expires_at > now and (key.revoked_at is None or key.revoked_at > now):
                age.add_metric([key.id, key.name], now - key.created_at)
        for key_id, stamp in self._authz.last_used.items():
            used.add_metric([key_id], stamp)
        yield age
        yield used


class Authz:
    """The ASGI application: GET /authz (decision), /metrics, /health."""

    def __init__(self, settings: AuthzSettings) -> None:
        self.settings = settings
        self.registry = CollectorRegistry()
        self._decisions = Counter(AUTHZ_DECISIONS, "Authorization decisions.", ["key_id", "outcome"], registry=self.registry)
        self._latency = Histogram(
            AUTHZ_DECISION_SECONDS,
            "Time authz spends on one decision.",
            buckets=(0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05),
            registry=self.registry,
        )
        reloads = Counter(KEYSTORE_RELOADS, "Key store loads that succeeded.", registry=self.registry)
        failures = Counter(KEYSTORE_RELOAD_FAILURES, "Key store loads that were refused.", registry=self.registry)
        self.registry.register(KeyCollector(self))
        self.watcher = KeyStoreWatcher(settings, reloads, failures)
        self.buckets = TokenBuckets()
        self.inflight = Inflight(settings.inflight_ttl_seconds)
        self.tail = AccessLogTail(settings.access_log)
        self.last_used: dict[str, float] = {}
        self._children: dict[tuple[str, Outcome], Any] = {}
        self._task: asyncio.Task[None] | None = None
        self._activity = asyncio.Event()  # set by each decision; wakes an idle maintenance loop

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        self.watcher.check()
        list(self.tail.check_rotation())
        self._task = asyncio.get_running_loop().create_task(self._maintain())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self.tail.close()
        sync_decision_log()

    async def _maintain(self) -> None:
        interval = self.settings.reload_interval_seconds
        poll = self.settings.access_log_poll_seconds
        next_check = 0.0
        while True:
            self._activity.clear()
            try:
                now = time.monotonic()
                finished = list(self.tail.read())
                if now >= next_check:
                    next_check = now + interval
                    self.watcher.check()
                    finished += self.tail.check_rotation()
                for key_id, request_id in finished:
                    self.inflight.release(key_id, request_id)
                dropped = self.inflight.expire(now)
                if dropped:
                    log.warning("released %d in-flight slots after %.0f s without an access-log entry", dropped, self.inflight.ttl)
                sync_decision_log()
            except Exception:  # noqa: BLE001 - this loop must outlive any one bad iteration
                log.exception("authz maintenance failed; retrying")
            if self.inflight.total():
                await asyncio.sleep(poll)
                continue
            # No slot open: there is nothing to release or expire, so an idle authz wakes only for
            # the next store check (not 20 times a second). A decision wakes it (`record`), and the
            # tick then comes `poll` later, as it would have: its decision line is still written
            # within one poll, and a slot it took is watched at the usual pace.
            try:
                async with asyncio.timeout(max(0.0, next_check - time.monotonic())):
                    await self._activity.wait()
            except TimeoutError:
                continue
            await asyncio.sleep(poll)

    # -- the decision ----------------------------------------------------------------------------

    def drain_access_log(self) -> None:
        for key_id, request_id in self.tail.read():
            self.inflight.release(key_id, request_id)

    def decide(self, headers: Iterable[tuple[bytes, bytes]], final: bool = True) -> Decision | None:
        """The answer to one /authz request; None (only when not final) for a key at its
        concurrency limit, to be decided again after CONCURRENCY_GRACE_SECONDS."""
        started = time.perf_counter()
        auth = request_id = length = method = None
        for name, value in headers:
            if name == b"authorization":
                auth = value
            elif name == _REQUEST_ID:
                request_id = value
            elif name == _BODY_LENGTH:
                length = value
            elif name == b"x-forwarded-method":
                method = value
        rid = request_id.decode("latin-1")[:128] if request_id else ""
        outcome, key, wait = self._check(auth, length, method, rid, final)
        if outcome is None:
            return None
        key_id = key.id if key else NO_KEY

        if outcome is Outcome.ALLOWED:
            status, headers_out, body = 200, [(_KEY_ID, key_id.encode()), (b"content-length", b"0")], b""
        elif outcome in _UNAUTHORIZED:
            body = _UNAUTHORIZED[outcome]
            status, headers_out = 401, [_JSON, _CHALLENGE]
        elif outcome is Outcome.RATE_LIMITED:
            assert key is not None
            body = _error(f"Rate limit reached for this key: {key.rpm} requests per minute.", "requests", "rate_limit_exceeded")
            status, headers_out = 429, [_JSON, (b"retry-after", str(max(1, math.ceil(wait))).encode())]
        elif outcome is Outcome.CONCURRENCY_LIMITED:
            assert key is not None
            body = _error(
                f"Too many concurrent requests for this key: at most {key.max_concurrent} in flight.",
                "requests",
                "rate_limit_exceeded",
            )
            status, headers_out = 429, [_JSON, (b"retry-after", b"1")]
        elif outcome is Outcome.BODY_TOO_LARGE:
            body = _error(
                f"Request body too large: the limit is {self.settings.max_body_bytes} bytes.",
                "invalid_request_error",
                "request_too_large",
            )
            status, headers_out = 413, [_JSON]
        else:
            body = _error("A request body needs a Content-Length.", "invalid_request_error", "length_required")
            status, headers_out = 411, [_JSON]
        if body:
            headers_out.append((b"content-length", str(len(body)).encode()))

        return Decision(status, headers_out, body, key_id, outcome, rid, time.perf_counter() - started)

    def record(self, decision: Decision) -> None:
        """Count and log a decision; called once the answer is on its way to Caddy."""
        child = self._children.get((decision.key_id, decision.outcome))
        if child is None:
            child = self._decisions.labels(decision.key_id, decision.outcome.value)
            self._children[(decision.key_id, decision.outcome)] = child
        child.inc()
        self._latency.observe(decision.seconds)
        self._activity.set()
        log.info(
            {
                "request_id": decision.request_id,
                "key_id": decision.key_id,
                "outcome": decision.outcome.value,
                "status": decision.status,
                "latency_ms": round(decision.seconds * 1e3, 3),
            }
        )

    def _check(
        self, auth: bytes | None, length: bytes | None, method: bytes | None, rid: str, final: bool
    ) -> tuple[Outcome | None, LiveKey | None, float]:
        """The outcome, the key it concerns (None when no key was accepted) and, if rate limited, the wait."""
        if not auth:
            return Outcome.MISSING_KEY, None, 0.0
        parsed = bearer_key(auth)
        if parsed is None:
            return Outcome.MALFORMED_KEY, None, 0.0
        key_id, token = parsed
        key = self.watcher.keys.get(key_id)
        if key is None:
            # A key issued a moment ago works at once: an unknown id costs one stat() of the store.
            self.watcher.check()
            key = self.watcher.keys.get(key_id)
        # Key ids are not secret; the secret part is compared in constant time through its hash.
        if key is None or not hmac.compare_digest(hashlib.sha256(token.encode()).digest(), key.digest):
            return Outcome.UNKNOWN_KEY, None, 0.0
        now = time.time()
        if key.revoked_at is not None and key.revoked_at <= now:
            return Outcome.REVOKED_KEY, key, 0.0
        if key.expires_at <= now:
            return Outcome.EXPIRED_KEY, key, 0.0
        if length:
            try:
                size = int(length)
            except ValueError:
                return Outcome.LENGTH_REQUIRED, key, 0.0
            if size > self.settings.max_body_bytes:
                return Outcome.BODY_TOO_LARGE, key, 0.0
        elif method not in (None, b"GET", b"HEAD", b"OPTIONS", b"DELETE"):
            # A chunked body has no length to check here, and Caddy's request_body would cut it with a 502.
            return Outcome.LENGTH_REQUIRED, key, 0.0
        mono = time.monotonic()
        # Slots are only taken while the access log, which gives them back, can be read: without it
        # every key would lock itself out after max_concurrent requests until the TTL.
        enforce_concurrency = self.tail.healthy
        if enforce_concurrency and self.inflight.count(key.id) >= key.max_concurrent:
            # Caddy writes a request's access-log line as the response ends, which can be a moment
            # after a fast client already sent its next request: read the log now, and once more
            # after a short grace, before refusing.
            self.drain_access_log()
            if self.inflight.count(key.id) >= key.max_concurrent:
                if not final:
                    return None, key, 0.0
                return Outcome.CONCURRENCY_LIMITED, key, 0.0
        wait = self.buckets.take(key.id, key.rpm, mono)
        if wait:
            return Outcome.RATE_LIMITED, key, wait
        if enforce_concurrency:
            self.inflight.acquire(key.id, rid, mono)
        self.last_used[key.id] = now
        return Outcome.ALLOWED, key, 0.0

    # -- ASGI ------------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path = scope["path"]
            if path == "/authz":
                decision = self.decide(scope["headers"], final=False)
                if decision is None:
                    await asyncio.sleep(CONCURRENCY_GRACE_SECONDS)
                    decision = self.decide(scope["headers"])
                assert decision is not None
                try:
                    await send({"type": "http.response.start", "status": decision.status, "headers": decision.headers})
                    await send({"type": "http.response.body", "body": decision.body})
                finally:
                    self.record(decision)
                return
            if path == "/metrics":
                body = generate_latest(self.registry)
                status, headers = 200, [(b"content-type", CONTENT_TYPE_LATEST.encode())]
                headers.append((b"content-length", str(len(body)).encode()))
            elif path == "/health":
                status, headers, body = 200, [(b"content-length", b"2")], b"ok"
            else:
                status, headers, body = 404, [_JSON, (b"content-length", str(len(_NOT_FOUND)).encode())], _NOT_FOUND
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": body})
        elif scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    self.start()
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await self.stop()
                    await send({"type": "lifespan.shutdown.complete"})
                    return



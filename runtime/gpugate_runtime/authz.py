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
    KEY_BUDGET_USED_RATIO,
    KEY_LAST_USED,
    KEYSTORE_RELOAD_FAILURES,
    KEYSTORE_RELOADS,
    SPEND_RECORDS,
)
from gpugate_runtime.contract.routing import KEY_SCOPE_HEADER, RouteRecord
from gpugate_runtime.decisionlog import sync_decision_log
from gpugate_runtime.keys import bearer_key
from gpugate_runtime.limits import Inflight, TokenBuckets
from gpugate_runtime.livekeys import KeyStoreWatcher, LiveKey, exhausted_budget
from gpugate_runtime.settings import AuthzSettings
from gpugate_runtime.sharedlimits import SharedLimits, connect, unreachable_errors
from gpugate_runtime.spend import FileSpendStore, Ledger, RedisSpendStore, RouteLogTail, SpendStore, period_end, period_id

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
    BUDGET_EXHAUSTED = "budget_exhausted"
    TPM_LIMITED = "tpm_limited"
    LIMITS_UNAVAILABLE = "limits_unavailable"


def _error(message: str, kind: str, code: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": kind, "code": code}}).encode()


# ASGI servers hand header names over lower-cased.
_KEY_ID = KEY_ID_HEADER.lower().encode()
_KEY_SCOPE = KEY_SCOPE_HEADER.lower().encode()
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
_SHARED_OUTCOMES = {
    "budget_tokens": Outcome.BUDGET_EXHAUSTED,
    "budget_usd": Outcome.BUDGET_EXHAUSTED,
    "tpm": Outcome.TPM_LIMITED,
    "concurrency": Outcome.CONCURRENCY_LIMITED,
    "rpm": Outcome.RATE_LIMITED,
}


@dataclass(frozen=True, slots=True)
class Decision:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    key_id: str
    outcome: Outcome
    request_id: str
    seconds: float


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
        ratio = GaugeMetricFamily(
            KEY_BUDGET_USED_RATIO,
            "Share of each key family's budget spent in its current period.",
            labels=["family", "budget", "period"],
        )
        seen: set[tuple[str, str]] = set()
        for key in self._authz.watcher.keys.values():
            if not key.has_budget or key.expires_at <= now or (key.revoked_at is not None and key.revoked_at <= now):
                continue
            spent = self._authz.budget_view.spent(key.family, key.budget_period, now)
            for budget, limit, used_ in (("tokens", key.budget_tokens, spent.tokens), ("usd", key.budget_usd, spent.usd)):
                if limit is not None and (key.family, budget) not in seen:
                    seen.add((key.family, budget))
                    ratio.add_metric([key.family, budget, key.budget_period], used_ / limit)
        yield age
        yield used
        yield ratio


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
        self._spend_records = Counter(
            SPEND_RECORDS, "Route-log records accounted into key families' spend.", registry=self.registry
        )
        reloads = Counter(KEYSTORE_RELOADS, "Key store loads that succeeded.", registry=self.registry)
        failures = Counter(KEYSTORE_RELOAD_FAILURES, "Key store loads that were refused.", registry=self.registry)
        self.registry.register(KeyCollector(self))
        self.watcher = KeyStoreWatcher(settings, reloads, failures)
        self.buckets = TokenBuckets()
        self.inflight = Inflight(settings.inflight_ttl_seconds)
        self.tail = AccessLogTail(settings.access_log)
        # Spend: one host keeps it in a file (its ledger is then what decisions check); replicas share Redis,
        # whose script checks it, and `budget_view` is a copy refreshed each store check, for the metrics.
        self.shared: SharedLimits | None = None
        self.spend: SpendStore
        self.file_spend: FileSpendStore | None = None
        self.budget_view = Ledger()
        self.route_tail: RouteLogTail
        self._unaccounted: list[RouteRecord] = []
        self.last_used: dict[str, float] = {}
        self._children: dict[tuple[str, Outcome], Any] = {}
        self._task: asyncio.Task[None] | None = None
        self._activity = asyncio.Event()  # set by each decision; wakes an idle maintenance loop

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        self.watcher.check()
        list(self.tail.check_rotation())
        if self.settings.redis_url:
            password = self.settings.redis_password_file.read_text().strip() if self.settings.redis_password_file else None
            client = connect(self.settings.redis_url, password)
            self.shared = SharedLimits(client, self.inflight.ttl)
            self.spend = RedisSpendStore(client)
            self.route_tail = RouteLogTail(self.settings.route_log_path)  # from its end: replicas cannot share a cursor
        else:
            self.file_spend = FileSpendStore(self.settings.spend_store_path)
            self.spend = self.file_spend
            self.budget_view = self.file_spend.ledger
            self.route_tail = RouteLogTail(self.settings.route_log_path, self.file_spend.cursor)
        self._task = asyncio.get_running_loop().create_task(self._maintain())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self.tail.close()
        self.route_tail.close()
        await self.spend.close()
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
                    await self._account()
                if self.shared is not None:
                    await self._release_shared(finished)
                    self.shared.forget_expired(now)
                for key_id, request_id in finished:
                    self.inflight.release(key_id, request_id)
                dropped = self.inflight.expire(now)
                if dropped:
                    log.warning("released %d in-flight slots after %.0f s without an access-log entry", dropped, self.inflight.ttl)
                sync_decision_log()
            except Exception:  # noqa: BLE001 - this loop must outlive any one bad iteration
                log.exception("authz maintenance failed; retrying")
            if self.inflight.total() or (self.shared is not None and self.shared.held()):
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

    async def _account(self) -> None:
        """Add the route log's new records to their families' spend (each store check, so budgets hold within one)."""
        records = self._unaccounted + self.route_tail.read()
        self._unaccounted = []
        if records:
            try:
                await self.spend.add(records)
            except unreachable_errors() as exc:
                self._unaccounted = records[-100_000:]  # kept for the next check; bounded while the store is away
                log.error("could not add %d route records to the shared spend store (%s); retrying", len(records), exc)
                return
            self._spend_records.inc(len(records))
        if self.file_spend is not None:
            if records or (self.route_tail.cursor != self.file_spend.cursor and self.route_tail.healthy):
                self.file_spend.save(self.route_tail.cursor)
            return
        families = {k.family: k.budget_period for k in self.watcher.keys.values() if k.has_budget}
        view = Ledger()
        now = time.time()
        try:
            for period in {*families.values()}:
                names = [f for f, p in families.items() if p == period]
                for family, spent in (await self.spend.spent(names, period, now)).items():
                    view.periods.setdefault(family, {})[period_id(period, now)] = spent
        except unreachable_errors():
            return  # the metrics keep the last view; decisions answer 503 on their own
        self.budget_view = view

    async def _release_shared(self, finished: list[tuple[str, str]]) -> None:
        assert self.shared is not None
        try:
            await self.shared.release(finished)
        except unreachable_errors() as exc:
            log.warning("could not give %d slots back to the shared store (%s); they expire after the TTL", len(finished), exc)

    # -- the decision ----------------------------------------------------------------------------

    def drain_access_log(self) -> None:
        for key_id, request_id in self.tail.read():
            self.inflight.release(key_id, request_id)

    @staticmethod
    def _parse(headers: Iterable[tuple[bytes, bytes]]) -> tuple[bytes | None, str, bytes | None, bytes | None]:
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
        return auth, request_id.decode("latin-1")[:128] if request_id else "", length, method

    def decide(self, headers: Iterable[tuple[bytes, bytes]], final: bool = True) -> Decision | None:
        """The answer to one /authz request with this process's own limits; None (only when not final)
        for a key at its concurrency limit, to be decided again after CONCURRENCY_GRACE_SECONDS."""
        started = time.perf_counter()
        auth, rid, length, method = self._parse(headers)
        outcome, key = self._identify(auth, length, method)
        wait, detail = 0.0, ""
        if outcome is Outcome.ALLOWED:
            assert key is not None
            outcome, wait, detail = self._limit(key, rid, final)
            if outcome is None:
                return None
        return self._answer(outcome, key, wait, detail, rid, started)

    async def decide_shared(self, headers: Iterable[tuple[bytes, bytes]]) -> Decision:
        """The answer to one /authz request with the limits every replica shares in Redis."""
        assert self.shared is not None
        started = time.perf_counter()
        auth, rid, length, method = self._parse(headers)
        outcome, key = self._identify(auth, length, method)
        wait, detail = 0.0, ""
        if outcome is Outcome.ALLOWED:
            assert key is not None
            outcome, wait, detail = await self._limit_shared(key, rid)
        return self._answer(outcome, key, wait, detail, rid, started)

    def _answer(self, outcome: Outcome, key: LiveKey | None, wait: float, detail: str, rid: str, started: float) -> Decision:
        key_id = key.id if key else NO_KEY
        if outcome is Outcome.ALLOWED:
            assert key is not None
            headers_out = [(_KEY_ID, key_id.encode()), (_KEY_SCOPE, key.scope_header), (b"content-length", b"0")]
            status, body = 200, b""
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
        elif outcome is Outcome.BUDGET_EXHAUSTED:
            assert key is not None
            limit = f"{key.budget_tokens} tokens" if detail == "tokens" else f"{key.budget_usd:g} USD"
            kind = "token" if detail == "tokens" else "cost"
            reset = period_end(key.budget_period, time.time())
            body = _error(
                f"The {kind} budget '{key.budget_period}' ({limit} per UTC {key.budget_period}) of key family "
                f"{key.family} is spent; it resets at {reset:%Y-%m-%dT%H:%M:%SZ}.",
                "insufficient_quota",
                "budget_exceeded",
            )
            status, headers_out = 429, [_JSON, (b"retry-after", str(max(1, math.ceil(reset.timestamp() - time.time()))).encode())]
        elif outcome is Outcome.TPM_LIMITED:
            assert key is not None
            body = _error(
                f"Token rate limit reached for key family {key.family}: {key.tpm} tokens per minute (tpm).",
                "tokens",
                "rate_limit_exceeded",
            )
            status, headers_out = 429, [_JSON, (b"retry-after", str(max(1, math.ceil(60 - time.time() % 60))).encode())]
        elif outcome is Outcome.LIMITS_UNAVAILABLE:
            body = _error(
                "The gateway's shared limits store is unreachable; retry after Retry-After.", "server_error", "service_unavailable"
            )
            status, headers_out = 503, [_JSON, (b"retry-after", b"1")]
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

    def _identify(self, auth: bytes | None, length: bytes | None, method: bytes | None) -> tuple[Outcome, LiveKey | None]:
        """Who is asking, and whether the request is well framed: ALLOWED here means "now check the limits"."""
        if not auth:
            return Outcome.MISSING_KEY, None
        parsed = bearer_key(auth)
        if parsed is None:
            return Outcome.MALFORMED_KEY, None
        key_id, token = parsed
        key = self.watcher.keys.get(key_id)
        if key is None:
            # A key issued a moment ago works at once: an unknown id costs one stat() of the store.
            self.watcher.check()
            key = self.watcher.keys.get(key_id)
        # Key ids are not secret; the secret part is compared in constant time through its hash.
        if key is None or not hmac.compare_digest(hashlib.sha256(token.encode()).digest(), key.digest):
            return Outcome.UNKNOWN_KEY, None
        now = time.time()
        if key.revoked_at is not None and key.revoked_at <= now:
            return Outcome.REVOKED_KEY, key
        if key.expires_at <= now:
            return Outcome.EXPIRED_KEY, key
        if length:
            try:
                size = int(length)
            except ValueError:
                return Outcome.LENGTH_REQUIRED, key
            if size > self.settings.max_body_bytes:
                return Outcome.BODY_TOO_LARGE, key
        elif method not in (None, b"GET", b"HEAD", b"OPTIONS", b"DELETE"):
            # A chunked body has no length to check here, and Caddy's request_body would cut it with a 502.
            return Outcome.LENGTH_REQUIRED, key
        return Outcome.ALLOWED, key

    def _limit(self, key: LiveKey, rid: str, final: bool) -> tuple[Outcome | None, float, str]:
        """This process's limits, in order: the family's budget and tpm, the key's concurrency and rpm."""
        now = time.time()
        if key.has_budget:
            spent = self.budget_view.spent(key.family, key.budget_period, now)
            exhausted = exhausted_budget(key, spent)
            if exhausted:
                return Outcome.BUDGET_EXHAUSTED, 0.0, exhausted
        if key.tpm is not None and self.budget_view.minute_tokens(key.family, now) >= key.tpm:
            return Outcome.TPM_LIMITED, 0.0, ""
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
                    return None, 0.0, ""
                return Outcome.CONCURRENCY_LIMITED, 0.0, ""
        wait = self.buckets.take(key.id, key.rpm, mono)
        if wait:
            return Outcome.RATE_LIMITED, wait, ""
        if enforce_concurrency:
            self.inflight.acquire(key.id, rid, mono)
        self.last_used[key.id] = now
        return Outcome.ALLOWED, 0.0, ""

    async def _limit_shared(self, key: LiveKey, rid: str) -> tuple[Outcome, float, str]:
        """The same limits held in Redis for every replica; unreachable: 503 (fail closed)."""
        assert self.shared is not None
        for attempt in (0, 1):
            now = time.time()
            try:
                verdict = await self.shared.admit(
                    key.id, key.family, rid,
                    rpm=key.rpm, max_concurrent=key.max_concurrent if self.tail.healthy else 0, tpm=key.tpm,
                    budget_tokens=key.budget_tokens, budget_usd=key.budget_usd, budget_period=key.budget_period, now=now,
                )  # fmt: skip
            except unreachable_errors() as exc:
                log.error("shared limits store unreachable (%s): refusing with 503", exc)
                return Outcome.LIMITS_UNAVAILABLE, 0.0, ""
            if verdict.outcome == "concurrency" and attempt == 0:
                # As in `_limit`: a finished request's access-log line may trail its client's next request.
                await self._release_shared(list(self.tail.read()))
                await asyncio.sleep(CONCURRENCY_GRACE_SECONDS)
                await self._release_shared(list(self.tail.read()))
                continue
            break
        if verdict.outcome == "ok":
            self.last_used[key.id] = now
            return Outcome.ALLOWED, 0.0, ""
        return _SHARED_OUTCOMES[verdict.outcome], verdict.wait, verdict.outcome.removeprefix("budget_")

    # -- ASGI ------------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path = scope["path"]
            if path == "/authz":
                if self.shared is not None:
                    decision: Decision | None = await self.decide_shared(scope["headers"])
                else:
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



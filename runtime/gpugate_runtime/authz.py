"""Caddy's forward_auth service: checks client keys, enforces per-key limits, exports metrics."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import math
import os
import re
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from logging.handlers import WatchedFileHandler
from pathlib import Path
from typing import Any

import typer
from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from pydantic import ValidationError

from gpugate_runtime.host import KEY_ID_HEADER, LOOPBACK, REQUEST_ID_HEADER
from gpugate_runtime.keys import TOKEN_RE, KeyStore, KeyStoreError, read_store
from gpugate_runtime.metricnames import (
    AUTHZ_DECISION_SECONDS,
    AUTHZ_DECISIONS,
    KEY_AGE_SECONDS,
    KEY_LAST_USED,
    KEYSTORE_RELOAD_FAILURES,
    KEYSTORE_RELOADS,
)
from gpugate_runtime.settings import AuthzSettings, env_file, load_settings

# forward_auth rewrites the request to a bodyless GET, so Go drops Content-Length on the way to authz;
# the Caddyfile copies it into this header (and overwrites whatever a client put there).
BODY_LENGTH_HEADER = "X-Gpugate-Content-Length"
# The access-log field carrying "<key id> <request id>" (Caddy 2.6 can add no fields of its own,
# so the Caddyfile maps both into `user_id` and renames it).
ACCESS_LOG_IDS_FIELD = "key_and_request_id"
NO_KEY = "-"  # key id placeholder in logs and in the access-log field when no key was accepted
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


class TokenBuckets:
    """Requests per minute as a token bucket per key: a full minute's allowance may come as a burst,
    then tokens refill continuously at rpm/60 per second."""

    def __init__(self) -> None:
        self._state: dict[str, list[float]] = {}

    def take(self, key_id: str, rpm: int, now: float) -> float:
        """Take one token; returns 0 when allowed, else the seconds until a token is available."""
        state = self._state.get(key_id)
        if state is None:
            state = self._state[key_id] = [float(rpm), now]
        rate = rpm / 60.0
        tokens = min(float(rpm), state[0] + (now - state[1]) * rate)
        state[1] = now
        if tokens >= 1.0:
            state[0] = tokens - 1.0
            return 0.0
        state[0] = tokens
        return (1.0 - tokens) / rate


# Concurrency limits. forward_auth only sees a request start, so authz cannot tell by itself when
# one ends. Caddy can: it writes the access-log entry as a request finishes (streaming or not,
# answered, failed upstream or cut by the client), and the Caddyfile puts "<key id> <request id>"
# in that entry. So an allowed request takes a slot of its key under (key id, request id), and the
# slot comes back when AccessLogTail reads that entry (every access_log_poll_seconds, and at once
# when a key is at its limit, since the line can trail a fast client's next request by a moment).
# What this cannot see: entries lost with a crash or kill of Caddy (a slot then lives until
# inflight_ttl_seconds), slots of requests in flight across an authz restart (forgotten: the key
# may briefly exceed its limit), and no slots are taken while the log cannot be read (a limit that
# nothing can release would lock every key out). tests/e2e/test_gateway_proxy.py proves it with
# real Caddy.


class Inflight:
    """Requests of each key that authz allowed and whose access-log entry has not arrived yet.

    Entries are keyed by (key id, request id) so that a client reusing a request id, even another
    client's, can only ever release slots of its own key. An entry older than the TTL is dropped:
    that bounds the damage of a lost access-log line (Caddy killed mid-request, log rotated away).
    """

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._open: dict[tuple[str, str], list[float]] = {}
        self._count: dict[str, int] = {}
        self._order: deque[tuple[float, str, str]] = deque()

    def count(self, key_id: str) -> int:
        return self._count.get(key_id, 0)

    def acquire(self, key_id: str, request_id: str, now: float) -> None:
        self._open.setdefault((key_id, request_id), []).append(now)
        self._count[key_id] = self._count.get(key_id, 0) + 1
        self._order.append((now, key_id, request_id))

    def release(self, key_id: str, request_id: str) -> bool:
        stamps = self._open.get((key_id, request_id))
        if not stamps:
            return False
        stamps.pop(0)
        if not stamps:
            del self._open[(key_id, request_id)]
        self._count[key_id] -= 1
        return True

    def expire(self, now: float) -> int:
        dropped = 0
        while self._order and self._order[0][0] <= now - self.ttl:
            stamp, key_id, request_id = self._order.popleft()
            stamps = self._open.get((key_id, request_id))
            if stamps and stamp in stamps:
                stamps.remove(stamp)
                if not stamps:
                    del self._open[(key_id, request_id)]
                self._count[key_id] -= 1
                dropped += 1
        return dropped

    def total(self) -> int:
        return sum(self._count.values())


class AccessLogTail:
    """Follows Caddy's JSON access log and yields (key id, request id) of each finished request.

    Reads from the end at start (earlier requests are not in flight here), survives Caddy's log
    rolling (a new inode: the old file is drained, the new one read from its start) and truncation.
    `healthy` is False while the file cannot be read.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.healthy = False
        self._fd: int | None = None
        self._ino: int | None = None
        self._rest = b""
        self._field = f'"{ACCESS_LOG_IDS_FIELD}"'.encode()
        # The ids are a key id and a request id Caddy checked (or made): no quote, no escape. Taking
        # them with a regex is a tenth of json.loads of the line, which matters at thousands of
        # lines a second; anything else (an escape) still goes through json.loads.
        self._plain = re.compile(rb'"' + ACCESS_LOG_IDS_FIELD.encode() + rb'":"([^"\\]*)"')

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
        self._fd = None
        self.healthy = False

    def _open(self, from_end: bool) -> None:
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError as exc:
            if self.healthy or self._ino is None:
                log.warning(
                    "access log %s unreadable (%s): concurrency limits are off until it is", self.path, exc.strerror
                )
            self._ino = -1
            self.healthy = False
            return
        if from_end:
            os.lseek(fd, 0, os.SEEK_END)
        self._fd, self._ino, self._rest = fd, os.fstat(fd).st_ino, b""
        if not self.healthy:
            log.info("following access log %s", self.path)
        self.healthy = True

    def check_rotation(self) -> Iterator[tuple[str, str]]:
        if self._fd is None:
            self._open(from_end=self._ino is None)
            return
        try:
            current = os.stat(self.path)
        except OSError:
            return  # rolled away and not yet recreated: keep draining the old file
        if current.st_ino != self._ino:
            yield from self.read()
            self.close()
            self._open(from_end=False)
        elif current.st_size < os.lseek(self._fd, 0, os.SEEK_CUR):
            os.lseek(self._fd, 0, os.SEEK_SET)
            self._rest = b""

    def read(self) -> Iterator[tuple[str, str]]:
        if self._fd is None:
            return
        while chunk := os.read(self._fd, 1 << 16):
            lines = (self._rest + chunk).split(b"\n")
            self._rest = lines.pop()
            for line in lines:
                ids = self._ids(line)
                if ids:
                    yield ids

    def _ids(self, line: bytes) -> tuple[str, str] | None:
        if self._field not in line:
            return None  # not an access-log entry of this gateway
        plain = self._plain.search(line)
        if plain and line.startswith(b"{") and line.rstrip().endswith(b"}"):
            value: Any = plain.group(1).decode("latin-1")
        else:
            try:
                value = json.loads(line).get(ACCESS_LOG_IDS_FIELD)
            except ValueError:
                return None
        if not isinstance(value, str):
            return None
        key_id, _, request_id = value.partition(" ")
        return (key_id, request_id) if key_id and key_id != NO_KEY else None  # NO_KEY: nothing was acquired


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
        scheme, _, credential = auth.partition(b" ")
        if scheme.lower() != b"bearer":
            return Outcome.MALFORMED_KEY, None, 0.0
        token = credential.strip().decode("latin-1")
        match = TOKEN_RE.match(token)
        if not match:
            return Outcome.MALFORMED_KEY, None, 0.0
        key = self.watcher.keys.get(match.group(1))
        if key is None:
            # A key issued a moment ago works at once: an unknown id costs one stat() of the store.
            self.watcher.check()
            key = self.watcher.keys.get(match.group(1))
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


class DecisionLog(WatchedFileHandler):
    """authz's log file, written through a buffer.

    WatchedFileHandler stats the file (has logrotate moved it?) and flushes its buffer for every
    record: two system calls per decision, which measured a third of authz's CPU per request
    (bench/gateway_overhead.py). Here decision lines collect in the file object's buffer and go out
    on the maintenance loop's next tick (`sync`), at most access_log_poll_seconds (50 ms by default)
    after the decision, which is also when rotation is checked; any other record (start-up, store
    reloads, warnings, errors) is written at once. A crash can lose at most one tick of decision lines.
    """

    def emit(self, record: logging.LogRecord) -> None:
        if not isinstance(record.msg, dict):
            super().emit(record)  # check rotation, write, flush
            return
        try:
            self.stream.write(self.format(record) + self.terminator)
        except Exception:  # noqa: BLE001 - logging's own contract: report and go on
            self.handleError(record)

    def sync(self) -> None:
        with self.lock:
            if self.stream:
                self.stream.flush()
            self.reopenIfNeeded()


def sync_decision_log() -> None:
    for handler in log.handlers:
        if isinstance(handler, DecisionLog):
            handler.sync()


class JsonLines(logging.Formatter):
    """One JSON object per line: decisions are logged as dicts, other events as text."""

    def format(self, record: logging.LogRecord) -> str:
        if isinstance(record.msg, dict):
            entry = {"ts": round(record.created, 6), **record.msg}
        else:
            entry = {"ts": round(record.created, 6), "level": record.levelname.lower(), "event": record.getMessage()}
            if record.exc_info:
                entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry, separators=(",", ":"))


def configure_logging(settings: AuthzSettings) -> None:
    # One log record per decision: skip what logging would otherwise gather for each (caller's
    # file and line, thread, process), a third of a decision's cost. See "Optimization" in the
    # logging HOWTO.
    logging._srcfile = None  # noqa: SLF001 - the documented switch
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    settings.log_file.parent.mkdir(parents=True, exist_ok=True)
    handler = DecisionLog(settings.log_file)  # buffered; reopens after logrotate moves the file
    handler.setFormatter(JsonLines())
    log.handlers[:] = [handler]
    log.setLevel(settings.log_level.upper())
    log.propagate = False
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING)  # uvicorn's own messages


# --- the `authz` command --------------------------------------------------------------------------

app = typer.Typer(help="The forward_auth service Caddy asks about every API request.", no_args_is_help=True, add_completion=False)


@app.callback()
def main() -> None:
    """The forward_auth service Caddy asks about every API request."""


@app.command()
def serve() -> None:
    """Serve /authz and /metrics on 127.0.0.1 (settings: GPUGATE_AUTHZ_* and the env file)."""
    try:
        settings = load_settings(AuthzSettings, env_file())
    except ValidationError as exc:
        typer.echo(f"error: authz settings (GPUGATE_AUTHZ_* or the env file) are invalid:\n{exc}", err=True)
        raise typer.Exit(2) from None
    configure_logging(settings)
    disable_created_metrics()
    import uvicorn  # noqa: PLC0415 - only the service needs it, not the renderer that imports constants

    from gpugate_runtime.quietserver import QuietServer  # noqa: PLC0415 - same: it imports uvicorn

    config = uvicorn.Config(
        Authz(settings),
        host=LOOPBACK,
        port=settings.port,
        http="httptools",
        loop="uvloop",
        lifespan="on",
        access_log=False,
        log_config=None,
        server_header=False,
        date_header=False,
        # Longer than Caddy's upstream keep-alive (2 min), so Caddy never reuses a connection we just closed.
        timeout_keep_alive=180,
    )
    QuietServer(config).run()

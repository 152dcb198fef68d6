"""Per-key limits in one authz process: a token bucket for requests per minute, and the requests in flight."""

from __future__ import annotations

from collections import deque


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

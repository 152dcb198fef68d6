"""Per-key limits held in one Redis for every authz replica: rpm, concurrency, tpm and budgets in one atomic script.

With `redis_url` set, an allowed request costs one round trip: a Lua script checks the family's budget
and tokens this minute, the key's requests in flight and its token bucket, and takes a slot and a token
only when all pass, so two replicas can never both take the last one. Time is Redis's own clock (TIME),
so replicas with skewed clocks still share one bucket. Slots come back as each replica reads its own
Caddy's access log (a replica releases only the slots it took); a slot whose release is lost expires
after the in-flight TTL. When Redis cannot be reached the limits fail closed: authz answers 503 with
Retry-After (a key check never needs Redis, so a bad key still gets its 401).
"""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any

from gpugate_runtime.spend import REDIS_PREFIX, minute_key, minute_of, period_id, spend_key

log = logging.getLogger("gpugate_runtime.authz")

# Returns {verdict, detail}: verdict ok | budget_tokens | budget_usd | tpm | concurrency | rpm; detail is
# the seconds to wait for rpm. Numbers go back as strings: Redis would cut a Lua float to an integer.
ADMIT_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local budget_tokens, budget_usd = tonumber(ARGV[6]), tonumber(ARGV[7])
if budget_tokens > 0 or budget_usd > 0 then
  local spent = redis.call('HMGET', KEYS[4], 'tokens', 'usd')
  if budget_tokens > 0 and tonumber(spent[1] or '0') >= budget_tokens then return {'budget_tokens', '0'} end
  if budget_usd > 0 and tonumber(spent[2] or '0') >= budget_usd then return {'budget_usd', '0'} end
end
local tpm = tonumber(ARGV[5])
if tpm > 0 and tonumber(redis.call('GET', KEYS[3]) or '0') >= tpm then return {'tpm', '0'} end
local ttl, max_concurrent = tonumber(ARGV[3]), tonumber(ARGV[2])
if max_concurrent > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - ttl)
  if redis.call('ZCARD', KEYS[2]) >= max_concurrent then return {'concurrency', '0'} end
end
local rpm = tonumber(ARGV[1])
local rate = rpm / 60
local bucket = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(bucket[1] or rpm)
local since = now - tonumber(bucket[2] or now)
if since < 0 then since = 0 end
tokens = math.min(rpm, tokens + since * rate)
if tokens < 1 then
  redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
  redis.call('EXPIRE', KEYS[1], 120)
  return {'rpm', tostring((1 - tokens) / rate)}
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens - 1), 'ts', tostring(now))
redis.call('EXPIRE', KEYS[1], 120)
if max_concurrent > 0 then
  redis.call('ZADD', KEYS[2], now, ARGV[4])
  redis.call('EXPIRE', KEYS[2], math.ceil(ttl) + 60)
end
return {'ok', '0'}
"""


@dataclass(frozen=True, slots=True)
class Verdict:
    outcome: str  # ok | budget_tokens | budget_usd | tpm | concurrency | rpm
    wait: float = 0.0


def connect(url: str, password: str | None = None) -> Any:
    """An asyncio Redis client for `url` (redis://[:password@]host:port/db or rediss:// for TLS), short timeouts:
    a decision must not hang on an unreachable store."""
    import redis.asyncio  # noqa: PLC0415 - only authz replicas that share limits need the client

    return redis.asyncio.Redis.from_url(
        url, password=password, socket_connect_timeout=0.5, socket_timeout=0.5, health_check_interval=30
    )


def unreachable_errors() -> tuple[type[BaseException], ...]:
    import redis.exceptions  # noqa: PLC0415

    return (redis.exceptions.RedisError, OSError, TimeoutError)


class SharedLimits:
    """The limits of every replica, in Redis; the slots this replica took, here, to give them back."""

    def __init__(self, client: Any, ttl: float) -> None:
        self.client = client
        self.ttl = ttl
        self._script = client.register_script(ADMIT_SCRIPT)
        self._replica = secrets.token_hex(4)  # slot names of this process: two replicas never share one
        self._seq = 0
        self._mine: dict[tuple[str, str], list[tuple[str, float]]] = {}

    async def admit(
        self,
        key_id: str,
        family: str,
        request_id: str,
        *,
        rpm: int,
        max_concurrent: int,
        tpm: int | None,
        budget_tokens: int | None,
        budget_usd: float | None,
        budget_period: str,
        now: float,
    ) -> Verdict:
        """One atomic check-and-take; max_concurrent 0 takes no slot (nothing could give it back)."""
        self._seq += 1
        member = f"{request_id}|{self._replica}{self._seq}"
        keys = [
            f"{REDIS_PREFIX}:rpm:{key_id}",
            f"{REDIS_PREFIX}:inflight:{key_id}",
            minute_key(family, minute_of(now)),
            spend_key(family, period_id(budget_period, now)),
        ]
        args = [rpm, max_concurrent, self.ttl, member, tpm or 0, budget_tokens or 0, budget_usd or 0]
        outcome, detail = await self._script(keys=keys, args=args)
        outcome = outcome.decode() if isinstance(outcome, bytes) else str(outcome)
        if outcome == "ok" and max_concurrent:
            self._mine.setdefault((key_id, request_id), []).append((member, time.monotonic()))
        return Verdict(outcome, float(detail))

    async def release(self, finished: list[tuple[str, str]]) -> int:
        """Give back the slots of requests whose access-log entry arrived; returns how many."""
        pipe, released = None, 0
        for key_id, request_id in finished:
            taken = self._mine.get((key_id, request_id))
            if not taken:
                continue
            member, _ = taken.pop(0)
            if not taken:
                del self._mine[(key_id, request_id)]
            pipe = pipe or self.client.pipeline(transaction=False)
            pipe.zrem(f"{REDIS_PREFIX}:inflight:{key_id}", member)
            released += 1
        if pipe is not None:
            await pipe.execute()
        return released

    def forget_expired(self, now: float) -> None:
        """Drop local notes of slots older than the TTL (Redis has dropped them already)."""
        for ids in [ids for ids, taken in self._mine.items() if taken[0][1] <= now - self.ttl]:
            kept = [t for t in self._mine[ids] if t[1] > now - self.ttl]
            if kept:
                self._mine[ids] = kept
            else:
                del self._mine[ids]

    def held(self) -> int:
        return sum(len(taken) for taken in self._mine.values())

    async def close(self) -> None:
        await self.client.aclose()

"""Each key family's spend (tokens, USD) per budget period, accounted from the router's route log.

Budget periods are UTC calendar periods: a `day` runs from 00:00 UTC, a `month` from the 1st at 00:00 UTC,
and a budget resets when the next one starts. Tokens per minute (tpm) count in UTC calendar minutes.
One interface (`SpendStore`), two stores: `FileSpendStore` for a single host (the spend and the route
log's read position in one atomically replaced 0600 file, so a restart neither loses nor counts twice)
and `RedisSpendStore` for proxy replicas that share one Redis.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from gpugate_runtime.contract.routing import RouteRecord

log = logging.getLogger("gpugate_runtime.authz")

STORE_MODE = 0o600
PERIODS = ("day", "month")
REDIS_PREFIX = "gpugate"  # every key gpugate keeps in a shared Redis starts with this


# ---- periods -------------------------------------------------------------------------------------


def period_id(period: str, ts: float) -> str:
    """`day:2026-12-02` or `month:2026-12`: the UTC calendar period holding `ts`."""
    moment = datetime.fromtimestamp(ts, UTC)
    if period == "day":
        return f"day:{moment:%Y-%m-%d}"
    if period == "month":
        return f"month:{moment:%Y-%m}"
    raise ValueError(f"unknown budget period {period!r}; allowed: {', '.join(PERIODS)}")


def period_end(period: str, ts: float) -> datetime:
    """When the period holding `ts` ends and its budget resets (UTC)."""
    moment = datetime.fromtimestamp(ts, UTC)
    start = moment.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "day":
        return datetime.fromtimestamp(start.timestamp() + 86400, UTC)
    if period == "month":
        return start.replace(day=1, year=start.year + (start.month == 12), month=start.month % 12 + 1)
    raise ValueError(f"unknown budget period {period!r}; allowed: {', '.join(PERIODS)}")


def period_start(period: str, ts: float) -> float:
    moment = datetime.fromtimestamp(ts, UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return (moment if period == "day" else moment.replace(day=1)).timestamp()


def minute_of(ts: float) -> int:
    return int(ts // 60)


@dataclass
class Spend:
    tokens: int = 0
    usd: float = 0.0


# ---- the route log -------------------------------------------------------------------------------


@dataclass
class Cursor:
    """Where reading of the route log stopped: its inode and the offset after the last whole line."""

    ino: int
    offset: int


class RouteLogTail:
    """Follows the route log and yields each new `RouteRecord`; survives rolling (new inode) and truncation.

    Starts at `cursor` when it still names the file (a restart resumes where it stopped), at the start of
    a file that replaced the cursor's, and at the end when there is no cursor.
    """

    def __init__(self, path: Path, cursor: Cursor | None = None) -> None:
        self.path = path
        self.cursor = cursor
        self.healthy = False
        self.malformed = 0
        self._fd: int | None = None
        self._rest = b""
        self._base = 0  # offset of the start of _rest in the file
        self._open()  # now: a record written before the first read counts

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
        self._fd = None
        self.healthy = False

    def _open(self) -> bool:
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError as exc:
            if self.healthy:
                log.warning("route log %s unreadable (%s): spend is not accounted until it is", self.path, exc.strerror)
            if self.cursor is None:
                self.cursor = Cursor(-1, 0)  # not there yet: the file that appears is read from its start
            self.healthy = False
            return False
        st = os.fstat(fd)
        if self.cursor is None:
            offset = st.st_size
        elif self.cursor.ino == st.st_ino and self.cursor.offset <= st.st_size:
            offset = self.cursor.offset
        else:
            offset = 0  # another file (rolled while we were away) or truncated: read it whole
        os.lseek(fd, offset, os.SEEK_SET)
        self._fd, self._rest, self._base = fd, b"", offset
        self.cursor = Cursor(st.st_ino, offset)
        if not self.healthy:
            log.info("following route log %s from byte %d", self.path, offset)
        self.healthy = True
        return True

    def read(self) -> list[RouteRecord]:
        """Every whole record appended since the last call (and the rest of a rolled file)."""
        if self._fd is None and not self._open():
            return []
        records = list(self._drain())
        try:
            current = os.stat(self.path)
        except OSError:
            return records  # rolled away and not yet recreated: keep the old file
        assert self.cursor is not None
        if current.st_ino != self.cursor.ino:
            self.close()
            self.cursor = Cursor(current.st_ino, 0)
            if self._open():
                records += self._drain()
        elif current.st_size < self.cursor.offset:
            os.lseek(self._fd, 0, os.SEEK_SET)  # type: ignore[arg-type]
            self._rest, self._base, self.cursor = b"", 0, Cursor(current.st_ino, 0)
            records += self._drain()
        return records

    def _drain(self) -> Iterator[RouteRecord]:
        assert self._fd is not None and self.cursor is not None
        while chunk := os.read(self._fd, 1 << 16):
            data = self._rest + chunk
            lines = data.split(b"\n")
            self._rest = lines.pop()
            self.cursor = Cursor(self.cursor.ino, self._base + len(data) - len(self._rest))
            self._base = self.cursor.offset
            for line in lines:
                if not line.strip():
                    continue
                try:
                    yield RouteRecord.from_json(line.decode())
                except (ValueError, TypeError):
                    self.malformed += 1
                    log.warning("route log %s: a line that is not a route record was skipped", self.path)


# ---- the stores ----------------------------------------------------------------------------------


class SpendStore(Protocol):
    """Where each family's spend is kept; authz adds the route log's records and asks for the totals."""

    async def add(self, records: Sequence[RouteRecord]) -> None:
        """Add each record's tokens and cost to its family's day, month and minute."""

    async def spent(self, families: Iterable[str], period: str, now: float) -> dict[str, Spend]:
        """Each family's spend in the period holding `now`."""

    async def minute_tokens(self, family: str, now: float) -> int:
        """The family's tokens in the UTC minute holding `now`."""

    async def close(self) -> None: ...


@dataclass
class Ledger:
    """Spend in memory: {family: {period id: Spend}} and {family: (minute, tokens)}."""

    periods: dict[str, dict[str, Spend]] = field(default_factory=dict)
    minutes: dict[str, tuple[int, int]] = field(default_factory=dict)

    def add(self, record: RouteRecord) -> None:
        tokens = max(0, int(record.input_tokens)) + max(0, int(record.output_tokens))
        cost = max(0.0, float(record.cost_usd))
        family = self.periods.setdefault(record.family, {})
        for period in PERIODS:
            spend = family.setdefault(period_id(period, record.ts), Spend())
            spend.tokens += tokens
            spend.usd += cost
        minute = minute_of(record.ts)
        held = self.minutes.get(record.family)
        if held is None or held[0] < minute:
            self.minutes[record.family] = (minute, tokens)
        elif held[0] == minute:
            self.minutes[record.family] = (minute, held[1] + tokens)

    def spent(self, family: str, period: str, now: float) -> Spend:
        spend = self.periods.get(family, {}).get(period_id(period, now))
        return Spend(spend.tokens, spend.usd) if spend else Spend()

    def minute_tokens(self, family: str, now: float) -> int:
        held = self.minutes.get(family)
        return held[1] if held and held[0] == minute_of(now) else 0

    def prune(self, now: float) -> None:
        """Keep the current and the previous period of each kind: older ones can never be asked for."""
        keep = set()
        for period in PERIODS:
            keep.add(period_id(period, now))
            keep.add(period_id(period, period_start(period, now) - 1))
        for family in list(self.periods):
            for pid in [p for p in self.periods[family] if p not in keep]:
                del self.periods[family][pid]
            if not self.periods[family]:
                del self.periods[family]


class FileSpendStore:
    """A single host's spend: one JSON file (mode 0600), replaced atomically with the route log's position."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.ledger = Ledger()
        self.cursor: Cursor | None = None
        self._load()

    def _load(self) -> None:
        try:
            data = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            # Refusing to start would lock every key out; starting at zero is logged loudly instead.
            log.error("spend store %s unreadable (%s): spend starts from zero", self.path, exc)
            return
        for family, periods in data.get("families", {}).items():
            self.ledger.periods[family] = {pid: Spend(int(v[0]), float(v[1])) for pid, v in periods.items()}
        cursor = data.get("route_log")
        if isinstance(cursor, dict):
            self.cursor = Cursor(int(cursor["ino"]), int(cursor["offset"]))

    def save(self, cursor: Cursor | None, now: float | None = None) -> None:
        self.cursor = cursor
        self.ledger.prune(time.time() if now is None else now)
        document: dict[str, Any] = {
            "version": 1,
            "families": {
                family: {pid: [s.tokens, round(s.usd, 9)] for pid, s in sorted(periods.items())}
                for family, periods in sorted(self.ledger.periods.items())
            },
        }
        if cursor is not None:
            document["route_log"] = {"ino": cursor.ino, "offset": cursor.offset}
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                os.fchmod(handle.fileno(), STORE_MODE)
                handle.write(json.dumps(document, sort_keys=True).encode() + b"\n")
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    async def add(self, records: Sequence[RouteRecord]) -> None:
        for record in records:
            self.ledger.add(record)

    async def spent(self, families: Iterable[str], period: str, now: float) -> dict[str, Spend]:
        return {family: self.ledger.spent(family, period, now) for family in families}

    async def minute_tokens(self, family: str, now: float) -> int:
        return self.ledger.minute_tokens(family, now)

    async def close(self) -> None:
        return None


def spend_key(family: str, pid: str) -> str:
    return f"{REDIS_PREFIX}:spend:{family}:{pid}"


def minute_key(family: str, minute: int) -> str:
    return f"{REDIS_PREFIX}:tpm:{family}:{minute}"


class RedisSpendStore:
    """Spend shared by replicas: a hash (tokens, usd) per family and period, a counter per family and minute.

    Each replica adds the records of its own route log; the counters expire a day after their period ends.
    """

    def __init__(self, client: Any) -> None:  # redis.asyncio.Redis
        self.client = client

    async def add(self, records: Sequence[RouteRecord]) -> None:
        if not records:
            return
        pipe = self.client.pipeline(transaction=False)
        for record in records:
            tokens = max(0, int(record.input_tokens)) + max(0, int(record.output_tokens))
            cost = max(0.0, float(record.cost_usd))
            for period in PERIODS:
                key = spend_key(record.family, period_id(period, record.ts))
                pipe.hincrby(key, "tokens", tokens)
                pipe.hincrbyfloat(key, "usd", cost)
                pipe.expireat(key, int(period_end(period, record.ts).timestamp()) + 86400)
            key = minute_key(record.family, minute_of(record.ts))
            pipe.incrby(key, tokens)
            pipe.expire(key, 120)
        await pipe.execute()

    async def spent(self, families: Iterable[str], period: str, now: float) -> dict[str, Spend]:
        names = list(families)
        pipe = self.client.pipeline(transaction=False)
        for family in names:
            pipe.hmget(spend_key(family, period_id(period, now)), "tokens", "usd")
        found = await pipe.execute()
        return {family: Spend(int(tokens or 0), float(usd or 0)) for family, (tokens, usd) in zip(names, found, strict=True)}

    async def minute_tokens(self, family: str, now: float) -> int:
        return int(await self.client.get(minute_key(family, minute_of(now))) or 0)

    async def close(self) -> None:
        await self.client.aclose()

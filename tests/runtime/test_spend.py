"""Spend accounting: UTC budget periods, the route log followed across restarts and rolling, the file store."""

from __future__ import annotations

import asyncio
import json
import stat
from datetime import UTC, datetime
from pathlib import Path

import pytest

from gpugate_runtime.contract.routing import RouteRecord
from gpugate_runtime.spend import FileSpendStore, Ledger, RouteLogTail, Spend, period_end, period_id


def ts(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def record(family: str = "fam000000001", *, at: float, tokens_in: int = 10, tokens_out: int = 5, usd: float = 0.01) -> RouteRecord:
    return RouteRecord(
        ts=at, request_id="r", key_id="k" * 12, family=family, model="smol", policy="local-first", route="tier:general",
        status=200, input_tokens=tokens_in, output_tokens=tokens_out, cost_usd=usd,
    )  # fmt: skip


def append(path: Path, *records: RouteRecord) -> None:
    with path.open("a") as handle:
        for r in records:
            handle.write(r.to_json() + "\n")


# --- periods --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("period", "at", "pid", "end"),
    [
        ("day", "2026-12-02T23:59:59", "day:2026-12-02", "2026-12-03T00:00:00"),
        ("day", "2026-12-03T00:00:00", "day:2026-12-03", "2026-12-04T00:00:00"),
        ("month", "2026-12-31T23:59:59", "month:2026-12", "2027-01-01T00:00:00"),
        ("month", "2027-02-01T00:00:00", "month:2027-02", "2027-03-01T00:00:00"),
    ],
)
def test_budget_periods_are_utc_calendar_days_and_months(period: str, at: str, pid: str, end: str) -> None:
    assert period_id(period, ts(at)) == pid
    assert period_end(period, ts(at)) == datetime.fromisoformat(end).replace(tzinfo=UTC)


def test_a_record_counts_in_its_own_day_month_and_minute_only() -> None:
    ledger = Ledger()
    ledger.add(record(at=ts("2026-12-31T23:59:30")))
    ledger.add(record(at=ts("2027-01-01T00:00:10"), tokens_in=100, tokens_out=0, usd=1.0))
    assert ledger.spent("fam000000001", "month", ts("2026-12-15T00:00:00")) == Spend(15, 0.01)
    assert ledger.spent("fam000000001", "day", ts("2027-01-01T12:00:00")) == Spend(100, 1.0)
    assert ledger.minute_tokens("fam000000001", ts("2027-01-01T00:00:59")) == 100
    assert ledger.minute_tokens("fam000000001", ts("2027-01-01T00:01:00")) == 0
    assert ledger.spent("another00001", "month", ts("2027-01-01T00:00:10")) == Spend()


# --- the route log --------------------------------------------------------------------------------


def test_the_tail_reads_whole_lines_only_and_skips_what_is_not_a_record(tmp_path: Path) -> None:
    log = tmp_path / "route.log"
    log.touch()
    tail = RouteLogTail(log, cursor=None)
    assert tail.read() == []
    with log.open("a") as handle:
        handle.write(record(at=1.0).to_json() + "\nnot json\n" + record(at=2.0).to_json()[:20])
    first = tail.read()
    with log.open("a") as handle:
        handle.write(record(at=2.0).to_json()[20:] + "\n")
    second = tail.read()
    assert [r.ts for r in first] == [1.0] and [r.ts for r in second] == [2.0] and tail.malformed == 1


def test_a_log_that_appears_later_is_read_from_its_start(tmp_path: Path) -> None:
    log = tmp_path / "route.log"
    tail = RouteLogTail(log, cursor=None)
    assert tail.read() == [] and not tail.healthy
    append(log, record(at=1.0), record(at=2.0))
    assert len(tail.read()) == 2


def test_a_rolled_log_is_drained_then_the_new_one_read(tmp_path: Path) -> None:
    log = tmp_path / "route.log"
    append(log, record(at=1.0))
    tail = RouteLogTail(log, cursor=None)  # from the end: the first record is history
    assert tail.read() == []
    append(log, record(at=2.0))
    log.rename(tmp_path / "route.log.1")
    append(log, record(at=3.0))
    assert [r.ts for r in tail.read()] == [2.0, 3.0]


def test_file_store_resumes_where_it_stopped_so_a_restart_neither_loses_nor_double_counts(tmp_path: Path) -> None:
    # given a store that accounted two records and saved its place in the log
    log, path = tmp_path / "route.log", tmp_path / "spend.json"
    append(log)
    store = FileSpendStore(path)
    tail = RouteLogTail(log, store.cursor)
    append(log, record(at=ts("2026-12-02T10:00:00")), record(at=ts("2026-12-02T10:00:01")))
    asyncio.run(store.add(tail.read()))
    store.save(tail.cursor, now=ts("2026-12-02T10:00:02"))
    # when authz is away while another record is written, then starts again from the file
    append(log, record(at=ts("2026-12-02T10:05:00")))
    again = FileSpendStore(path)
    asyncio.run(again.add(RouteLogTail(log, again.cursor).read()))
    # then all three count, each once
    assert again.ledger.spent("fam000000001", "day", ts("2026-12-02T12:00:00")) == Spend(45, pytest.approx(0.03))


def test_file_store_is_0600_and_keeps_only_the_current_and_previous_periods(tmp_path: Path) -> None:
    path = tmp_path / "state" / "spend.json"
    store = FileSpendStore(path)
    for at in ("2026-09-10T00:00:00", "2026-11-30T00:00:00", "2026-12-02T00:00:00"):  # Sep: gone; Nov 30: its month stays
        store.ledger.add(record(at=ts(at)))
    store.save(None, now=ts("2026-12-02T01:00:00"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    periods = json.loads(path.read_text())["families"]["fam000000001"]
    assert sorted(periods) == ["day:2026-12-02", "month:2026-11", "month:2026-12"]
    assert sorted(p.name for p in path.parent.iterdir()) == ["spend.json"]  # no temp file left behind


def test_an_unreadable_spend_store_starts_from_zero_instead_of_locking_keys_out(tmp_path: Path) -> None:
    path = tmp_path / "spend.json"
    path.write_text("{ truncated")
    store = FileSpendStore(path)
    assert store.ledger.periods == {} and store.cursor is None

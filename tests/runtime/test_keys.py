"""The key store and the `keys` command: hashed keys, atomic 0600 writes, rotation, revocation, errors."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
from datetime import timedelta
from pathlib import Path

import pytest

from gpugate.spec import KeyLimits
from gpugate_runtime.keys import (
    TOKEN_RE,
    KeyInputError,
    KeyStore,
    KeyStoreError,
    create_key,
    key_id_of,
    parse_duration,
    read_store,
    revoke_key,
    rotate_key,
    token_digest,
    utcnow,
    write_store,
)
from gpugate_runtime.settings import KeysSettings

REPO = Path(__file__).resolve().parents[2]
DAY = timedelta(days=1)


def run_keys(*args: str, env: dict[str, str] | None = None, stdin: str = "") -> subprocess.CompletedProcess:
    """`gpugate-runtime keys ...` in a fresh process, as an operator runs it."""
    environment = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "runtime")]),
        "COLUMNS": "200",
        **(env or {}),
    }
    return subprocess.run(
        [sys.executable, "-m", "gpugate_runtime", "keys", *args], input=stdin, capture_output=True, text=True, env=environment, timeout=60
    )


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return tmp_path / "state" / "keys.json"


# --- the store ------------------------------------------------------------------------------------


def test_issued_key_has_prefix_id_and_256_bit_secret(store: Path) -> None:
    # given an empty store / when a key is issued
    issued = create_key(store, "alice", expires=DAY)
    # then the key reads ggk_<id>_<64 hex> and its id is the record's
    match = TOKEN_RE.match(issued.token)
    assert match and match.group(1) == issued.record.id
    assert len(match.group(2)) == 64
    assert key_id_of(issued.token) == issued.record.id


def test_store_holds_the_hash_and_never_the_key(store: Path) -> None:
    # given a key issued into a store
    issued = create_key(store, "alice", expires=DAY)
    # when the file on disk is read
    text = store.read_text()
    secret = issued.token.rsplit("_", 1)[1]
    # then neither the key nor its secret part is there, only the sha256 of the key
    assert issued.token not in text and secret not in text
    assert json.loads(text)["keys"][0]["sha256"] == token_digest(issued.token)


def test_store_file_is_mode_0600_in_a_0700_directory(store: Path) -> None:
    # given a fresh state directory / when a key is issued
    create_key(store, "alice", expires=DAY)
    # then only the owner can read the store or list its directory
    assert stat.S_IMODE(store.stat().st_mode) == 0o600
    assert stat.S_IMODE(store.parent.stat().st_mode) == 0o700


def test_write_replaces_the_file_atomically_leaving_no_temp_files(store: Path) -> None:
    # given a store with a key
    create_key(store, "alice", expires=DAY)
    inode_before = store.stat().st_ino
    # when another key is written
    create_key(store, "bob", expires=DAY)
    # then the store is a new file (rename, never an in-place rewrite) and no temp file is left over
    assert store.stat().st_ino != inode_before
    assert sorted(p.name for p in store.parent.iterdir()) == ["keys.json", "keys.json.lock"]


def test_a_reader_never_sees_a_partial_store_while_keys_are_written(store: Path) -> None:
    # given a store that a writer keeps growing
    create_key(store, "seed", expires=DAY)
    failures: list[str] = []
    done = threading.Event()

    def read_constantly() -> None:
        while not done.is_set():
            try:
                read_store(store)
            except KeyStoreError as exc:
                failures.append(str(exc))

    reader = threading.Thread(target=read_constantly)
    reader.start()
    # when 40 keys are written one by one
    try:
        for i in range(40):
            create_key(store, f"user-{i}", expires=DAY)
    finally:
        done.set()
        reader.join(timeout=10)
    # then every read parsed
    assert failures == []
    assert len(read_store(store).keys) == 41


def test_concurrent_writers_lose_no_key(store: Path) -> None:
    # given 4 writers issuing 10 keys each at the same time
    def issue(prefix: str) -> None:
        for i in range(10):
            create_key(store, f"{prefix}-{i}", expires=DAY)

    threads = [threading.Thread(target=issue, args=(f"w{n}",)) for n in range(4)]
    # when they all finish
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    # then the lock serialised them and all 40 keys are in the store
    assert len(read_store(store).keys) == 40


def test_second_active_key_for_a_name_is_refused(store: Path) -> None:
    # given alice has an active key
    create_key(store, "alice", expires=DAY)
    # when another is created for alice / then the store says to rotate instead
    with pytest.raises(KeyInputError, match="rotate"):
        create_key(store, "alice", expires=DAY)


def test_rotation_issues_a_new_key_and_shortens_the_old_one_to_the_overlap(store: Path) -> None:
    # given alice's key valid for 90 days, with its own limits
    now = utcnow()
    old = create_key(store, "alice", expires=timedelta(days=90), rpm=7, max_concurrent=3, now=now)
    # when alice is rotated with a 24 h overlap
    rotation = rotate_key(store, "alice", overlap=timedelta(hours=24), expires=timedelta(days=90), now=now)
    # then both keys are active now, the old one only until now+24h, and the new one keeps the limits
    keys = {k.id: k for k in read_store(store).keys}
    assert keys[old.record.id].expires_at == now + timedelta(hours=24)
    assert keys[old.record.id].status(now) == "active"
    assert keys[old.record.id].status(now + timedelta(hours=24)) == "expired"
    new = keys[rotation.issued.record.id]
    assert (new.rpm, new.max_concurrent, new.status(now + timedelta(hours=25))) == (7, 3, "active")


def test_rotating_a_name_without_an_active_key_is_refused(store: Path) -> None:
    with pytest.raises(KeyInputError, match="no active key"):
        rotate_key(store, "nobody", overlap=DAY, expires=DAY)


def test_revoked_key_is_revoked_from_that_moment(store: Path) -> None:
    # given an active key
    now = utcnow()
    issued = create_key(store, "alice", expires=DAY, now=now)
    # when it is revoked
    revoke_key(store, issued.record.id, now=now)
    # then the store says so
    (record,) = read_store(store).keys
    assert record.revoked_at == now and record.status(now) == "revoked"


def test_key_past_its_expiry_is_expired(store: Path) -> None:
    now = utcnow()
    issued = create_key(store, "alice", expires=timedelta(minutes=30), now=now)
    assert issued.record.status(now + timedelta(minutes=29)) == "active"
    assert issued.record.status(now + timedelta(minutes=30)) == "expired"


def test_revoking_an_unknown_id_is_refused_naming_the_known_ids(store: Path) -> None:
    issued = create_key(store, "alice", expires=DAY)
    with pytest.raises(KeyInputError, match=issued.record.id):
        revoke_key(store, "000000000000")


def test_a_corrupt_store_is_reported_not_overwritten(store: Path) -> None:
    # given a store file that is not JSON
    store.parent.mkdir(parents=True)
    store.write_text("{not json")
    # when a key is created / then the command fails and the file is left for a human to look at
    with pytest.raises(KeyStoreError, match="not a valid key store"):
        create_key(store, "alice", expires=DAY)
    assert store.read_text() == "{not json"


def test_a_store_with_duplicate_ids_is_refused(store: Path) -> None:
    issued = create_key(store, "alice", expires=DAY)
    data = json.loads(store.read_text())
    data["keys"].append({**data["keys"][0], "name": "copy"})
    store.write_text(json.dumps(data))
    with pytest.raises(KeyStoreError, match=f"{issued.record.id} appears twice"):
        read_store(store)


def test_written_store_round_trips(store: Path) -> None:
    create_key(store, "alice", expires=DAY, rpm=5)
    loaded = read_store(store)
    write_store(store, loaded)
    assert read_store(store) == loaded
    assert isinstance(loaded, KeyStore)


@pytest.mark.parametrize(("text", "expected"), [("90d", timedelta(days=90)), ("24h", timedelta(hours=24)), ("30m", timedelta(minutes=30))])
def test_durations_take_days_hours_minutes(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["90", "1.5d", "-1d", "1w", "d", "90 days", "0d", "3651d"])
def test_malformed_or_out_of_range_durations_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match=r"duration|zero|longer"):
        parse_duration(text)


def test_zero_overlap_is_a_duration_only_where_allowed() -> None:
    assert parse_duration("0h", allow_zero=True) == timedelta(0)


def test_keys_settings_defaults_match_the_spec_defaults() -> None:
    # Both take their defaults from gpugate_runtime.contract.defaults; a literal in either would break this.
    limits = KeyLimits()
    fields = KeysSettings.model_fields
    assert fields["expires_days"].default == limits.expires_days
    assert fields["rotation_overlap_hours"].default == limits.rotation_overlap_hours


# --- the command ----------------------------------------------------------------------------------


def test_create_prints_the_key_once_and_list_never_shows_it(store: Path) -> None:
    # given a key created through the CLI
    created = run_keys("create", "team-search", "--rpm", "60", "--expires", "30d", "--store", str(store))
    assert created.returncode == 0, created.stderr
    token = next(line for line in created.stdout.splitlines() if line.startswith("ggk_"))
    # when keys are listed, as a table and as JSON
    table = run_keys("list", "--store", str(store))
    listed = run_keys("list", "--json", "--store", str(store))
    # then the key is listed but neither the key nor its hash appears
    (entry,) = json.loads(listed.stdout)
    assert entry["name"] == "team-search" and entry["rpm"] == 60 and entry["status"] == "active"
    for output in (table.stdout, listed.stdout):
        assert entry["id"] in output
        assert token not in output and token_digest(token) not in output
    assert "sha256" not in entry


def test_create_json_gives_the_key_and_its_expiry(store: Path) -> None:
    result = run_keys("create", "ci", "--json", "--expires", "12h", "--store", str(store))
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    assert TOKEN_RE.match(payload["key"]) and payload["name"] == "ci"
    (record,) = read_store(store).keys
    assert record.expires_at - record.created_at == timedelta(hours=12)


def test_default_expiry_comes_from_settings(store: Path) -> None:
    result = run_keys("create", "ci", "--json", env={"GPUGATE_KEYS_STORE": str(store), "GPUGATE_KEYS_EXPIRES_DAYS": "7"})
    assert result.returncode == 0, result.stderr
    (record,) = read_store(store).keys
    assert record.expires_at - record.created_at == timedelta(days=7)


def test_settings_are_read_from_the_env_file_named_by_gpugate_env_file(tmp_path: Path, store: Path) -> None:
    # given the runtime's shared env file, with other services' settings in it too
    env_file = tmp_path / "gpugate.env"
    env_file.write_text(f"# generated\nGPUGATE_AUTHZ_PORT=18001\nGPUGATE_KEYS_STORE={store}\nGPUGATE_KEYS_EXPIRES_DAYS=3\n")
    # when a key is created with no --store
    result = run_keys("create", "ci", "--json", env={"GPUGATE_ENV_FILE": str(env_file)})
    # then the store and the default expiry are the env file's
    assert result.returncode == 0, result.stderr
    (record,) = read_store(store).keys
    assert record.expires_at - record.created_at == timedelta(days=3)


def test_rotate_cli_reports_new_key_and_old_keys_end(store: Path) -> None:
    run_keys("create", "alice", "--store", str(store))
    result = run_keys("rotate", "alice", "--overlap", "2h", "--json", "--store", str(store))
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    keys = {k.id: k for k in read_store(store).keys}
    (old_id,) = payload["retiring"]
    assert keys[old_id].expires_at - keys[payload["id"]].created_at == timedelta(hours=2)


def test_revoke_cli_revokes_by_id(store: Path) -> None:
    created = json.loads(run_keys("create", "alice", "--json", "--store", str(store)).stdout)
    result = run_keys("revoke", created["id"], "--store", str(store))
    assert result.returncode == 0, result.stderr
    assert read_store(store).keys[0].revoked_at is not None


@pytest.mark.parametrize(
    ("args", "flag", "allowed"),
    [
        (["create", "alice", "--expires", "90"], "--expires", "d, h or m"),
        (["create", "alice", "--expires", "0d"], "--expires", "at least 1m"),
        (["create", "alice", "--rpm", "0"], "--rpm", "1"),
        (["create", "alice", "--max-concurrent", "many"], "--max-concurrent", "integer"),
        (["create", "Alice Smith"], "name", "a-z 0-9"),
        (["rotate", "alice", "--overlap", "1 day"], "--overlap", "d, h or m"),
    ],
)
def test_bad_input_exits_2_naming_the_flag_and_what_is_allowed(store: Path, args: list[str], flag: str, allowed: str) -> None:
    result = run_keys(*args, "--store", str(store))
    assert result.returncode == 2
    message = " ".join(result.stderr.split()).replace("│", "").replace("  ", " ")
    assert flag in message and allowed in message, result.stderr
    assert not store.exists()


def test_revoke_cli_takes_the_key_itself_on_stdin_and_never_prints_it(store: Path) -> None:
    created = json.loads(run_keys("create", "alice", "--json", "--store", str(store)).stdout)
    result = run_keys("revoke", "--store", str(store), stdin=created["key"] + "\n")
    assert result.returncode == 0, result.stderr
    assert f"Key {created['id']} (alice) revoked" in result.stdout
    assert created["key"] not in result.stdout + result.stderr
    assert read_store(store).keys[0].revoked_at is not None


def test_revoke_cli_refuses_a_key_in_argv_unechoed_and_revokes_nothing(store: Path) -> None:
    created = json.loads(run_keys("create", "alice", "--json", "--store", str(store)).stdout)
    result = run_keys("revoke", created["key"], "--store", str(store))
    assert result.returncode == 2
    assert "not a key id" in result.stderr and "stdin" in result.stderr
    assert created["key"] not in result.stdout + result.stderr
    assert read_store(store).keys[0].revoked_at is None


def test_revoke_cli_refuses_a_mistyped_key_on_stdin(store: Path) -> None:
    created = json.loads(run_keys("create", "alice", "--json", "--store", str(store)).stdout)
    mistyped = created["key"][:-1] + ("0" if created["key"][-1] != "0" else "1")
    result = run_keys("revoke", "--store", str(store), stdin=mistyped)
    assert result.returncode == 2 and "hash does not match" in result.stderr
    assert read_store(store).keys[0].revoked_at is None


def test_revoking_an_unknown_id_exits_2(store: Path) -> None:
    run_keys("create", "alice", "--store", str(store))
    result = run_keys("revoke", "ffffffffffff", "--store", str(store))
    assert result.returncode == 2 and "no key with id" in result.stderr


def test_creating_a_second_key_for_a_name_exits_2_and_says_rotate(store: Path) -> None:
    run_keys("create", "alice", "--store", str(store))
    result = run_keys("create", "alice", "--store", str(store))
    assert result.returncode == 2 and "keys rotate alice" in result.stderr


def test_a_typo_in_a_keys_setting_exits_2(store: Path) -> None:
    result = run_keys("list", env={"GPUGATE_KEYS_EXPIRES_DAYS": "soon", "GPUGATE_KEYS_STORE": str(store)})
    assert result.returncode == 2 and "expires_days" in result.stderr

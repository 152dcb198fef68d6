"""`gpugate keys create / list / rotate / revoke --stack S` on a local stack's store, run as a user runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from gpugate_runtime.keys import read_store, token_digest
from tests.conftest import REPO

RUNTIME_PATH = os.pathsep.join([str(REPO), str(REPO / "runtime")])


def run(module: str, *args: str, state: Path, stdin: str = "") -> subprocess.CompletedProcess:
    """`python -m gpugate keys ...` (or gpugate_runtime) in a fresh process, with the stack's state under `state`."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": RUNTIME_PATH,
        "GPUGATE_STATE_DIR": str(state),
        "COLUMNS": "200",
        "HOME": str(state),
    }
    return subprocess.run(
        [sys.executable, "-m", module, *args], input=stdin, capture_output=True, text=True, env=env, timeout=60, cwd=REPO
    )


def gpugate_keys(*args: str, state: Path, stdin: str = "") -> subprocess.CompletedProcess:
    return run("gpugate", "keys", *args, state=state, stdin=stdin)


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "state"


def store_of(state: Path, stack: str = "local") -> Path:
    return state / stack / "var" / "lib" / "gpugate" / "keys.json"


def created(state: Path, name: str, *args: str) -> dict:
    result = gpugate_keys("create", name, "--stack", "local", "--json", *args, state=state)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_create_prints_the_key_once_and_stores_only_its_hash_in_the_local_stacks_store(state: Path) -> None:
    result = gpugate_keys("create", "team-search", "--stack", "local", state=state)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("Created key ") and " for team-search, expires " in lines[0]
    assert lines[1] == "The key is shown only now; store it in a secret manager:"
    key = lines[2]
    (record,) = read_store(store_of(state)).keys
    assert record.sha256 == token_digest(key) and key not in store_of(state).read_text()


def test_create_takes_the_expiry_from_the_stacks_limits(state: Path, stack_copy) -> None:
    stack = stack_copy("local", lambda c: c["gpugate:limits"].update(expires_days=7), name="week")
    result = gpugate_keys("create", "alice", "--stack", str(stack), "--json", state=state)
    assert result.returncode == 0, result.stderr
    issued = json.loads(result.stdout)
    lifetime = datetime.fromisoformat(issued["expires_at"]) - datetime.fromisoformat(issued["created_at"])
    assert lifetime == timedelta(days=7)


def test_list_shows_ids_names_and_status_but_never_a_key_or_its_hash(state: Path) -> None:
    alice = created(state, "alice")
    result = gpugate_keys("list", "--stack", "local", state=state)
    assert result.returncode == 0, result.stderr
    assert alice["id"] in result.stdout and "alice" in result.stdout and "active" in result.stdout
    sha = read_store(store_of(state)).keys[0].sha256
    assert alice["key"] not in result.stdout and sha not in result.stdout


def test_list_says_the_same_as_the_runtimes_command_on_the_same_store(state: Path) -> None:
    created(state, "alice")
    ours = gpugate_keys("list", "--stack", "local", "--json", state=state)
    theirs = run("gpugate_runtime", "keys", "list", "--json", "--store", str(store_of(state)), state=state)
    assert ours.returncode == theirs.returncode == 0
    assert json.loads(ours.stdout) == json.loads(theirs.stdout) != []


def test_rotate_issues_a_new_key_and_the_old_one_ends_after_the_stacks_overlap(state: Path) -> None:
    old = created(state, "alice")
    result = gpugate_keys("rotate", "alice", "--stack", "local", "--json", state=state)
    assert result.returncode == 0, result.stderr
    new = json.loads(result.stdout)
    assert new["key"] != old["key"] and list(new["retiring"]) == [old["id"]]
    keys = {k.id: k for k in read_store(store_of(state)).keys}
    assert keys[old["id"]].expires_at - keys[new["id"]].created_at == timedelta(hours=24)  # rotation_overlap_hours default


def test_revoke_by_id_revokes_that_key(state: Path) -> None:
    alice = created(state, "alice")
    result = gpugate_keys("revoke", alice["id"], "--stack", "local", state=state)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"Key {alice['id']} (alice) revoked at ")
    assert read_store(store_of(state)).keys[0].revoked_at is not None


@pytest.mark.parametrize("id_argument", [[], ["-"]], ids=["no ID", "ID -"])
def test_revoke_reads_the_key_itself_from_stdin_and_never_prints_it(state: Path, id_argument: list[str]) -> None:
    alice = created(state, "alice")
    result = gpugate_keys("revoke", *id_argument, "--stack", "local", state=state, stdin=alice["key"] + "\n")
    assert result.returncode == 0, result.stderr
    assert f"Key {alice['id']} (alice) revoked" in result.stdout
    assert alice["key"] not in result.stdout + result.stderr
    assert read_store(store_of(state)).keys[0].revoked_at is not None


def test_revoke_refuses_a_key_in_argv_without_echoing_it_and_revokes_nothing(state: Path) -> None:
    alice = created(state, "alice")
    result = gpugate_keys("revoke", alice["key"], "--stack", "local", state=state)
    assert result.returncode == 2
    assert "not a key id" in result.stderr and "stdin" in result.stderr
    assert alice["key"] not in result.stdout + result.stderr
    assert read_store(store_of(state)).keys[0].revoked_at is None


def test_keys_on_a_vm_stack_point_to_the_runbook_tasks(state: Path) -> None:
    result = gpugate_keys("list", "--stack", "dev", state=state)
    assert result.returncode == 2
    message = " ".join(result.stderr.split())
    assert "local stack" in message and "gpugate run rotate-key --stack dev" in message and "gpugate run revoke-key" in message

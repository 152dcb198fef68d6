"""Client keys on a running local stack: what `gpugate up` issues, and `gpugate keys` through the real gateway."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator

import openai
import pytest

from gpugate.local.gateway import PROBER_KEY_NAME
from gpugate_runtime.keys import read_store, utcnow
from tests.conftest import REPO
from tests.e2e.local_stack import RunningStack, running_local_stack, wait_until

pytestmark = pytest.mark.e2e

REVOKE_DEADLINE_S = 2.0
QUICKSTART = REPO / "docs" / "quickstart.md"
QUICKSTART_STATE = "/root/.local/state/gpugate/local"  # the local stack's state dir as the sample shows it


@pytest.fixture(scope="module")
def stack(tmp_path_factory, vllm_python, smollm_dir) -> Iterator[RunningStack]:
    with running_local_stack(tmp_path_factory.mktemp("local-keys")) as running:
        yield running


def active_client_keys(stack: RunningStack) -> list[str]:
    now = utcnow()
    return [k.id for k in read_store(stack.key_store).keys if k.name != PROBER_KEY_NAME and k.status(now) == "active"]


def gpugate_keys(stack: RunningStack, *args: str, stdin: str = "") -> subprocess.CompletedProcess:
    """`python -m gpugate keys ... --stack <the stack file>`, as a user's shell runs it (stdin included)."""
    return subprocess.run(
        [sys.executable, "-m", "gpugate", "keys", *args, "--stack", str(stack.stack_file)],
        input=stdin, capture_output=True, text=True, env=stack.env, cwd=REPO, timeout=60,
    )  # fmt: skip


def issued(result: subprocess.CompletedProcess) -> dict:
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)


def accepted(stack: RunningStack, key: str) -> bool:
    try:
        stack.client(key).models.list()
        return True
    except openai.AuthenticationError:
        return False


def test_first_up_issues_one_client_key_and_later_ups_issue_none_unless_asked(stack):
    # given a stack whose first `up` printed a key
    assert stack.key in stack.up_output and len(active_client_keys(stack)) == 1
    # when it is brought up again while running, and again after a down
    again = stack.gpugate("up")
    assert stack.gpugate("down", timeout=120).returncode == 0
    restarted = stack.gpugate("up")
    # then neither up issued a key, and each says how to get one
    for result in (again, restarted):
        assert result.returncode == 0, result.stdout + result.stderr
        assert "ggk_" not in result.stdout
        assert "gpugate keys create NAME --stack" in result.stdout
    assert len(active_client_keys(stack)) == 1
    assert accepted(stack, stack.key)
    # and --new-key issues exactly one more, printed once
    asked = stack.gpugate("up", "--new-key")
    assert asked.returncode == 0, asked.stdout + asked.stderr
    assert asked.stdout.count("A new client key") == 1 and len(active_client_keys(stack)) == 2


def test_keys_created_listed_and_rotated_by_gpugate_keys_work_through_the_gateway(stack):
    created = issued(gpugate_keys(stack, "create", "team-e2e", "--json"))
    wait_until(lambda: accepted(stack, created["key"]), 5, 0.2, "authz to accept the created key")
    listed = {k["id"]: k for k in issued(gpugate_keys(stack, "list", "--json"))}
    assert listed[created["id"]]["status"] == "active" and "key" not in listed[created["id"]]
    rotated = issued(gpugate_keys(stack, "rotate", "team-e2e", "--overlap", "1h", "--json"))
    assert list(rotated["retiring"]) == [created["id"]]
    wait_until(lambda: accepted(stack, rotated["key"]), 5, 0.2, "authz to accept the rotated key")
    assert accepted(stack, created["key"])  # the old key works through the overlap


def test_a_key_revoked_by_gpugate_keys_on_stdin_is_refused_by_the_gateway_within_two_seconds(stack):
    # given a key the gateway accepts
    leaked = issued(gpugate_keys(stack, "create", "leaky", "--json"))
    wait_until(lambda: accepted(stack, leaked["key"]), 5, 0.2, "authz to accept the new key")
    # when it is revoked with the key on stdin
    result = gpugate_keys(stack, "revoke", stdin=leaked["key"] + "\n")
    revoked_at = time.monotonic()
    assert result.returncode == 0, result.stderr
    assert leaked["id"] in result.stdout and leaked["key"] not in result.stdout + result.stderr
    # then the gateway refuses it within two seconds
    polls = 0
    while time.monotonic() - revoked_at < REVOKE_DEADLINE_S:
        polls += 1
        if not accepted(stack, leaked["key"]):
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the revoked key was still accepted {REVOKE_DEADLINE_S} s later ({polls} requests)")
    assert polls >= 1 and time.monotonic() - revoked_at < REVOKE_DEADLINE_S
    assert accepted(stack, stack.key)  # and no other key was touched


def test_revoke_refuses_a_key_in_argv_and_the_key_keeps_working(stack):
    kept = issued(gpugate_keys(stack, "create", "argv-check", "--json"))
    result = gpugate_keys(stack, "revoke", kept["key"])
    assert result.returncode == 2
    assert "not a key id" in result.stderr and kept["key"] not in result.stderr
    wait_until(lambda: accepted(stack, kept["key"]), 5, 0.2, "authz to accept the key")


def sample_of_up(page: str) -> list[str]:
    """The quickstart's "real output" of the first `./scripts/up`: the first text block of section 1."""
    section = page.split("## 1.", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```text\n(.*?)```", section, re.S)
    assert block, "docs/quickstart.md section 1 has no text block"
    return block.group(1).splitlines()


def shape(line: str, state: str, stack: str) -> str:
    """A line of up's output with what differs between runs made alike: the state dir, the stack's name and
    port, key ids and keys (the sample shortens them), bundle hashes and seconds. File counts stay."""
    line = line.replace(state, "<state>")
    line = re.sub(rf"\bstack {re.escape(stack)}\b|--stack {re.escape(stack)}\b", lambda m: m.group(0).replace(stack, "<stack>"), line)
    line = re.sub(r"ggk_[0-9a-f]+_[A-Za-z0-9_-]*…?", "<key>", line)
    line = re.sub(r"localhost:\d+", "localhost:<port>", line)
    line = re.sub(r"\b[0-9a-f]{12}\b", "<hex>", line)
    line = re.sub(r"\b(in|up in) \d+ s\b", r"\1 <n> s", line)
    return line.rstrip()


def test_the_quickstart_sample_is_what_the_first_up_prints(stack):
    # given the sample in docs/quickstart.md and what this stack's first `gpugate up` printed
    sample = [shape(line, QUICKSTART_STATE, "local") for line in sample_of_up(QUICKSTART.read_text())]
    printed = [shape(line, str(stack.state), stack.stack_file.stem.removeprefix("Pulumi.")) for line in stack.up_output.splitlines()]
    # then every line of the sample is a line up prints (a line the sample names that up no longer prints,
    # or a changed file count, fails), and the sample leaves out none of the lines a user acts on
    checked = 0
    for line in sample:
        if line.startswith("· waiting for: "):  # how many of these a start prints depends on its timing
            names = set(line.removeprefix("· waiting for: ").split(", "))
            assert any(p.startswith("· waiting for: ") and names <= set(p.removeprefix("· waiting for: ").split(", ")) for p in printed), line
        else:
            assert line in printed, f"docs/quickstart.md shows a line `gpugate up` no longer prints:\n{line}\nit printed:\n" + "\n".join(printed)
        checked += 1
    assert checked >= 15
    for must in ("  endpoint  ", "  CA file   ", "A new client key", "curl:", "Python (openai):"):
        assert any(must in line for line in sample), must

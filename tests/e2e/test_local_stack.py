"""`gpugate up` end to end: the local stack with real Caddy, authz, vLLM (CPU), prober, Prometheus, Alertmanager."""

from __future__ import annotations

import os
import secrets
import signal
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.e2e.local_stack import COMPLETIONS_SERVED, RunningStack, running_local_stack, wait_until

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def stack(tmp_path_factory, vllm_python, smollm_dir) -> Iterator[RunningStack]:
    with running_local_stack(tmp_path_factory.mktemp("local-stack")) as running:
        yield running


def test_up_prints_endpoint_ca_key_and_examples(stack):
    out = stack.up_output
    assert f"{stack.url}/v1" in out
    assert stack.ca_file.is_file()
    assert "curl --cacert" in out and "openai.OpenAI(" in out


def test_chat_completion_through_https_verified_with_the_printed_ca(stack):
    reply = stack.client().chat.completions.create(
        model=stack.model, messages=[{"role": "user", "content": "Say hello"}], max_tokens=8
    )
    assert reply.choices[0].message.content
    assert reply.usage.completion_tokens >= 1


def test_streaming_delivers_several_sse_chunks(stack):
    stream = stack.client().chat.completions.create(
        model=stack.model, messages=[{"role": "user", "content": "Count from one to ten"}], max_tokens=24, stream=True
    )
    chunks = [c for c in stream if c.choices and c.choices[0].delta.content]
    assert len(chunks) >= 3


def test_requests_without_a_valid_key_are_refused_and_never_reach_vllm(stack):
    # given: the counter moves when a request is proxied (a valid key's completion is counted) ...
    before = stack.vllm_metric(*COMPLETIONS_SERVED)
    stack.client().completions.create(model=stack.model, prompt="Hi", max_tokens=1)
    wait_until(lambda: stack.vllm_metric(*COMPLETIONS_SERVED) == before + 1, 10, 0.2, "vLLM to count the completion")
    counted = stack.vllm_metric(*COMPLETIONS_SERVED)
    # when: no key, a malformed key, a key of the wrong length, and a well-formed key the store does not hold
    unknown = f"ggk_{secrets.token_hex(6)}_{secrets.token_hex(32)}"
    for key in ("not-a-key", "ggk_00000000_" + "x" * 43, unknown):
        with pytest.raises(openai.AuthenticationError):
            stack.client(key).completions.create(model=stack.model, prompt="Hi", max_tokens=1)
    no_auth = httpx.post(f"{stack.url}/v1/completions", json={"model": stack.model, "prompt": "Hi"}, verify=stack.tls(), timeout=10)
    assert no_auth.status_code == 401
    # then: vLLM served none of them
    time.sleep(1)
    assert stack.vllm_metric(*COMPLETIONS_SERVED) == counted


def test_every_log_and_state_file_is_closed_to_other_users(stack):
    # given a stack that has served requests (so every service has written its logs and state)
    stack.client().models.list()
    layout_root = stack.state
    dirs = [layout_root / "var" / "log" / "gpugate", layout_root / "var" / "lib" / "gpugate", layout_root / "etc" / "gpugate" / "secrets"]
    modes = {
        path.relative_to(layout_root).as_posix(): stat.S_IMODE(path.lstat().st_mode)
        for top in dirs for path in top.rglob("*") if path.is_file() and not path.is_symlink()
    }
    logs = {name: mode for name, mode in modes.items() if name.startswith("var/log/")}
    expected = {
        # Caddy's access log is its and the gateway group's (authz reads it through the group) ...
        "var/log/gpugate/access.log": 0o640,
        # ... authz's decision log, the key store, the secrets and supervisord's own log are their owner's only
        "var/log/gpugate/authz.log": 0o600,
        "var/log/gpugate/supervisord.log": 0o600,
        "var/lib/gpugate/keys.json": 0o600,
        "etc/gpugate/secrets/vllm_api_key": 0o600,
        "etc/gpugate/secrets/prober_api_key": 0o600,
    }
    # then each of those has its mode, and no log or state file is open to other users or writable by the group
    wrong = {name: oct(modes.get(name, 0)) for name, mode in expected.items() if modes.get(name) != mode}
    wrong |= {name: oct(mode) for name, mode in modes.items() if mode & 0o027}
    assert wrong == {}, {name: oct(mode) for name, mode in sorted(modes.items())}
    assert len(logs) >= 8 and len(modes) > len(logs) + 5, sorted(modes)


def test_stream_closed_by_the_client_is_aborted_in_vllm_within_5_s(stack):
    client = stack.client()
    stream = client.chat.completions.create(
        model=stack.model, messages=[{"role": "user", "content": "Write a long story about the sea"}],
        max_tokens=1500, stream=True,
    )
    for i, _ in enumerate(stream):
        if i >= 3:
            break
    assert stack.vllm_metric("vllm:num_requests_running") >= 1
    stream.close()
    wait_until(lambda: stack.vllm_metric("vllm:num_requests_running") == 0, 5, 0.2, "vLLM to abort the closed stream")


def test_second_up_with_nothing_changed_is_a_fast_no_op(stack):
    pids = {s["name"]: s["pid"] for s in stack.status()["services"]}
    started = time.monotonic()
    result = stack.gpugate("up")
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert "already up" in result.stdout and "ggk_" not in result.stdout
    assert {s["name"]: s["pid"] for s in stack.status()["services"]} == pids
    assert elapsed < 30


def test_changed_stack_file_restarts_only_what_changed(stack):
    pids = {s["name"]: s["pid"] for s in stack.status()["services"]}
    edit_stack_in_place = stack.stack_file.read_text().replace("queue_backlog: 8", "queue_backlog: 9")
    stack.stack_file.write_text(edit_stack_in_place)
    result = stack.gpugate("up")
    assert result.returncode == 0, result.stderr
    after = {s["name"]: s["pid"] for s in stack.status()["services"]}
    assert after["prometheus"] != pids["prometheus"]  # alert rules changed
    assert after["vllm"] == pids["vllm"] and after["caddy"] == pids["caddy"]


def test_killed_vllm_is_restarted_and_the_outage_is_seen(stack):
    old = stack.pid_of("vllm")
    engine = [int(p.parent.name) for p in Path("/proc").glob("[0-9]*/stat")
              if _pgid(p) == old and int(p.parent.name) != old]
    assert engine, "vLLM's engine core runs in the server's process group"
    os.kill(old, signal.SIGKILL)
    # the prober goes red (asked directly, twice a second: `gpugate status --json` is a CLI start each time, seconds
    # on a busy machine, and a vLLM that forks its engine is back within one or two 15 s probe runs) ...
    wait_until(lambda: _prober_says(stack, "vllm_health") is False, 90, 0.5, "prober red")
    # ... the supervisor restarts vLLM and the prober goes green again
    wait_until(lambda: stack.status()["healthy"], 300, 2, "stack healthy again")
    assert stack.pid_of("vllm") != old
    # and the engine the killed server left behind did not survive next to the new one
    assert not [pid for pid in engine if Path(f"/proc/{pid}").exists() and _pgid(Path(f"/proc/{pid}/stat")) == old]
    # and Prometheus recorded the outage
    outage = stack.prometheus('min_over_time(gpugate_probe_success{check="vllm_health"}[10m])')
    assert outage and float(outage[0]["value"][1]) == 0.0


def test_down_leaves_no_process_and_up_works_again(stack):
    pids = [s["pid"] for s in stack.status()["services"]]
    result = stack.gpugate("down", timeout=120)
    assert result.returncode == 0
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split(") ")[1][:1]
    assert stack.gpugate("status", timeout=60).returncode == 1
    again = stack.gpugate("up")
    assert again.returncode == 0, again.stdout + again.stderr
    reply = stack.client().chat.completions.create(model=stack.model, messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    assert reply.choices[0].message.content is not None


def _prober_says(stack, check: str) -> bool | None:  # noqa: ANN001
    """The prober's last result for `check` from its own /status (None before a run, or when it does not answer)."""
    try:
        results = httpx.get(f"http://127.0.0.1:{stack.ports['prober']}/status", timeout=2).json()["results"]
    except (httpx.HTTPError, ValueError, KeyError):
        return None
    found = [r["ok"] for r in results if r["check"] == check]
    return found[0] if found else None


def _pgid(stat: Path) -> int:
    try:
        return int(stat.read_text().rsplit(") ", 1)[1].split()[2])
    except (OSError, IndexError, ValueError):
        return -1

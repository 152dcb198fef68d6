"""Real vLLM (CPU build) started by the launcher with the real SmolLM2 model: capacity, auth, and a completion."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest
from gpugate_runtime.launcher import plan_for_spec
from openai import OpenAI

from .conftest import VllmServer

pytestmark = pytest.mark.e2e

# What `import vllm` prints on a host without a GPU (vLLM 0.32), once per process that imports it.
VLLM_IMPORT_LINE = "Triton is installed, but doesn't include CPU backend. Disabling Triton."
KV_LOG_LINE = re.compile(
    r"KV cache size: ([\d,]+) tokens, Maximum concurrency for [\d,]+ tokens per request: ([\d.]+)x"
)


def process_group_cmdlines(leader: int) -> list[str]:
    """Command lines of every live process in `leader`'s process group (vLLM's API server, engine, workers)."""
    cmdlines = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == leader:  # pgrp
                cmdlines.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode())
        except (OSError, IndexError, ValueError):
            continue
    return cmdlines


def test_vllm_logs_the_kv_cache_the_planner_predicted_within_one_percent(vllm_server: VllmServer) -> None:
    report = plan_for_spec(vllm_server.spec)
    match = KV_LOG_LINE.search(vllm_server.log_text())

    assert report is not None and match, "no capacity report or no KV cache line in vLLM's log"
    logged_tokens = int(match.group(1).replace(",", ""))
    assert report.kv_tokens == pytest.approx(logged_tokens, rel=0.01)
    assert report.max_concurrency == pytest.approx(float(match.group(2)), rel=0.01)


def test_models_without_the_internal_key_is_401(vllm_server: VllmServer) -> None:
    response = httpx.get(f"{vllm_server.url}/v1/models", timeout=10)

    assert response.status_code == 401


def test_models_with_the_internal_key_lists_the_served_name(vllm_server: VllmServer) -> None:
    response = httpx.get(
        f"{vllm_server.url}/v1/models", headers={"Authorization": f"Bearer {vllm_server.api_key}"}, timeout=10
    )

    assert response.status_code == 200
    assert [model["id"] for model in response.json()["data"]] == [vllm_server.served_model_name]


def test_chat_completion_returns_the_requested_tokens(vllm_server: VllmServer) -> None:
    client = OpenAI(base_url=f"{vllm_server.url}/v1", api_key=vllm_server.api_key, timeout=60)

    completion = client.chat.completions.create(
        model=vllm_server.served_model_name,
        messages=[{"role": "user", "content": "Name a colour."}],
        max_tokens=5,
        temperature=0,
    )

    assert completion.usage is not None and completion.usage.completion_tokens == 5
    assert completion.choices[0].message.content


def test_internal_key_is_on_no_vllm_command_line(vllm_server: VllmServer) -> None:
    cmdlines = process_group_cmdlines(vllm_server.pid)

    assert any("vllm.entrypoints.openai.api_server" in line for line in cmdlines)
    assert not [line for line in cmdlines if vllm_server.api_key in line]


def test_prompts_and_the_key_stay_out_of_vllm_log(vllm_server: VllmServer) -> None:
    secret_prompt = "zebra-canary-4471 what rhymes with this?"
    client = OpenAI(base_url=f"{vllm_server.url}/v1", api_key=vllm_server.api_key, timeout=60)

    client.chat.completions.create(
        model=vllm_server.served_model_name, messages=[{"role": "user", "content": secret_prompt}], max_tokens=2
    )

    log = vllm_server.log_text()
    assert "zebra-canary-4471" not in log
    assert vllm_server.api_key not in log


def test_the_engine_core_is_forked_from_the_api_server_so_vllm_is_imported_once(vllm_server: VllmServer) -> None:
    # given the launcher's vLLM serving, its engine core in a process of its own (titled VLLM::EngineCore)
    cmdlines = process_group_cmdlines(vllm_server.pid)
    assert len([line for line in cmdlines if line.startswith("VLLM::EngineCore")]) == 1, cmdlines
    # then vLLM was imported once: the line its import prints on a CPU host is in the log once, not a
    # second time from a spawned engine core's own import (as with VLLM_ENABLE_V1_MULTIPROCESSING=1)
    assert vllm_server.log_text().count(VLLM_IMPORT_LINE) == 1

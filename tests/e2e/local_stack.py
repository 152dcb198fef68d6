"""A private copy of the local stack for end-to-end tests: free ports, its own state dir, `gpugate up`/`down`."""

from __future__ import annotations

import json
import os
import re
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai

from tests.conftest import edit_stack, run_gpugate
from tests.e2e.conftest import find_free_port

UP_TIMEOUT_S = 900
# vLLM's own count of the HTTP requests it served on /v1/completions (RunningStack.vllm_metric's arguments). The
# prober never calls that route, so only a test's requests move it.
COMPLETIONS_SERVED = ("http_requests_total", 'handler="/v1/completions"')


@dataclass
class RunningStack:
    stack_file: Path
    env: dict[str, str]
    url: str
    ca_file: Path
    key: str
    model: str
    ports: dict[str, int]
    state: Path
    up_output: str = ""

    def gpugate(self, *args: str, timeout: float = UP_TIMEOUT_S):
        return run_gpugate(*args, "--stack", str(self.stack_file), env=self.env, timeout=timeout)

    def client(self, key: str | None = None) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=f"{self.url}/v1", api_key=key or self.key, max_retries=0, timeout=60,
            http_client=httpx.Client(verify=self.tls()),
        )

    def tls(self) -> ssl.SSLContext:
        """Trusts exactly the stack's local CA, as the printed CA file tells a user to."""
        return ssl.create_default_context(cafile=str(self.ca_file))

    def status(self) -> dict:
        return json.loads(self.gpugate("status", "--json", timeout=60).stdout)

    def pid_of(self, service: str) -> int:
        return next(s["pid"] for s in self.status()["services"] if s["name"] == service)

    def vllm_metric(self, name: str, label: str = "") -> float:
        """The sum of a series of vLLM's own /metrics, over the samples whose labels contain `label`."""
        text = httpx.get(f"http://127.0.0.1:{self.ports['vllm']}/metrics", timeout=5).text
        values = [
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if (line.startswith(name + "{") or line.startswith(name + " ")) and label in line.split(" ", 1)[0]
        ]
        return sum(values)

    @property
    def key_store(self) -> Path:
        return self.state / "var" / "lib" / "gpugate" / "keys.json"

    def keys(self, *args: str) -> dict | list:
        """Run the host's key CLI (`gpugate-runtime keys ...`) against this stack's store; its --json answer."""
        proc = subprocess.run(
            [sys.executable, "-m", "gpugate_runtime", "keys", *args, "--store", str(self.key_store), "--json"],
            capture_output=True, text=True, timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    def prometheus(self, query: str) -> list[dict]:
        response = httpx.get(f"http://127.0.0.1:{self.ports['prometheus']}/api/v1/query", params={"query": query}, timeout=10)
        return response.json()["data"]["result"]


def wait_until(predicate, timeout: float, interval: float = 0.5, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@contextmanager
def running_local_stack(root: Path, change: Callable[[dict[str, Any]], None] = lambda c: None) -> Iterator["RunningStack"]:
    """A copy of the local stack on free ports with its own state dir under `root`, brought up by
    `gpugate up` and always brought down again; `change` may edit the copy's config first."""
    https, http = find_free_port(), find_free_port()
    base = 23000 + (os.getpid() % 200) * 10

    def ports(config):
        config["gpugate:ports"]["https"] = https
        config["gpugate:ports"]["http"] = http
        config["gpugate:ports"]["internal_base"] = base
        change(config)

    stack_file = edit_stack("local", root / "Pulumi.e2e.yaml", ports)
    env = {**os.environ, "GPUGATE_STATE_DIR": str(root / "state")}
    result = run_gpugate("up", "--stack", str(stack_file), env=env, timeout=UP_TIMEOUT_S)
    assert result.returncode == 0, result.stdout + result.stderr
    key = re.search(r"\b(ggk_[A-Za-z0-9_-]+)", result.stdout).group(1)
    ca_file = Path(re.search(r"CA file\s+(\S+)", result.stdout).group(1))
    running = RunningStack(
        stack_file=stack_file, env=env, url=f"https://localhost:{https}", ca_file=ca_file, key=key,
        model="smollm2-135m-instruct", state=root / "state" / "e2e",
        ports={"vllm": base, "authz": base + 1, "prober": base + 2, "prometheus": base + 3, "alertmanager": base + 4,
               "caddy_metrics": base + 5, "alert_sink": base + 6},
    )
    running.up_output = result.stdout
    try:
        yield running
    finally:
        run_gpugate("down", "--stack", str(stack_file), env=env, timeout=120)




def key_store(stack: RunningStack) -> Path:
    """The stack's key store file (the same as `stack.key_store`)."""
    return stack.key_store

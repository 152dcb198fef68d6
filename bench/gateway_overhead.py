"""What the gateway hop costs: wrk latency and throughput direct to a fast upstream vs through Caddy + authz.

Prints figures; asserts nothing. Run: PYTHONPATH=.:runtime .venv/bin/python bench/gateway_overhead.py [--seconds 5]
One run renders the local stack with free ports, puts a Go responder (Caddy `respond`) where vLLM
would be, and measures in the same run, with keep-alive connections, at 1 and 16 connections:
  direct   wrk -> http://127.0.0.1:<vllm port>/v1/models
  gateway  wrk -> https://localhost:<https port>/v1/models: TLS, forward_auth to authz, reverse_proxy,
           access log followed by authz; a valid key allowed 1,000,000 rpm and in flight
  floor    the same rendered Caddyfile on other ports, with forward_auth sent to a Go responder that
           allows everything: what Caddy's two hops cost on this machine with an authz that costs nothing
then authz alone (wrk -c16 -> /authz), authz pinned to one core and wrk to the other.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "runtime")]
from gpugate_runtime.contract.host import CADDY_GO_ENV, KEY_ID_HEADER  # noqa: E402
from tests.e2e.gateway_fixtures import CADDY, INTERNAL_KEY, Gateway, free_port, running_gateway, wait_until  # noqa: E402

WRK = shutil.which("wrk") or "/usr/bin/wrk"
UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}
MODELS = '{"object":"list","data":[{"id":"smollm2-135m-instruct","object":"model","owned_by":"vllm"}]}'


class Caddy:
    """A Caddy process from Caddyfile text, with its own home; stopped by stop()."""

    def __init__(self, config: str, ready_url: str, env: dict[str, str] | None = None) -> None:
        self.config, self.ready_url, self.env = config, ready_url, env or {}
        self.dir = Path(tempfile.mkdtemp(prefix="gpugate-bench-caddy-"))
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        (self.dir / "Caddyfile").write_text(self.config)
        home = str(self.dir)
        env = {"PATH": os.environ.get("PATH", ""), "HOME": home, "XDG_CONFIG_HOME": home, "XDG_DATA_HOME": home, **self.env}
        with (self.dir / "caddy.log").open("wb") as out:
            argv = [CADDY, "run", "--adapter", "caddyfile", "--config", str(self.dir / "Caddyfile")]
            self.process = subprocess.Popen(argv, env=env, stdout=out, stderr=out)
        wait_until(lambda: httpx.get(self.ready_url, timeout=1, verify=False).status_code < 500, 15, what=self.ready_url)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=10)
        shutil.rmtree(self.dir, ignore_errors=True)


def responder(port: int, site: str) -> Caddy:
    config = "{\n\tadmin off\n\tauto_https off\n}\n" + f"http://127.0.0.1:{port} {{\n\tbind 127.0.0.1\n{site}}}\n"
    return Caddy(config, f"http://127.0.0.1:{port}/health")


def fast_upstream(port: int) -> Caddy:
    """A stand-in for vLLM that answers from memory in tens of microseconds."""
    return responder(port, f"\trespond /health 200\n\trespond /v1/models `{MODELS}` 200\n\trespond 404\n")


def floor_gateway(gateway: Gateway, key_id: str) -> tuple[list[Caddy], str]:
    """The gateway's own Caddyfile with forward_auth answered by Go instead of authz."""
    allow = free_port()
    fake_authz = responder(allow, f"\theader {KEY_ID_HEADER} {key_id}\n\trespond 200\n")
    https_port, http_port, metrics_port = free_port(), free_port(), free_port()
    text = (gateway.layout.etc / "caddy" / "Caddyfile").read_text()
    for old, new in [
        (f"https_port {gateway.https_port}", f"https_port {https_port}"),
        (f"http_port {gateway.http_port}", f"http_port {http_port}"),
        (f"http://127.0.0.1:{gateway.ports.caddy_metrics} {{", f"http://127.0.0.1:{metrics_port} {{"),
        (f"forward_auth 127.0.0.1:{gateway.ports.authz} {{", f"forward_auth 127.0.0.1:{allow} {{"),
        ("/access.log", "/access-floor.log"),
    ]:
        assert old in text, old
        text = text.replace(old, new)
    caddy = Caddy(text, f"https://localhost:{https_port}/healthz", {"GPUGATE_VLLM_API_KEY": INTERNAL_KEY, **CADDY_GO_ENV})
    return [fake_authz, caddy], f"https://localhost:{https_port}/v1/models"


@dataclass
class Run:
    label: str
    connections: int
    p50: float
    p99: float
    rps: float
    errors: int
    requests: int
    cpu: dict[str, float]  # CPU seconds each watched process used during the run


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wrk(
    label: str, url: str, connections: int, seconds: int, headers: dict[str, str], core: int | None = None,
    watch: dict[str, int] | None = None,
) -> Run:  # fmt: skip
    def command(duration: int) -> list[str]:
        argv = ["taskset", "-c", str(core)] if core is not None else []
        argv += [WRK, "-t1", f"-c{connections}", f"-d{duration}s", "--latency"]
        for name, value in headers.items():
            argv += ["-H", f"{name}: {value}"]
        return [*argv, url]

    subprocess.run(command(1), capture_output=True, timeout=30)  # warm up: connections, TLS sessions, caches
    watch = watch or {}
    before = {name: cpu_seconds(pid) for name, pid in watch.items()}
    out = subprocess.run(command(seconds), capture_output=True, text=True, timeout=seconds + 30).stdout
    cpu = {name: cpu_seconds(pid) - before[name] for name, pid in watch.items()}
    latency = {m.group(1): float(m.group(2)) * UNITS[m.group(3)] for m in re.finditer(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)$", out, re.M)}
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = (int(bad.group(1)) if bad else 0) + (sum(map(int, socket_errors.groups())) if socket_errors else 0)
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    return Run(label, connections, latency["50"], latency["99"], rps, errors, requests, cpu)


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=5, help="duration of each wrk run")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    runs: dict[tuple[str, int], Run] = {}
    with tempfile.TemporaryDirectory(prefix="gpugate-bench-") as tmp, running_gateway(Path(tmp), fast_upstream) as gateway:
        key = gateway.new_key("bench", rpm=1_000_000, max_concurrent=1_000_000, expires=timedelta(hours=1))
        auth = {"Authorization": f"Bearer {key.token}"}
        floor_processes, floor_url = floor_gateway(gateway, key.record.id)
        try:
            for process in floor_processes:
                process.start()
            for connections in (1, 16):
                runs[("direct", connections)] = wrk("direct", f"http://127.0.0.1:{gateway.ports.vllm}/v1/models", connections, args.seconds, auth)
                runs[("gateway", connections)] = wrk(
                    "gateway", f"https://localhost:{gateway.https_port}/v1/models", connections, args.seconds, auth,
                    watch={"Caddy": gateway.processes[1].pid, "authz": gateway.processes[0].pid},
                )  # fmt: skip
                runs[("floor", connections)] = wrk("floor", floor_url, connections, args.seconds, auth)
        finally:
            for process in floor_processes:
                process.stop()
        authz_pid = gateway.processes[0].pid
        subprocess.run(["taskset", "-p", "-c", "1", str(authz_pid)], check=True, capture_output=True)
        alone = wrk(
            "authz", f"http://127.0.0.1:{gateway.ports.authz}/authz", 16, args.seconds,
            {**auth, "X-Request-Id": "bench-authz-alone", "X-Forwarded-Method": "GET"}, core=0,
        )  # fmt: skip

    print(f"wrk -t1 --latency, {args.seconds} s per run, keep-alive; upstream: Caddy `respond` (Go) on loopback")
    print(f"{os.cpu_count()} cores; 1-min load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after\n")
    print(f"{'path':<10}{'conns':>6}{'p50 ms':>10}{'p99 ms':>10}{'req/s':>10}{'errors':>8}")
    for run in sorted(runs.values(), key=lambda r: (r.connections, ["direct", "floor", "gateway"].index(r.label))):
        print(f"{run.label:<10}{run.connections:>6}{ms(run.p50):>10}{ms(run.p99):>10}{run.rps:>10.0f}{run.errors:>8}")
    print()
    for connections in (1, 16):
        direct = runs[("direct", connections)]
        for label in ("floor", "gateway"):
            through = runs[(label, connections)]
            print(
                f"c={connections:<3}{label:<8} added p50 {ms(through.p50 - direct.p50)} ms, added p99 {ms(through.p99 - direct.p99)} ms; "
                f"ratio p50 x{through.p50 / direct.p50:.1f}, p99 x{through.p99 / direct.p99:.1f}, req/s x{through.rps / direct.rps:.2f}"
            )
    for connections in (1, 16):
        run = runs[("gateway", connections)]
        shares = ", ".join(f"{name} {seconds / run.requests * 1e6:.0f} µs" for name, seconds in run.cpu.items())
        print(f"c={connections:<3}gateway  CPU time per request: {shares}")
    print(
        f"\nauthz alone (one core, wrk -c16 on the other): {alone.rps:.0f} decisions/s, "
        f"p50 {ms(alone.p50)} ms, p99 {ms(alone.p99)} ms, errors {alone.errors}"
    )
    print("targets: added p50 <= 0.4 ms at c=1, added p99 <= 2 ms at c=16, authz >= 5000 decisions/s on one core")


if __name__ == "__main__":
    main()

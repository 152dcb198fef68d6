"""Gateway overhead in front of REAL vLLM (CPU build), and the launcher's KV-cache prediction vs vLLM's own log.

Prints figures; asserts nothing. Run: .venv/bin/python bench/vllm_gateway.py [--seconds N]
Brings up a private copy of the local stack (free ports, temporary state dir) and tears it down.
For each of `/v1/models` (the hop alone) and a 1-token chat completion (the hop next to real
inference), `wrk` runs for the same time at 1 and at 16 connections, direct to vLLM
on loopback (with its internal key) and through Caddy + authz over TLS (with a client key).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from tests.e2e.local_stack import running_local_stack  # noqa: E402

CHAT = json.dumps({"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1})


def _ms(text: str) -> float:
    value, unit = re.fullmatch(r"([0-9.]+)(us|ms|s)", text).groups()
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def wrk(url: str, key: str, seconds: int, conns: int, body: str | None) -> dict[str, float]:
    """One wrk run (keep-alive connections, TLS with SNI); the body makes it a POST."""
    argv = ["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--latency", "-H", f"Authorization: Bearer {key}"]
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        if body:
            script.write(f'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\nwrk.body = {json.dumps(body)}\n')
    out = subprocess.run([*argv, "-s", script.name, url], capture_output=True, text=True, timeout=seconds + 60).stdout
    Path(script.name).unlink()
    figures = {"rps": float(re.search(r"Requests/sec:\s+([0-9.]+)", out).group(1))}
    for pct in ("50", "99"):
        figures[f"p{pct}_ms"] = _ms(re.search(rf"\s{pct}(?:\.000)?%\s+(\S+)", out).group(1))
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    figures["failed"] = (int(bad.group(1)) if bad else 0) + (sum(map(int, errors.groups())) if errors else 0)
    return figures


def kv_figures(log: str) -> tuple[str, str]:
    predicted = re.search(r"expected KV cache ([0-9,]+) tokens", log)
    logged = re.search(r"KV cache size: ([0-9,]+) tokens", log)
    return (predicted.group(1) if predicted else "?", logged.group(1) if logged else "?")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=5, help="length of each measurement (default 5)")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="gpugate-bench-vllm-") as tmp, running_local_stack(Path(tmp)) as stack:
        internal = (stack.state / "etc" / "gpugate" / "secrets" / "vllm_api_key").read_text().strip()
        direct = f"http://127.0.0.1:{stack.ports['vllm']}"
        limits = stack.keys("create", "bench", "--rpm", "1000000", "--max-concurrent", "1000")
        for label, path, body in (("models", "/v1/models", None), ("chat 1 token", "/v1/chat/completions", CHAT)):
            for conns in (1, 16):
                wrk(f"{stack.url}{path}", limits["key"], 1, conns, body)  # warm-up
                d = wrk(f"{direct}{path}", internal, args.seconds, conns, body)
                g = wrk(f"{stack.url}{path}", limits["key"], args.seconds, conns, body)
                rows.append((label, conns, d, g))
        predicted, logged = kv_figures((stack.state / "var" / "log" / "gpugate" / "vllm.log").read_text(errors="replace"))
    print(f"{'request':<14}{'conns':>6}{'direct p50':>12}{'gateway p50':>13}{'added p50':>11}{'direct p99':>12}"
          f"{'gateway p99':>13}{'rps ratio':>11}{'failed':>9}")
    for label, conns, d, g in rows:
        print(f"{label:<14}{conns:>6}{d['p50_ms']:>10.2f}ms{g['p50_ms']:>11.2f}ms{g['p50_ms'] - d['p50_ms']:>9.2f}ms"
              f"{d['p99_ms']:>10.2f}ms{g['p99_ms']:>11.2f}ms{g['rps'] / d['rps']:>11.2f}{int(d['failed'] + g['failed']):>9}")
    print(f"KV cache tokens: launcher predicted {predicted}, vLLM logged {logged}")


if __name__ == "__main__":
    main()

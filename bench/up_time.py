"""Time from `gpugate up` to the first authenticated completion, cold (empty cache) and cached, against vLLM's import floor.

Prints figures; asserts nothing. Run: .venv/bin/python bench/up_time.py [--skip-cold] [--repeat N] [--env NAME=VALUE]
The cold run uses a fresh cache directory, so it includes building the vLLM CPU venv
(~3.5 GB from the package registry) and converting the model; Debian packages are
assumed installed (scripts/bootstrap.sh). Each run uses its own state dir and ports.

Every cached run also measures, just before it, the import floor: one
`python -c "import vllm.entrypoints.openai.api_server"` in the vLLM venv, the least any start of
vLLM's server costs. With the weight loading time vLLM logs for the run ("Loading weights took"),
it prints up -> first completion as a ratio to (import floor + weight loading), and the phases of
the start read from the logs (second resolution): supervisord to launcher exec (the launcher, and
its argument check when on), exec to vLLM's first log line (the API server's import), to the engine
core's first line (its own import), to "Application startup complete", to `gpugate up` returning
(the prober's next green run), to the first completion. Each row also shows the machine's 1-minute load
average as the run started: the floor and the start share the machine with whatever else runs.
--env NAME=VALUE (repeatable) adds to the environment of the stack's programs (supervisord passes its
environment down) to try a knob; --baseline REF runs the code at git REF too (git archive, PYTHONPATH).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import httpx
import openai

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from tests.conftest import edit_stack  # noqa: E402

IMPORT_FLOOR = "import vllm.entrypoints.openai.api_server"
# Lines of the vLLM log that mark a phase of the start (the launcher's own lines carry a full date).
LAUNCHER_EXEC = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),\d+ INFO gpugate_runtime\.launcher: starting vLLM")
VLLM_LINE = re.compile(r"^\((APIServer|EngineCore)[^)]*\) \w+ (\d\d-\d\d \d\d:\d\d:\d\d) ")
WEIGHTS = re.compile(r"Loading weights took ([0-9.]+) seconds")
SUPERVISOR_SPAWN = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),\d+ INFO spawned: 'vllm'")


def import_floor(vllm_python: Path) -> float:
    started = time.monotonic()
    subprocess.run([str(vllm_python), "-c", IMPORT_FLOOR], check=True, capture_output=True, timeout=600)
    return time.monotonic() - started


def phases(logs: Path, year: int) -> tuple[dict[str, float], float | None]:
    """Unix times of the start's milestones from supervisord's and vLLM's logs, and the weight loading time."""
    marks: dict[str, float] = {}
    weights = None
    last_vllm = 0.0

    def stamp(text: str) -> float:
        return datetime.strptime(text, "%Y-%m-%d %H:%M:%S").timestamp()

    for line in (logs / "supervisord.log").read_text(errors="replace").splitlines():
        if m := SUPERVISOR_SPAWN.match(line):
            marks.setdefault("spawned", stamp(m.group(1)))
    for line in (logs / "vllm.log").read_text(errors="replace").splitlines():
        if m := LAUNCHER_EXEC.match(line):
            marks.setdefault("exec", stamp(m.group(1)))
        elif m := VLLM_LINE.match(line):
            last_vllm = stamp(f"{year}-{m.group(2)}")
            marks.setdefault("api_first_line" if m.group(1) == "APIServer" else "engine_first_line", last_vllm)
        elif "Application startup complete" in line and last_vllm:
            marks.setdefault("serving", last_vllm)  # uvicorn's line has no time: vLLM's line before it
        if weights is None and (m := WEIGHTS.search(line)):
            weights = float(m.group(1))
    return marks, weights


def one_run(
    label: str, cache: Path, root: Path, base: int, env_extra: dict[str, str], tree: Path = REPO
) -> tuple[dict[str, float], str]:
    def ports(config):
        config["gpugate:ports"].update({"https": base + 443, "http": base + 80, "internal_base": base})

    root.mkdir(parents=True, exist_ok=True)
    stack = edit_stack("local", root / f"Pulumi.bench{base}.yaml", ports)
    env = {**os.environ, **env_extra, "GPUGATE_CACHE_DIR": str(cache), "GPUGATE_STATE_DIR": str(root / "state")}
    # This tree too: the installed `gpugate` may be another checkout's (an editable install), and the stack's
    # programs (the launcher among them) import gpugate_runtime from what supervisord passes down.
    env["PYTHONPATH"] = os.pathsep.join([str(tree), str(tree / "runtime")])
    gpugate = [sys.executable, "-m", "gpugate"]
    figures: dict[str, float] = {"load": os.getloadavg()[0]}  # the machine's 1-minute load as the run starts
    started_wall = time.time()
    started = time.monotonic()
    up = subprocess.run([*gpugate, "up", "--stack", str(stack)], cwd=tree, env=env, capture_output=True, text=True, timeout=1800)
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
        subprocess.run([*gpugate, "down", "--stack", str(stack)], cwd=tree, env=env, capture_output=True, timeout=300)
    figures.update(up_s=up_done - started, first_completion_s=first - started)
    marks, weights = phases(next((root / "state").rglob("supervisord.log")).parent, datetime.now().year)
    if weights is not None:
        figures["weights_s"] = weights
    order = [m for m in ("spawned", "exec", "api_first_line", "engine_first_line", "serving") if m in marks]
    times = [started_wall, *(marks[m] for m in order), started_wall + figures["up_s"], started_wall + figures["first_completion_s"]]
    names = [*order, "up returned", "first completion"]
    timeline = " | ".join(f"{name}: {b - a:+.0f}s" for a, b, name in zip(times, times[1:], names))
    return figures, timeline


def export_tree(ref: str, dest: Path) -> Path:
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", ref], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return dest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-cold", action="store_true", help="only the cached run")
    parser.add_argument("--repeat", type=int, default=1, help="cached runs (each with its own import floor)")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="extra environment of the stack")
    parser.add_argument("--baseline", metavar="REF", help="also run the code at this git ref, interleaved")
    args = parser.parse_args()
    extra = dict(item.split("=", 1) for item in args.env)
    from gpugate.local.vllm_env import VENV_NAME, default_cache_dir, venv_python  # noqa: PLC0415

    results: dict[str, list[tuple[dict[str, float], str]]] = {}
    with tempfile.TemporaryDirectory(prefix="gpugate-bench-") as tmp:
        tmp_path = Path(tmp)
        if not args.skip_cold:
            cold_cache = tmp_path / "cold-cache"
            results["cold (empty cache: vLLM venv + model + start)"] = [one_run("cold", cold_cache, tmp_path / "cold", 24000, extra)]
            shutil.rmtree(cold_cache, ignore_errors=True)
        cache = default_cache_dir()
        python = venv_python(cache / VENV_NAME)
        trees = [("cached", REPO, extra)]
        if args.baseline:
            trees.insert(0, (f"cached, baseline@{args.baseline}", export_tree(args.baseline, tmp_path / "baseline"), {}))
        for index in range(args.repeat):
            for label, tree, env_extra in trees:
                floor = import_floor(python)
                figures, timeline = one_run(label, cache, tmp_path / f"cached{index}-{len(label)}", 24100, env_extra, tree)
                figures["import_floor_s"] = floor
                results.setdefault(label, []).append((figures, timeline))
    print(f"{'run':<50} {'up':>7} {'first completion':>17} {'import floor':>13} {'weights':>8} {'ratio':>6} {'load':>5}")
    for label, runs in results.items():
        for figures, timeline in runs:
            floor, weights = figures.get("import_floor_s"), figures.get("weights_s", 0.0)
            ratio = figures["first_completion_s"] / (floor + weights) if floor else None
            print(
                f"{label:<50} {figures['up_s']:>6.1f}s {figures['first_completion_s']:>16.1f}s"
                + (f" {floor:>12.1f}s {weights:>7.1f}s {ratio:>6.2f}" if ratio else "")
                + f" {figures['load']:>5.1f}"
            )
            print(f"    {timeline}")
        ratios = [f["first_completion_s"] / (f["import_floor_s"] + f.get("weights_s", 0.0)) for f, _ in runs if "import_floor_s" in f]
        if len(ratios) > 1:
            print(f"    ratio over {len(ratios)} runs: mean {statistics.mean(ratios):.2f}, sd {statistics.stdev(ratios):.2f}")
    print("targets: cold <= 900 s (15 min, incl. apt), cached <= 90 s")


if __name__ == "__main__":
    main()

"""CPU an idle local gateway burns: seconds of CPU per minute for each supervisord program.

Prints figures; asserts nothing. Run: .venv/bin/python bench/idle_cpu.py [--baseline REF] [--window 60]
Each run brings up the `local` stack from its own copy of stacks/Pulumi.local.yaml (ports
28443/28080/28000.. by default, state under a temp dir: never another session's stack), waits until
`gpugate up` reports every check green, lets it settle, then reads utime+stime from /proc for every
process of each supervisord program (children included, and the CPU of children that exited and were
reaped) over --windows windows of --window seconds. Then it times 1-token completions after idle
(each sent halfway between two prober runs, so neither waits on the other) and tears the stack down.

--baseline REF adds runs of the code at git REF (exported with `git archive`, run with PYTHONPATH
pointing at it), interleaved with runs of this tree, so before and after are measured on the same
machine in the same session. --env NAME=VALUE (repeatable) adds to the environment of every program
of the "current" runs (supervisord passes its environment down), and --variant LABEL:NAME=VALUE,...
adds runs of this tree with more environment, to try a knob before coding it; a NAME with a colon
edits the stack file instead (gpugate:model.dtype=float32).

What each run also prints, so a change can be shown not to thin the monitoring: the prober's
requests per minute by path (from Caddy's access log) and Prometheus's scrapes per job over the
windows (count_over_time(up[...]) from its own API), next to its scrape interval.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import xmlrpc.client
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from tests.conftest import edit_stack  # noqa: E402

HZ = os.sysconf("SC_CLK_TCK")
STACK_NAME = "idlebench"


@dataclass
class Run:
    label: str
    tree: Path  # the source tree whose `gpugate up` runs
    env: dict[str, str] = field(default_factory=dict)
    stack: dict[str, str] = field(default_factory=dict)  # "gpugate:model.dtype" -> "float32"
    up_s: float = 0.0
    windows: list[dict[str, float]] = field(default_factory=list)  # program -> CPU s per minute
    completions_s: list[float] = field(default_factory=list)
    prober_per_min: dict[str, float] = field(default_factory=dict)
    scrapes: dict[str, tuple[float, str]] = field(default_factory=dict)  # job -> (scrapes per minute, interval)


def _typed(value: str) -> object:
    try:
        return json.loads(value)
    except ValueError:
        return value


# ---- /proc ---------------------------------------------------------------------------------------


def _proc_table() -> dict[int, tuple[int, int, int]]:
    """pid -> (ppid, CPU ticks of the process itself, CPU ticks of its reaped children)."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(") ", 1)[1].split()
        except (OSError, IndexError):
            continue
        # fields[0] is state; utime, stime, cutime, cstime are stat fields 14-17.
        table[int(entry)] = (int(fields[1]), int(fields[11]) + int(fields[12]), int(fields[13]) + int(fields[14]))
    return table


def _tree_ticks(table: dict[int, tuple[int, int, int]], roots: dict[str, int]) -> dict[str, dict[int, int]]:
    """program -> {pid: ticks} for each root pid and all its descendants (own and reaped children's
    CPU); supervisord's own CPU only, since its children are the programs, counted on their own."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    result = {}
    for name, root in roots.items():
        if name == "supervisord":
            result[name] = {root: table[root][1]} if root in table else {}
            continue
        pids, todo = {}, [root]
        while todo:
            pid = todo.pop()
            if pid in table and pid not in pids:
                pids[pid] = table[pid][1] + table[pid][2]
                todo.extend(children.get(pid, ()))
        result[name] = pids
    return result


# ---- one stack -----------------------------------------------------------------------------------


class Stack:
    def __init__(self, run: Run, root: Path, base: int, https: int, http: int) -> None:
        self.run, self.root, self.base, self.https = run, root, base, https

        def ports(config):
            config["gpugate:ports"].update({"https": https, "http": http, "internal_base": base})
            for name, value in run.stack.items():
                top, *path = name.split(".")
                node = config[top]
                for part in path[:-1]:
                    node = node[part]
                node[path[-1]] = _typed(value)

        root.mkdir(parents=True, exist_ok=True)
        self.stack_file = edit_stack("local", root / f"Pulumi.{STACK_NAME}.yaml", ports)
        self.env = {**os.environ, **run.env, "GPUGATE_STATE_DIR": str(root / "state")}
        # This tree too: the installed `gpugate` may be another checkout's (an editable install).
        self.env["PYTHONPATH"] = os.pathsep.join([str(run.tree), str(run.tree / "runtime")])
        self.key = ""
        self.ca = ""

    def gpugate(self, *args: str, timeout: float) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "gpugate", *args, "--stack", str(self.stack_file)],
            cwd=self.run.tree, env=self.env, capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip

    def up(self) -> None:
        started = time.monotonic()
        proc = self.gpugate("up", timeout=1200)
        self.run.up_s = time.monotonic() - started
        if proc.returncode != 0:
            raise SystemExit(f"{self.run.label}: gpugate up failed:\n{proc.stdout}\n{proc.stderr}")
        self.key = re.search(r"\b(ggk_\S+)", proc.stdout).group(1)
        self.ca = re.search(r"CA file\s+(\S+)", proc.stdout).group(1)

    def down(self) -> None:
        self.gpugate("down", timeout=300)

    @property
    def state(self) -> Path:
        return self.root / "state" / STACK_NAME

    def programs(self) -> dict[str, int]:
        sock = next(self.state.rglob("supervisor.sock"))
        from supervisor.xmlrpc import SupervisorTransport  # noqa: PLC0415 - only the bench needs it

        proxy = xmlrpc.client.ServerProxy("http://127.0.0.1", transport=SupervisorTransport(None, None, f"unix://{sock}"))
        roots = {p["name"]: p["pid"] for p in proxy.supervisor.getAllProcessInfo() if p["pid"]}
        roots["supervisord"] = proxy.supervisor.getPID()
        return roots

    def measure(self, seconds: float) -> dict[str, float]:
        roots = self.programs()
        before = _tree_ticks(_proc_table(), roots)
        started = time.monotonic()
        time.sleep(seconds)
        after = _tree_ticks(_proc_table(), roots)
        elapsed = time.monotonic() - started
        per_min = {}
        for name in roots:
            # A process born in the window counts from 0; one that ended in it is in its parent's reaped CPU.
            ticks = sum(t - before[name].get(pid, 0) for pid, t in after[name].items())
            per_min[name] = ticks / HZ * 60 / elapsed
        return per_min

    def prober_next_gap(self, interval: float) -> float:
        """Seconds until halfway between two prober runs."""
        status = httpx.get(f"http://127.0.0.1:{self.base + 2}/status", timeout=5).json()
        checked = datetime.fromisoformat(status["checked_at"]).timestamp()
        phase = (time.time() - checked) % interval
        return (interval / 2 - phase) % interval

    def completion(self) -> float:
        payload = {"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
        with httpx.Client(verify=self.ca, timeout=60) as client:
            started = time.perf_counter()
            response = client.post(
                f"https://localhost:{self.https}/v1/chat/completions", json=payload, headers={"Authorization": f"Bearer {self.key}"}
            )
            elapsed = time.perf_counter() - started
        response.raise_for_status()
        return elapsed

    def prober_requests(self, since: float, until: float) -> dict[str, float]:
        """The prober's requests through Caddy per minute, by path (its key id in the access log)."""
        keys = json.loads(next(self.state.rglob("keys.json")).read_text())["keys"]
        prober_id = next(k["id"] for k in keys if k["name"] == "prober")
        counts: Counter[str] = Counter()
        for line in next(self.state.rglob("access.log")).read_text().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            ids = str(entry.get("key_and_request_id", ""))
            if ids.startswith(prober_id + " ") and since <= entry.get("ts", 0) < until:
                request = entry.get("request", {})
                counts[f"{request.get('method')} {request.get('uri')}"] += 1
        checks = httpx.get(f"http://127.0.0.1:{self.base + 2}/status", timeout=5).json()["results"]
        counts_per_min = {path: n * 60 / (until - since) for path, n in sorted(counts.items())}
        counts_per_min["checks " + ",".join(f"{c['check']}={c['ok']}" for c in checks)] = 0.0
        return counts_per_min

    def scrapes(self, seconds: float) -> dict[str, tuple[float, str]]:
        api = f"http://127.0.0.1:{self.base + 3}/api/v1"
        query = f"count_over_time(up[{int(seconds)}s])"
        result = httpx.get(f"{api}/query", params={"query": query}, timeout=10).json()["data"]["result"]
        targets = httpx.get(f"{api}/targets", timeout=10).json()["data"]["activeTargets"]
        intervals = {t["labels"]["job"]: t.get("scrapeInterval", "?") for t in targets}
        return {
            r["metric"]["job"]: (float(r["value"][1]) * 60 / seconds, intervals.get(r["metric"]["job"], "?"))
            for r in sorted(result, key=lambda r: r["metric"]["job"])
        }


def one_run(run: Run, root: Path, args: argparse.Namespace) -> None:
    stack = Stack(run, root, args.base, args.https, args.http)
    print(f"[{run.label}] gpugate up ...", flush=True)
    try:
        stack.up()
        print(f"[{run.label}] up in {run.up_s:.1f} s; settling {args.settle:g} s", flush=True)
        time.sleep(args.settle)
        since = time.time()
        for index in range(args.windows):
            run.windows.append(stack.measure(args.window))
            total = sum(run.windows[-1].values())
            print(f"[{run.label}] window {index + 1}/{args.windows}: {total:.2f} s CPU per minute", flush=True)
        until = time.time()
        run.prober_per_min = stack.prober_requests(since, until)
        run.scrapes = stack.scrapes(until - since)
        for _ in range(args.completions):
            time.sleep(stack.prober_next_gap(args.prober_interval))
            run.completions_s.append(stack.completion())
        print(f"[{run.label}] 1-token completions after idle: {', '.join(f'{s * 1000:.0f} ms' for s in run.completions_s)}")
    finally:
        stack.down()


# ---- report --------------------------------------------------------------------------------------


def _mean_sd(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:6.2f}       " if values else "   n/a       "
    return f"{statistics.mean(values):6.2f} ±{statistics.stdev(values):4.2f}"


def report(runs: list[Run]) -> None:
    by_label: dict[str, list[Run]] = {}
    for run in runs:
        by_label.setdefault(run.label, []).append(run)
    labels = list(by_label)
    programs = sorted({p for run in runs for w in run.windows for p in w})
    print("\nCPU seconds per minute, mean ± sd over all windows of all runs of each label")
    print(f"{'program':<14}" + "".join(f"{label:>18}" for label in labels))
    totals = {}
    for program in programs:
        row = f"{program:<14}"
        for label in labels:
            values = [w.get(program, 0.0) for run in by_label[label] for w in run.windows]
            row += f"{_mean_sd(values):>18}"
        print(row)
    row, pct = f"{'total':<14}", f"{'% of a core':<14}"
    for label in labels:
        values = [sum(w.values()) for run in by_label[label] for w in run.windows]
        totals[label] = statistics.mean(values)
        row += f"{_mean_sd(values):>18}"
        pct += f"{totals[label] / 60 * 100:>17.1f}%"
    print(row)
    print(pct)
    if len(labels) == 2 and totals[labels[1]]:
        print(f"ratio {labels[0]} / {labels[1]}: {totals[labels[0]] / totals[labels[1]]:.1f}x")
    print("\nper label: up (s), 1-token completion after idle (ms, each), prober requests/min, scrapes/min (interval)")
    for label, label_runs in by_label.items():
        ups = ", ".join(f"{r.up_s:.0f}" for r in label_runs)
        ms = ", ".join(f"{s * 1000:.0f}" for r in label_runs for s in r.completions_s)
        print(f"  {label}: up {ups} s; completions {ms} ms")
        last = label_runs[-1]
        print("    prober: " + "; ".join(f"{path} {n:.1f}" for path, n in last.prober_per_min.items()))
        print("    scrapes: " + "; ".join(f"{job} {n:.1f} ({iv})" for job, (n, iv) in last.scrapes.items()))


def export_tree(ref: str, dest: Path) -> Path:
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", ref], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return dest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", metavar="REF", help="also run the code at this git ref (e.g. main)")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="extra environment of the current runs")
    parser.add_argument(
        "--variant", action="append", default=[], metavar="LABEL:NAME=VALUE[,NAME=VALUE]",
        help="also run this tree under LABEL with this environment added (gpugate:a.b=V edits the stack file)",
    )  # fmt: skip
    parser.add_argument("--label", default="current", help="label of this tree's runs")
    parser.add_argument("--cycles", type=int, default=1, help="runs of each label, interleaved")
    parser.add_argument("--window", type=float, default=60, help="seconds per measurement window")
    parser.add_argument("--windows", type=int, default=2, help="windows per run")
    parser.add_argument("--settle", type=float, default=30, help="seconds between healthy and the first window")
    parser.add_argument("--completions", type=int, default=3, help="1-token completions timed after idle")
    parser.add_argument("--prober-interval", type=float, default=15, help="the stack's prober interval (s)")
    parser.add_argument("--base", type=int, default=28000, help="internal_base port")
    parser.add_argument("--https", type=int, default=28443)
    parser.add_argument("--http", type=int, default=28080)
    args = parser.parse_args()
    extra = dict(item.split("=", 1) for item in args.env)

    with tempfile.TemporaryDirectory(prefix="gpugate-idle-") as tmp:
        tmp_path = Path(tmp)
        labels: list[Run] = []
        if args.baseline:
            labels.append(Run(f"baseline@{args.baseline}", export_tree(args.baseline, tmp_path / "baseline-tree")))
        labels.append(Run(args.label, REPO, extra))
        for variant in args.variant:
            label, _, assignments = variant.partition(":")
            pairs = dict(a.split("=", 1) for a in assignments.split(",") if a)
            env = {k: v for k, v in pairs.items() if ":" not in k}
            stack = {k: v for k, v in pairs.items() if ":" in k}
            labels.append(Run(label, REPO, {**extra, **env}, stack))
        runs = []
        for cycle in range(args.cycles):
            for template in labels:
                run = Run(template.label, template.tree, template.env, template.stack)
                one_run(run, tmp_path / f"run{cycle}-{len(runs)}", args)
                runs.append(run)
        report(runs)


if __name__ == "__main__":
    main()

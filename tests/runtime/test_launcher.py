"""The vLLM launcher builds the command line vLLM 0.32 expects, keeps the key off it, and refuses misfits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from gpugate_runtime import launcher
from gpugate_runtime.cli.launch import app
from gpugate_runtime.launcher import (
    CONTAINER_CACHE,
    VLLM_PYTHON_ENV,
    LaunchError,
    build_argv,
    build_env,
    check_args,
    cpu_threads,
    end_leftovers,
    vllm_interpreter,
)
from gpugate_runtime.launchspec import LaunchSpec, VllmVenv
from typer.testing import CliRunner

KEY = "sk-internal-do-not-leak-7f3a"
VLLM_PYTHON = Path("/opt/vllm/bin/python")
SMOLLM2_CONFIG = {
    "hidden_size": 576,
    "num_attention_heads": 9,
    "num_hidden_layers": 30,
    "num_key_value_heads": 3,
    "max_position_embeddings": 8192,
    "dtype": "bfloat16",
}


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "vllm_api_key"
    path.write_text(KEY + "\n")
    return path


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    path = tmp_path / "model"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(SMOLLM2_CONFIG))
    return path


def cpu_spec(key_file: Path, model: str = "/models/smollm2", **changes: Any) -> LaunchSpec:
    fields: dict[str, Any] = {
        "model": model,
        "served_model_name": "smollm2",
        "max_model_len": 2048,
        "device": "cpu",
        "enforce_eager": True,
        "cpu_kv_cache_gib": 1,
        "port": 18000,
        "api_key_file": key_file,
    }
    return LaunchSpec(**{**fields, **changes})


def gpu_spec(key_file: Path, **changes: Any) -> LaunchSpec:
    fields: dict[str, Any] = {
        "model": "Qwen/Qwen2.5-7B-Instruct",
        "revision": "a09a35458c702b33eeacc393d103063234e8bc28",
        "served_model_name": "qwen-7b",
        "max_model_len": 8192,
        "dtype": "bfloat16",
        "quantization": "awq",
        "device": "cuda",
        "gpu_type": "L4",
        "gpu_count": 2,
        "gpu_memory_gib": 24,
        "gpu_memory_utilization": 0.85,
        "tensor_parallel_size": 2,
        "port": 18000,
        "api_key_file": key_file,
    }
    return LaunchSpec(**{**fields, **changes})


def flag_value(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def write_spec(path: Path, spec: LaunchSpec) -> Path:
    path.write_text(spec.model_dump_json())
    return path


def test_vllm_runs_as_the_api_server_module_not_the_console_script(key_file: Path) -> None:
    argv = build_argv(cpu_spec(key_file), VLLM_PYTHON, env={"VLLM_ENABLE_V1_MULTIPROCESSING": "1"})

    assert argv[:3] == [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server"]


def test_cpu_build_runs_the_same_module_with_the_engine_core_forked_not_spawned(key_file: Path) -> None:
    # given the CPU build with the model in the engine core (build_env's default)
    spec = cpu_spec(key_file)
    env = build_env(spec, base={})
    # when the launcher builds the command
    argv = build_argv(spec, VLLM_PYTHON, env)
    # then a -c script runs the API server module as `-m` would, after making vLLM fork its engine core,
    # and vLLM's own arguments follow unchanged
    assert argv[:2] == [str(VLLM_PYTHON), "-c"]
    script = argv[2]
    assert 'runpy.run_module("vllm.entrypoints.openai.api_server", run_name="__main__", alter_sys=True)' in script
    assert 'os.environ["VLLM_WORKER_MULTIPROC_METHOD"] = "fork"' in script
    assert argv[3:] == build_argv(spec, VLLM_PYTHON, {"VLLM_ENABLE_V1_MULTIPROCESSING": "1"})[3:]
    # and an operator's VLLM_ENABLE_V1_MULTIPROCESSING=1 (CPU workers in processes of their own) or tensor
    # parallelism keep vLLM's spawned processes
    assert build_argv(spec, VLLM_PYTHON, {**env, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"})[1] == "-m"
    assert build_argv(spec.model_copy(update={"tensor_parallel_size": 2}), VLLM_PYTHON, env)[1] == "-m"


def test_cpu_argv_carries_the_spec_and_no_gpu_or_quantization_flags(key_file: Path) -> None:
    argv = build_argv(cpu_spec(key_file), VLLM_PYTHON)

    assert flag_value(argv, "--model") == "/models/smollm2"
    assert flag_value(argv, "--served-model-name") == "smollm2"
    assert flag_value(argv, "--max-model-len") == "2048"
    assert flag_value(argv, "--host") == "127.0.0.1"
    assert flag_value(argv, "--port") == "18000"
    assert "--enforce-eager" in argv
    assert "--quantization" not in argv
    assert "--gpu-memory-utilization" not in argv
    assert "--revision" not in argv


def test_gpu_argv_pins_revision_and_sets_parallelism_memory_and_quantization(key_file: Path) -> None:
    argv = build_argv(gpu_spec(key_file), VLLM_PYTHON)

    assert flag_value(argv, "--revision") == "a09a35458c702b33eeacc393d103063234e8bc28"
    assert flag_value(argv, "--tensor-parallel-size") == "2"
    assert flag_value(argv, "--gpu-memory-utilization") == "0.85"
    assert flag_value(argv, "--quantization") == "awq"
    assert flag_value(argv, "--dtype") == "bfloat16"
    assert "--enforce-eager" not in argv


def test_request_and_access_logging_are_switched_off(key_file: Path) -> None:
    argv = build_argv(cpu_spec(key_file), VLLM_PYTHON)

    assert "--no-enable-log-requests" in argv
    assert "--disable-uvicorn-access-log" in argv


def test_api_key_reaches_vllm_by_environment_and_never_by_argv(key_file: Path) -> None:
    spec = cpu_spec(key_file)

    argv = build_argv(spec, VLLM_PYTHON)
    env = build_env(spec, base={})

    assert env["VLLM_API_KEY"] == KEY
    assert not any(KEY in arg for arg in argv)
    assert "--api-key" not in argv


def test_cpu_environment_sizes_the_kv_cache_and_stays_offline(key_file: Path) -> None:
    env = build_env(cpu_spec(key_file, cpu_kv_cache_gib=3), base={"PATH": "/usr/bin"})

    assert env["VLLM_CPU_KVCACHE_SPACE"] == "3"
    assert env["HF_HUB_OFFLINE"] == "1"
    assert env["PATH"] == "/usr/bin"


def test_cpu_model_runs_in_the_engine_process_on_all_physical_cores_but_one(key_file: Path, tmp_path: Path) -> None:
    env = build_env(cpu_spec(key_file), base={})

    # No separate worker process: its 1 s busy-wait after every step is gone (bench/idle_cpu.py).
    assert env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert env["OMP_NUM_THREADS"] == str(cpu_threads())
    # 4 logical CPUs on 2 cores (SMT): one core for the model, one kept for the API server.
    topology = {0: ("0", "0"), 1: ("0", "1"), 2: ("0", "0"), 3: ("0", "1")}
    for cpu, (package, core) in topology.items():
        (tmp_path / f"cpu{cpu}" / "topology").mkdir(parents=True)
        (tmp_path / f"cpu{cpu}" / "topology" / "physical_package_id").write_text(package + "\n")
        (tmp_path / f"cpu{cpu}" / "topology" / "core_id").write_text(core + "\n")
    assert cpu_threads(set(topology), tmp_path) == 1
    assert cpu_threads({0}, tmp_path) == 1  # never 0
    assert cpu_threads({0, 1, 2, 3, 4, 5}, tmp_path) == 3  # cpu4, cpu5 without topology count as cores


def test_an_operators_own_cpu_settings_win(key_file: Path) -> None:
    env = build_env(cpu_spec(key_file), base={"VLLM_ENABLE_V1_MULTIPROCESSING": "1", "OMP_NUM_THREADS": "7"})

    assert (env["VLLM_ENABLE_V1_MULTIPROCESSING"], env["OMP_NUM_THREADS"]) == ("1", "7")


def test_gpu_environment_leaves_vllm_multiprocessing_and_openmp_alone(key_file: Path) -> None:
    env = build_env(gpu_spec(key_file), base={})

    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in env and "OMP_NUM_THREADS" not in env


def test_missing_key_file_is_a_launch_error_naming_the_file(tmp_path: Path) -> None:
    spec = cpu_spec(tmp_path / "absent")

    with pytest.raises(LaunchError, match="absent"):
        build_env(spec, base={})


def test_dry_run_prints_the_command_and_capacity_without_the_key(
    tmp_path: Path, key_file: Path, model_dir: Path
) -> None:
    spec = write_spec(tmp_path / "launch.json", cpu_spec(key_file, model=str(model_dir)))

    result = CliRunner().invoke(
        app, ["run", "--spec", str(spec), "--python", str(VLLM_PYTHON), "--dry-run", "--no-check"]
    )

    assert result.exit_code == 0, result.output
    assert "vllm.entrypoints.openai.api_server" in result.output
    assert '"kv_tokens": 46592' in result.output
    assert KEY not in result.output


def test_spec_that_does_not_fit_exits_2_before_starting_vllm(
    tmp_path: Path, key_file: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def must_not_exec(*args: object) -> None:
        raise AssertionError("vLLM was started")

    monkeypatch.setattr(launcher.os, "execve", must_not_exec)
    spec = write_spec(
        tmp_path / "launch.json", cpu_spec(key_file, model=str(model_dir), max_model_len=8192, cpu_kv_cache_gib=1)
    )
    (model_dir / "config.json").write_text(json.dumps({**SMOLLM2_CONFIG, "num_hidden_layers": 300}))

    result = CliRunner().invoke(app, ["run", "--spec", str(spec), "--python", str(VLLM_PYTHON), "--no-check"])

    assert result.exit_code == 2
    assert "does not fit" in result.output
    assert "4,608 tokens" in result.output
    assert "raise cpu_kv_cache_gib to >= 2" in result.output


def test_invalid_spec_exits_2_naming_the_file(tmp_path: Path) -> None:
    spec = tmp_path / "launch.json"
    spec.write_text(json.dumps({"model": "m", "surprise": 1}))

    result = CliRunner().invoke(app, ["run", "--spec", str(spec), "--dry-run", "--no-check"])

    assert result.exit_code == 2
    assert "launch.json is not a valid launch spec" in result.output


@pytest.mark.e2e
@pytest.mark.parametrize("spec_kind", ["cpu", "gpu"])
def test_real_vllm_parser_accepts_the_argv_we_build(spec_kind: str, key_file: Path, vllm_python: Path) -> None:
    spec = cpu_spec(key_file) if spec_kind == "cpu" else gpu_spec(key_file)

    check_args(build_argv(spec, vllm_python), vllm_python)  # raises on any flag vLLM does not know


@pytest.mark.e2e
def test_real_vllm_parser_rejects_an_unknown_flag_and_names_it(key_file: Path, vllm_python: Path) -> None:
    argv = [*build_argv(cpu_spec(key_file), vllm_python), "--disable-log-requests"]

    with pytest.raises(LaunchError, match="--disable-log-requests"):
        check_args(argv, vllm_python)


IMAGE = "vllm/vllm-openai@sha256:" + "ab" * 32


def test_gpu_host_runs_the_pinned_image_with_the_key_passed_by_name_only(key_file: Path) -> None:
    # given a GPU launch spec with a pinned image and a model cache on the host
    spec = gpu_spec(key_file, image=IMAGE, model_cache_dir=Path("/var/lib/gpugate/hf"))
    env = build_env(spec, base={})
    # when the launcher builds the command
    argv = build_argv(spec, VLLM_PYTHON)
    # then docker runs exactly that digest with all GPUs, the same vLLM flags, and no key on argv
    assert argv[1:3] == ["run", "--rm"] and IMAGE in argv
    assert argv[argv.index("--gpus") + 1] == "all"
    assert "-e" in argv and "VLLM_API_KEY" in argv and env["VLLM_API_KEY"] not in " ".join(argv)
    assert f"/var/lib/gpugate/hf:{CONTAINER_CACHE}" in argv
    vllm_part = argv[argv.index(IMAGE) + 1 :]
    assert flag_value(vllm_part, "--host") == "127.0.0.1"
    assert flag_value(vllm_part, "--revision") == "a09a35458c702b33eeacc393d103063234e8bc28"


def test_gpu_host_without_an_image_runs_vllm_from_its_venv_like_the_cpu_build(key_file: Path) -> None:
    # given a GPU launch spec whose venv was built from cuda.lock
    spec = gpu_spec(key_file, venv=VllmVenv(path=Path("/opt/gpugate/vllm"), lock=Path("vllm/cuda.lock")))
    # when the launcher picks the interpreter and builds the command
    argv = build_argv(spec, vllm_interpreter(spec, environ={}))
    # then the venv's python runs vLLM's API server module, with no container in between
    assert argv[:3] == ["/opt/gpugate/vllm/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    assert "docker" not in " ".join(argv)
    assert flag_value(argv, "--host") == "127.0.0.1"


def test_the_interpreter_is_the_flag_then_the_environment_then_the_spec_venv(key_file: Path) -> None:
    spec = cpu_spec(key_file, venv=VllmVenv(path=Path("/srv/vllm"), lock=Path("/srv/cpu.lock")))
    env = {VLLM_PYTHON_ENV: "/from/env/python"}

    assert vllm_interpreter(spec, Path("/flag/python"), env) == Path("/flag/python")
    assert vllm_interpreter(spec, None, env) == Path("/from/env/python")
    assert vllm_interpreter(spec, None, {}) == Path("/srv/vllm/bin/python")
    assert vllm_interpreter(cpu_spec(key_file), None, {}) == Path(sys.executable)


def test_a_start_after_a_crash_ends_the_processes_the_crashed_server_left(tmp_path: Path) -> None:
    # given a "crashed server": its process group outlives it in a child (like vLLM's EngineCore)
    leader = subprocess.Popen(["sh", "-c", "sleep 120 & echo $!; exit 0"], start_new_session=True, stdout=subprocess.PIPE, text=True)
    orphan = int(leader.stdout.readline())
    leader.wait(timeout=10)
    pgid_file = tmp_path / "vllm.pgid"
    pgid_file.write_text(f"{leader.pid}\n")
    assert Path(f"/proc/{orphan}").exists()
    # when the launcher starts again
    ended = end_leftovers(pgid_file)
    # then the leftover is gone and the file names the new group
    assert orphan in ended
    assert not Path(f"/proc/{orphan}").exists() or "Z" in Path(f"/proc/{orphan}/stat").read_text().rsplit(") ", 1)[1][:1]
    assert int(pgid_file.read_text()) == os.getpgrp()


def test_a_first_start_only_records_its_process_group(tmp_path: Path) -> None:
    pgid_file = tmp_path / "state" / "vllm.pgid"
    assert end_leftovers(pgid_file) == []
    assert int(pgid_file.read_text()) == os.getpgrp()

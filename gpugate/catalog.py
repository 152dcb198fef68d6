"""Facts about the GPUs and models gpugate knows: memory, architecture, limits.

The spec validates against these, the planner sizes KV caches from them, and the
Pulumi programs map GPU types to instance types with them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GpuFacts:
    memory_gib: float
    aws_instance_types: dict[int, str]  # GPU count -> instance type
    gcp_machine_types: dict[int, str]  # GPU count -> machine type
    gcp_accelerator: str | None  # accelerator type for machine types that need one attached


GPUS: dict[str, GpuFacts] = {
    "L4": GpuFacts(
        memory_gib=24,
        aws_instance_types={1: "g6.xlarge", 4: "g6.12xlarge", 8: "g6.48xlarge"},
        gcp_machine_types={1: "g2-standard-8", 2: "g2-standard-24", 4: "g2-standard-48", 8: "g2-standard-96"},
        gcp_accelerator="nvidia-l4",
    ),
    "A10G": GpuFacts(
        memory_gib=24,
        aws_instance_types={1: "g5.xlarge", 4: "g5.12xlarge", 8: "g5.48xlarge"},
        gcp_machine_types={},
        gcp_accelerator=None,
    ),
    "A100-80GB": GpuFacts(
        memory_gib=80,
        aws_instance_types={8: "p4de.24xlarge"},
        gcp_machine_types={1: "a2-ultragpu-1g", 2: "a2-ultragpu-2g", 4: "a2-ultragpu-4g", 8: "a2-ultragpu-8g"},
        gcp_accelerator="nvidia-a100-80gb",
    ),
    "H100-80GB": GpuFacts(
        memory_gib=80,
        aws_instance_types={8: "p5.48xlarge"},
        gcp_machine_types={1: "a3-highgpu-1g", 2: "a3-highgpu-2g", 4: "a3-highgpu-4g", 8: "a3-highgpu-8g"},
        gcp_accelerator="nvidia-h100-80gb",
    ),
}


@dataclass(frozen=True)
class ModelFacts:
    """Architecture of a model, as its config.json states it."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    num_params: float  # parameters, for weight memory


MODELS: dict[str, ModelFacts] = {
    "HuggingFaceTB/SmolLM2-135M-Instruct": ModelFacts(30, 3, 64, 8192, 134.5e6),
    "Qwen/Qwen2.5-7B-Instruct": ModelFacts(28, 4, 128, 32768, 7.62e9),
    "Qwen/Qwen2.5-14B-Instruct": ModelFacts(48, 8, 128, 32768, 14.8e9),
    "meta-llama/Llama-3.1-8B-Instruct": ModelFacts(32, 8, 128, 131072, 8.03e9),
    "meta-llama/Llama-3.1-70B-Instruct": ModelFacts(80, 8, 128, 131072, 70.6e9),
    "mistralai/Mistral-7B-Instruct-v0.3": ModelFacts(32, 8, 128, 32768, 7.25e9),
}

# Bytes per parameter (weights) and per KV element, by dtype/quantization.
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "auto": 2}
QUANT_WEIGHT_BYTES = {"none": None, "fp8": 1.0, "awq": 0.5, "gptq": 0.5, "bitsandbytes": 0.5}

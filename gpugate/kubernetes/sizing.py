"""Sizes derived from the spec: the model's weights, memory, disks, start-up budget, node pool bounds."""

from __future__ import annotations

import math

from gpugate.catalog import DTYPE_BYTES, MODELS, QUANT_WEIGHT_BYTES
from gpugate.kubernetes.objects import (
    DOWNLOAD_SECONDS_PER_GIB,
    GIB,
    PROBE_PERIOD_SECONDS,
    STARTUP_BASE_SECONDS,
)
from gpugate.spec import GatewaySpec, KubernetesSpec


def weight_gib(spec: GatewaySpec) -> float:
    facts = MODELS[spec.model.id]
    per_param = QUANT_WEIGHT_BYTES.get(spec.model.quantization) or DTYPE_BYTES.get(spec.model.dtype, 2)
    return facts.num_params * per_param / GIB


def model_cache_gib(spec: GatewaySpec) -> int:
    """The model cache volume: the weights as downloaded, plus room for the tokenizer and a partial re-download."""
    return math.ceil(weight_gib(spec) * 1.2) + 5


def gpu_node_disk_gib(spec: GatewaySpec) -> int:
    """Boot disk of a GPU node: the image layers (vLLM's is ~10 GiB compressed) and the model cache."""
    return max(100, model_cache_gib(spec) + 80)


def startup_budget_seconds(spec: GatewaySpec) -> int:
    """How long a vLLM pod may take to answer /health after it starts: download, load, warm-up."""
    budget = STARTUP_BASE_SECONDS + DOWNLOAD_SECONDS_PER_GIB * math.ceil(weight_gib(spec))
    return min(3600, math.ceil(budget / PROBE_PERIOD_SECONDS) * PROBE_PERIOD_SECONDS)


def shm_gib(spec: GatewaySpec) -> int:
    """/dev/shm for vLLM: PyTorch's data path, and NCCL between tensor-parallel ranks."""
    return 2 if spec.tensor_parallel_size == 1 else 4 * spec.tensor_parallel_size


def vllm_memory_gib(spec: GatewaySpec) -> int:
    """Host memory vLLM needs: the weights pass through it on load, plus Python, CUDA and /dev/shm."""
    return math.ceil(weight_gib(spec)) + 6 + shm_gib(spec)


def gpu_node_max(kube: KubernetesSpec) -> int:
    """The GPU pool's ceiling: one node per replica at most, plus one for a rolling update's surge pod."""
    return kube.replicas.max + 1


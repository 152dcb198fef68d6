"""Does the model fit, and how far does a stack scale: the KV-cache plan, a roofline throughput estimate, fleet sizes."""

from __future__ import annotations

import math

from gpugate_runtime.capacity import CapacityReport, CpuBudget, GpuBudget, ModelArch, plan_capacity
from gpugate_runtime.contract.host import VM_LAYOUT, Ports
from pydantic import BaseModel, ConfigDict, Field

from gpugate.catalog import DTYPE_BYTES, MODELS, QUANT_WEIGHT_BYTES
from gpugate.kubernetes.sizing import gpu_node_max
from gpugate.render.launch import launch_spec
from gpugate.spec import GatewaySpec


class Workload(BaseModel):
    """The request the fleet is sized for: one client holds one stream of this shape."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt_tokens: int = 1000
    completion_tokens: int = 250

    @property
    def context_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class ReplicaThroughput(BaseModel):
    """What one vLLM replica serves of a workload, from a memory-bandwidth roofline (see docs/scaling.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    workload: Workload
    streams: int = Field(description="concurrent streams: max_num_seqs, or fewer when the KV cache runs out first")
    step_seconds: float = Field(description="one decode step for all streams: weights plus their KV cache read once")
    tokens_per_second_per_stream: float
    decode_tokens_per_second: float
    prefill_seconds: float = Field(description="one prompt's prefill, compute-bound")
    requests_per_second: float


class ScalingReport(BaseModel):
    """How far one Kubernetes stack scales: per vLLM replica (from the KV-cache plan), and at the
    autoscaler's bounds."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    replicas_min: int
    replicas_max: int
    gpu_nodes_max: int
    kv_tokens_per_replica: int
    max_num_seqs: int = Field(description="sequences one replica batches at once at most (vLLM --max-num-seqs)")
    full_length_sequences_per_replica: float = Field(description="max_model_len requests one replica's KV cache holds")
    tokens_per_sequence_at_max_num_seqs: int = Field(description="KV tokens each sequence may hold when max_num_seqs run")
    queue_target_per_replica: int
    throughput: ReplicaThroughput = Field(description="a roofline estimate for the planning workload, not a measurement")
    kv_tokens_at_min: int
    kv_tokens_at_max: int
    sequences_at_min: int
    sequences_at_max: int


def capacity(spec: GatewaySpec) -> CapacityReport:
    """Does the model fit: vLLM's KV cache for the spec's model, sized from the launch spec the
    bundle gives the host (GPU memory, utilization, tensor parallelism, or the CPU KV budget)."""
    launch = launch_spec(spec, Ports(spec.ports.internal_base), VM_LAYOUT)
    facts = MODELS[spec.model.id]
    arch = ModelArch(
        num_layers=facts.num_layers,
        num_kv_heads=facts.num_kv_heads,
        head_dim=facts.head_dim,
        max_position_embeddings=facts.max_position_embeddings,
    )
    dtype_bytes = DTYPE_BYTES.get(launch.dtype, 2)
    per_param = QUANT_WEIGHT_BYTES.get(launch.quantization) or dtype_bytes
    budget: CpuBudget | GpuBudget
    if launch.device == "cpu":
        budget = CpuBudget(kv_cache_gib=launch.cpu_kv_cache_gib)
    else:
        budget = GpuBudget(
            gpu_memory_gib=launch.gpu_memory_gib,
            gpu_count=launch.gpu_count,
            gpu_memory_utilization=launch.gpu_memory_utilization,
        )
    return plan_capacity(
        arch,
        budget,
        max_model_len=launch.max_model_len,
        max_num_seqs=launch.max_num_seqs,
        kv_dtype_bytes=dtype_bytes,
        weight_bytes=int(facts.num_params * per_param),
        tensor_parallel_size=launch.tensor_parallel_size,
    )


# Datasheet figures per GPU: memory bandwidth (GB/s) and dense bf16 tensor throughput (TFLOPS).
# Sources: NVIDIA L4, A10G (AWS g5), A100 80GB SXM, H100 SXM datasheets.
GPU_BANDWIDTH_GBPS = {"L4": 300, "A10G": 600, "A100-80GB": 2039, "H100-80GB": 3350}


GPU_BF16_TFLOPS = {"L4": 121, "A10G": 125, "A100-80GB": 312, "H100-80GB": 989}


# Shares of those peaks vLLM reaches in practice on decode (bandwidth) and prefill (compute): planning
# assumptions, to be replaced by a measurement on the target GPU (bench/) when one is available.
BANDWIDTH_EFFICIENCY = 0.6


COMPUTE_EFFICIENCY = 0.5


PLANNING_WORKLOAD = Workload()


def replica_throughput(spec: GatewaySpec, fit: CapacityReport, workload: Workload = PLANNING_WORKLOAD) -> ReplicaThroughput:
    """One replica's streams and requests per second for `workload`.

    Decode is memory-bound: each step reads the weights and every stream's KV cache once, spread
    over tensor_parallel_size GPUs; prefill is compute-bound (2 FLOPs per parameter per prompt
    token); the GPU time prefill takes is time decode does not get.
    """
    facts = MODELS[spec.model.id]
    tp = fit.tensor_parallel_size
    blocks_per_stream = math.ceil(workload.context_tokens / fit.block_size)
    streams = max(0, min(fit.max_num_seqs, fit.kv_blocks // blocks_per_stream))
    weights_per_gpu = fit.weight_bytes_per_gpu or 0
    mean_context = workload.prompt_tokens + workload.completion_tokens / 2
    kv_read = streams * mean_context * fit.kv_bytes_per_token
    bandwidth = GPU_BANDWIDTH_GBPS[spec.gpu.type] * 1e9 * BANDWIDTH_EFFICIENCY
    step = (weights_per_gpu + kv_read) / bandwidth
    compute = GPU_BF16_TFLOPS[spec.gpu.type] * 1e12 * COMPUTE_EFFICIENCY * tp
    prefill = 2 * facts.num_params * workload.prompt_tokens / compute
    decode_only = streams / (step * workload.completion_tokens) if streams else 0.0
    requests = decode_only / (1 + prefill * decode_only)
    return ReplicaThroughput(
        workload=workload,
        streams=streams,
        step_seconds=round(step, 4),
        tokens_per_second_per_stream=round(1 / step, 1),
        decode_tokens_per_second=round(requests * workload.completion_tokens, 1),
        prefill_seconds=round(prefill, 3),
        requests_per_second=round(requests, 2),
    )


def scaling(spec: GatewaySpec, fit: CapacityReport) -> ScalingReport | None:
    """Per-replica capacity from the KV-cache plan, and the totals at the autoscaler's bounds."""
    kube = spec.kubernetes
    if kube is None:
        return None
    low, high = kube.replicas.min, kube.replicas.max
    return ScalingReport(
        replicas_min=low,
        replicas_max=high,
        gpu_nodes_max=gpu_node_max(kube),
        kv_tokens_per_replica=fit.kv_tokens,
        max_num_seqs=fit.max_num_seqs,
        full_length_sequences_per_replica=round(fit.max_concurrency, 2),
        tokens_per_sequence_at_max_num_seqs=fit.kv_tokens // fit.max_num_seqs,
        queue_target_per_replica=kube.autoscaling.waiting_per_replica,
        throughput=replica_throughput(spec, fit),
        kv_tokens_at_min=fit.kv_tokens * low,
        kv_tokens_at_max=fit.kv_tokens * high,
        sequences_at_min=fit.max_num_seqs * low,
        sequences_at_max=fit.max_num_seqs * high,
    )

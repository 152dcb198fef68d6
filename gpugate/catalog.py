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
    # No accelerator: vLLM's CPU build on a general-purpose VM (smoke and test environments, small models).
    # 4 vCPUs with AVX-512 and 8-16 GiB: SmolLM2-135M with a 1 GiB KV cache uses under 2 GiB.
    "cpu": GpuFacts(
        memory_gib=0,
        aws_instance_types={0: "c7i.xlarge"},
        gcp_machine_types={0: "n2-standard-4"},
        gcp_accelerator=None,
    ),
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


def machine(cloud: str, gpu_type: str, count: int) -> str:
    """The catalog's machine for gpu_type x count on "aws" or "gcp" (the spec refuses others; this is the backstop)."""
    facts = GPUS[gpu_type]
    table = facts.aws_instance_types if cloud == "aws" else facts.gcp_machine_types
    if count not in table:
        allowed = ", ".join(f"{n} ({t})" for n, t in sorted(table.items())) or "none"
        raise ValueError(f"{cloud.upper()} has no machine with {count} x {gpu_type}; allowed gpu.count: {allowed}")
    return table[count]


@dataclass(frozen=True)
class MachineFacts:
    """One machine type's shape, as the cloud lists it: what a node of it offers before the kubelet's reservations."""

    cloud: str  # "aws" or "gcp"
    vcpus: int
    memory_gib: float
    gpu: str  # a GPUS key ("cpu" for none)
    gpus: int
    max_pods: int = 110  # EKS: the VPC CNI's ENI limit (amazon-eks-ami's eni-max-pods.txt); GKE: its default per node


# Shapes of the machines above and of their larger siblings with the same GPUs (the clouds' instance
# and machine type pages, 2026-11): a GPU node pool whose pods outgrow the default machine names the
# ones that hold them. System pools' machines too: their pods are checked the same way.
MACHINES: dict[str, MachineFacts] = {
    "c7i.xlarge": MachineFacts("aws", 4, 8, "cpu", 0, 58),
    "m6i.large": MachineFacts("aws", 2, 8, "cpu", 0, 29),
    "m6i.xlarge": MachineFacts("aws", 4, 16, "cpu", 0, 58),
    "g6.xlarge": MachineFacts("aws", 4, 16, "L4", 1, 58),
    "g6.2xlarge": MachineFacts("aws", 8, 32, "L4", 1, 58),
    "g6.4xlarge": MachineFacts("aws", 16, 64, "L4", 1, 234),
    "g6.8xlarge": MachineFacts("aws", 32, 128, "L4", 1, 234),
    "g6.16xlarge": MachineFacts("aws", 64, 256, "L4", 1, 737),
    "g6.12xlarge": MachineFacts("aws", 48, 192, "L4", 4, 234),
    "g6.24xlarge": MachineFacts("aws", 96, 384, "L4", 4, 737),
    "g6.48xlarge": MachineFacts("aws", 192, 768, "L4", 8, 737),
    "g5.xlarge": MachineFacts("aws", 4, 16, "A10G", 1, 58),
    "g5.2xlarge": MachineFacts("aws", 8, 32, "A10G", 1, 58),
    "g5.4xlarge": MachineFacts("aws", 16, 64, "A10G", 1, 234),
    "g5.8xlarge": MachineFacts("aws", 32, 128, "A10G", 1, 234),
    "g5.12xlarge": MachineFacts("aws", 48, 192, "A10G", 4, 737),
    "g5.24xlarge": MachineFacts("aws", 96, 384, "A10G", 4, 737),
    "g5.48xlarge": MachineFacts("aws", 192, 768, "A10G", 8, 345),
    "p4de.24xlarge": MachineFacts("aws", 96, 1152, "A100-80GB", 8, 737),
    "p5.48xlarge": MachineFacts("aws", 192, 2048, "H100-80GB", 8, 100),
    "n2-standard-4": MachineFacts("gcp", 4, 16, "cpu", 0),
    "e2-standard-4": MachineFacts("gcp", 4, 16, "cpu", 0),
    "g2-standard-4": MachineFacts("gcp", 4, 16, "L4", 1),
    "g2-standard-8": MachineFacts("gcp", 8, 32, "L4", 1),
    "g2-standard-12": MachineFacts("gcp", 12, 48, "L4", 1),
    "g2-standard-16": MachineFacts("gcp", 16, 64, "L4", 1),
    "g2-standard-32": MachineFacts("gcp", 32, 128, "L4", 1),
    "g2-standard-24": MachineFacts("gcp", 24, 96, "L4", 2),
    "g2-standard-48": MachineFacts("gcp", 48, 192, "L4", 4),
    "g2-standard-96": MachineFacts("gcp", 96, 384, "L4", 8),
    "a2-ultragpu-1g": MachineFacts("gcp", 12, 170, "A100-80GB", 1),
    "a2-ultragpu-2g": MachineFacts("gcp", 24, 340, "A100-80GB", 2),
    "a2-ultragpu-4g": MachineFacts("gcp", 48, 680, "A100-80GB", 4),
    "a2-ultragpu-8g": MachineFacts("gcp", 96, 1360, "A100-80GB", 8),
    "a3-highgpu-1g": MachineFacts("gcp", 26, 234, "H100-80GB", 1),
    "a3-highgpu-2g": MachineFacts("gcp", 52, 468, "H100-80GB", 2),
    "a3-highgpu-4g": MachineFacts("gcp", 104, 936, "H100-80GB", 4),
    "a3-highgpu-8g": MachineFacts("gcp", 208, 1872, "H100-80GB", 8),
}


def same_gpus(cloud: str, gpu_type: str, count: int) -> list[str]:
    """The machines of `cloud` with `count` x `gpu_type`, smallest first."""
    found = [name for name, m in MACHINES.items() if m.cloud == cloud and m.gpu == gpu_type and m.gpus == count]
    return sorted(found, key=lambda name: (MACHINES[name].vcpus, MACHINES[name].memory_gib))


@dataclass(frozen=True)
class ModelFacts:
    """Architecture of a model, as its config.json states it."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    num_params: float  # parameters, for weight memory
    gated: bool = False  # the Hugging Face repository asks for accepted terms: downloads need a token (`hf_token`)


MODELS: dict[str, ModelFacts] = {
    "HuggingFaceTB/SmolLM2-135M-Instruct": ModelFacts(30, 3, 64, 8192, 134.5e6),
    "Qwen/Qwen2.5-7B-Instruct": ModelFacts(28, 4, 128, 32768, 7.62e9),
    "Qwen/Qwen2.5-14B-Instruct": ModelFacts(48, 8, 128, 32768, 14.8e9),
    "meta-llama/Llama-3.1-8B-Instruct": ModelFacts(32, 8, 128, 131072, 8.03e9, gated=True),
    "meta-llama/Llama-3.1-70B-Instruct": ModelFacts(80, 8, 128, 131072, 70.6e9, gated=True),
    "mistralai/Mistral-7B-Instruct-v0.3": ModelFacts(32, 8, 128, 32768, 7.25e9, gated=True),
}

# Bytes per parameter (weights) and per KV element, by dtype/quantization.
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "auto": 2}
QUANT_WEIGHT_BYTES = {"none": None, "fp8": 1.0, "awq": 0.5, "gptq": 0.5, "bitsandbytes": 0.5}


# Where each machine type is offered: AWS regions (the program picks a zone of the region with
# ec2:DescribeInstanceTypeOfferings at `pulumi up`), GCP zones. Taken from the clouds' GPU and machine
# family pages as of 2026-11; a region or zone missing here is refused by the spec with the ones that
# are listed, so a new offering is one line here.
_GCP_L4_ZONES = (
    "asia-east1-a", "asia-east1-c", "asia-northeast1-a", "asia-northeast1-c", "asia-south1-a", "asia-south1-b",
    "asia-southeast1-a", "asia-southeast1-b", "asia-southeast1-c", "europe-west1-b", "europe-west1-c",
    "europe-west2-a", "europe-west2-b", "europe-west3-a", "europe-west3-b", "europe-west4-a", "europe-west4-b",
    "europe-west4-c", "us-central1-a", "us-central1-b", "us-central1-c", "us-east1-b", "us-east1-c", "us-east1-d",
    "us-east4-a", "us-east4-c", "us-west1-a", "us-west1-b", "us-west1-c", "us-west4-a", "us-west4-c",
)  # fmt: skip
_GCP_A100_80_ZONES = ("asia-southeast1-c", "europe-west4-a", "us-central1-a", "us-central1-c", "us-east4-c", "us-east5-b")
_GCP_H100_ZONES = ("asia-southeast1-b", "europe-west4-b", "us-central1-a", "us-central1-c", "us-east4-a", "us-east5-a", "us-west1-a")
# Every zone of the regions above (the general-purpose families are offered in all of them).
GCP_ZONES: dict[str, tuple[str, ...]] = {
    "asia-east1": ("asia-east1-a", "asia-east1-b", "asia-east1-c"),
    "asia-northeast1": ("asia-northeast1-a", "asia-northeast1-b", "asia-northeast1-c"),
    "asia-south1": ("asia-south1-a", "asia-south1-b", "asia-south1-c"),
    "asia-southeast1": ("asia-southeast1-a", "asia-southeast1-b", "asia-southeast1-c"),
    "europe-west1": ("europe-west1-b", "europe-west1-c", "europe-west1-d"),
    "europe-west2": ("europe-west2-a", "europe-west2-b", "europe-west2-c"),
    "europe-west3": ("europe-west3-a", "europe-west3-b", "europe-west3-c"),
    "europe-west4": ("europe-west4-a", "europe-west4-b", "europe-west4-c"),
    "us-central1": ("us-central1-a", "us-central1-b", "us-central1-c", "us-central1-f"),
    "us-east1": ("us-east1-b", "us-east1-c", "us-east1-d"),
    "us-east4": ("us-east4-a", "us-east4-b", "us-east4-c"),
    "us-east5": ("us-east5-a", "us-east5-b", "us-east5-c"),
    "us-west1": ("us-west1-a", "us-west1-b", "us-west1-c"),
    "us-west4": ("us-west4-a", "us-west4-b", "us-west4-c"),
}
_GCP_ALL_ZONES = tuple(z for zones in GCP_ZONES.values() for z in zones)
GCP_OFFERINGS: dict[str, tuple[str, ...]] = {
    **{t: _GCP_L4_ZONES for t in GPUS["L4"].gcp_machine_types.values()},
    **{t: _GCP_A100_80_ZONES for t in GPUS["A100-80GB"].gcp_machine_types.values()},
    **{t: _GCP_H100_ZONES for t in GPUS["H100-80GB"].gcp_machine_types.values()},
    "n2-standard-4": _GCP_ALL_ZONES,
}
_AWS_G6_REGIONS = ("ap-northeast-1", "ap-south-1", "ca-central-1", "eu-central-1", "eu-west-2", "us-east-1", "us-east-2", "us-west-2")
_AWS_G5_REGIONS = (
    "ap-northeast-1", "ap-northeast-2", "ap-south-1", "ca-central-1", "eu-central-1", "eu-west-1", "eu-west-2",
    "sa-east-1", "us-east-1", "us-east-2", "us-west-2",
)  # fmt: skip
AWS_OFFERINGS: dict[str, tuple[str, ...]] = {
    **{t: _AWS_G6_REGIONS for t in GPUS["L4"].aws_instance_types.values()},
    **{t: _AWS_G5_REGIONS for t in GPUS["A10G"].aws_instance_types.values()},
    "p4de.24xlarge": ("us-east-1", "us-west-2"),
    "p5.48xlarge": ("ap-northeast-1", "eu-north-1", "us-east-1", "us-east-2", "us-west-2"),
    "c7i.xlarge": (
        "ap-northeast-1", "ap-south-1", "ap-southeast-1", "ap-southeast-2", "ca-central-1", "eu-central-1",
        "eu-north-1", "eu-west-1", "eu-west-2", "sa-east-1", "us-east-1", "us-east-2", "us-west-1", "us-west-2",
    ),  # fmt: skip
}

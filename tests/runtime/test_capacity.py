"""KV-cache capacity planning agrees with vLLM's own arithmetic and explains a misfit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from gpugate_runtime.capacity import CpuBudget, GpuBudget, ModelArch, plan_capacity

# SmolLM2-135M-Instruct's config.json, as the local model's conversion writes it (trimmed).
SMOLLM2_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 576,
    "num_attention_heads": 9,
    "num_hidden_layers": 30,
    "num_key_value_heads": 3,
    "max_position_embeddings": 8192,
    "torch_dtype": "bfloat16",
}
SMOLLM2 = ModelArch(num_layers=30, num_kv_heads=3, head_dim=64, max_position_embeddings=8192)
QWEN_14B = ModelArch(num_layers=48, num_kv_heads=8, head_dim=128, max_position_embeddings=32768)
GIB = 1 << 30


def test_smollm2_with_one_gib_predicts_the_46592_tokens_vllm_logs() -> None:
    report = plan_capacity(SMOLLM2, CpuBudget(kv_cache_gib=1), max_model_len=2048, max_num_seqs=8)

    assert report.kv_bytes_per_token == 23_040
    assert report.kv_tokens == 46_592
    assert report.max_concurrency == pytest.approx(22.75)  # vLLM: "Maximum concurrency ... 22.75x"
    assert report.fits


def test_kv_tokens_count_whole_blocks_per_request_like_vllm() -> None:
    # 364 blocks of 128; a 2,000-token request holds 16 blocks, so 22.75 of them fit.
    report = plan_capacity(SMOLLM2, CpuBudget(kv_cache_gib=1), max_model_len=2000)

    assert report.kv_blocks == 364
    assert report.kv_tokens == int(364 / 16 * 2000)


def test_model_dir_gives_arch_and_weight_bytes(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(SMOLLM2_CONFIG))
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 1000)

    arch = ModelArch.from_config_json(tmp_path)

    assert arch.model_dump(exclude={"weight_bytes", "torch_dtype"}) == SMOLLM2.model_dump(
        exclude={"weight_bytes", "torch_dtype"}
    )
    assert arch.weight_bytes == 1000
    assert arch.torch_dtype == "bfloat16"


def test_explicit_head_dim_wins_over_hidden_size_division(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps({**SMOLLM2_CONFIG, "head_dim": 128}))

    assert ModelArch.from_config_json(config).head_dim == 128


def test_cpu_model_too_long_for_its_kv_space_names_the_numbers_and_the_fix() -> None:
    report = plan_capacity(SMOLLM2, CpuBudget(kv_cache_gib=1), max_model_len=65_536)

    assert not report.fits
    assert "46,592 tokens" in report.message
    assert "65,536" in report.message
    assert "lower max_model_len to <= 46,592" in report.message
    assert "raise cpu_kv_cache_gib to >= 2" in report.message
    assert "above the model's limit of 8,192" in report.message


def test_14b_bf16_on_one_24_gib_gpu_does_not_fit_and_says_by_how_much() -> None:
    report = plan_capacity(QWEN_14B, GpuBudget(gpu_memory_gib=24), max_model_len=8192, weight_bytes=int(14.8e9 * 2))

    assert not report.fits
    assert report.kv_tokens == 0
    assert "27.57 GiB per GPU" in report.message
    assert "GiB more per GPU" in report.message


def test_tensor_parallel_splits_weights_and_kv_heads_per_gpu() -> None:
    budget = GpuBudget(gpu_memory_gib=24, gpu_count=4, gpu_memory_utilization=0.9, overhead_gib=1)

    report = plan_capacity(QWEN_14B, budget, max_model_len=32768, weight_bytes=int(14.8e9 * 2), tensor_parallel_size=4)

    per_gpu_kv = int(24 * 0.9 * GIB - int(14.8e9 * 2) / 4 - 1 * GIB)
    per_token = 2 * 48 * (8 // 4) * 128 * 2
    assert report.kv_bytes_per_token == per_token
    assert report.kv_blocks == per_gpu_kv // (16 * per_token)
    assert report.fits


def test_fewer_kv_heads_than_ranks_are_replicated_not_split() -> None:
    arch = ModelArch(num_layers=2, num_kv_heads=2, head_dim=64, max_position_embeddings=4096)

    assert arch.kv_bytes_per_token(2, tensor_parallel_size=8) == arch.kv_bytes_per_token(2, tensor_parallel_size=2)


def test_more_ranks_than_gpus_does_not_fit() -> None:
    report = plan_capacity(
        QWEN_14B, GpuBudget(gpu_memory_gib=80, gpu_count=1), max_model_len=8192,
        weight_bytes=int(14.8e9 * 2), tensor_parallel_size=2,
    )  # fmt: skip

    assert not report.fits
    assert "tensor_parallel_size 2" in report.message


def test_gpu_budget_without_weight_size_is_refused() -> None:
    with pytest.raises(ValueError, match="weight_bytes"):
        plan_capacity(QWEN_14B, GpuBudget(gpu_memory_gib=80), max_model_len=8192)


def test_config_without_attention_shape_is_a_clear_error(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"num_hidden_layers": 2}))

    with pytest.raises(ValueError, match="config.json has no 'num_attention_heads'"):
        ModelArch.from_config_json(config)

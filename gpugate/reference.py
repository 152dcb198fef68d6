"""Generates docs/reference.md from GatewaySpec's fields, so the key reference cannot drift from the code."""

from __future__ import annotations

import enum
import types
import typing
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from gpugate.spec import GatewaySpec

INTRO = """# Stack key reference

Every key of a stack file's `gpugate:` namespace (`stacks/Pulumi.<stack>.yaml`).
Generated from `gpugate/spec.py` by `python -m gpugate.reference > docs/reference.md`;
a test fails when this page and the code disagree. Unknown keys are errors.

Secrets never go in a stack file in plain text. They are Pulumi config secrets,
set with `pulumi config set --secret gpugate:<name> VALUE -s <stack>`:
`gpugate:alert_credential` (Slack webhook URL, PagerDuty routing key, SMTP password or
webhook bearer token), `gpugate:vllm_api_key` (optional: else generated), `gpugate:kubeconfig`
(an existing cluster's kubeconfig), `gpugate:hf_token` (a Hugging Face token: the Kubernetes target
passes it to vLLM as `HF_TOKEN`; required there for a gated model). Each external provider's key is
`gpugate:providers.<name>.api_key`, set with `pulumi config set --secret --path` (docs/routing.md).
"""


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(annotation))
    if origin is typing.Annotated:
        return _type_name(typing.get_args(annotation)[0])
    if origin is list:
        return f"list of {_type_name(typing.get_args(annotation)[0])}"
    if origin is dict:
        return "mapping"
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return " \\| ".join(f"`{m.value}`" for m in annotation)
    name = getattr(annotation, "__name__", str(annotation))
    return {"str": "string", "int": "integer", "float": "number", "bool": "boolean"}.get(name, name)


def _constraints(field: Any) -> str:
    parts = []
    for meta in field.metadata:
        for attr, label in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<"), ("pattern", "matches")):
            value = getattr(meta, attr, None)
            if value is not None:
                parts.append(f"{label} `{value}`" if attr == "pattern" else f"{label} {value}")
    return ", ".join(parts)


def _default(field: Any) -> str:
    if field.is_required():
        return "**required**"
    if field.default_factory is not None:
        value = field.default_factory()
    else:
        value = field.default
    if value is PydanticUndefined:
        return ""
    if isinstance(value, BaseModel):
        return "(section defaults)"
    return f"`{value}`" if value not in (None, [], {}) else ("none" if value is None else f"`{value}`")


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    found: list[type[BaseModel]] = []
    for arg in typing.get_args(annotation):
        found += _models_in(arg)
    return found


def _rows(model: type[BaseModel], prefix: str) -> list[str]:
    rows = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        nested = _models_in(field.annotation)
        kind = "section" if nested else _type_name(field.annotation)
        allowed = _constraints(field)
        rows.append(f"| `{path}` | {kind} | {_default(field)} | {allowed} | {field.description or ''} |")
        for sub in nested:
            tag = sub.model_fields.get("kind")
            sub_prefix = f"{path}." if not tag else f"{path}.({typing.get_args(tag.annotation)[0]})."
            if typing.get_origin(field.annotation) is dict:
                sub_prefix = f"{path}.<name>."  # a mapping of names to sections (tiers, providers)
            rows += _rows(sub, sub_prefix)
    return rows


def render_reference() -> str:
    header = "| key | type | default | allowed | meaning |\n|---|---|---|---|---|"
    return INTRO + "\n" + header + "\n" + "\n".join(_rows(GatewaySpec, "gpugate:")) + "\n"


if __name__ == "__main__":
    print(render_reference(), end="")

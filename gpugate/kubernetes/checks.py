"""Checks of rendered Kubernetes objects: the API schemas of the cluster's version, CRD models (KEDA, prometheus-operator,
cert-manager), and Caddy for the proxy's Caddyfile."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from ruamel.yaml import YAML

_VERSION_IN_HEADER = re.compile(r"\(Kubernetes (1\.[0-9]+)\)")


def _custom_models() -> dict[tuple[str, str], Any]:
    """Models generated from the CRDs of KEDA, prometheus-operator and cert-manager (cloudcoil), by (apiVersion, kind)."""
    from cloudcoil.models.cert_manager.v1 import Certificate, ClusterIssuer  # noqa: PLC0415 - slow import, validation only
    from cloudcoil.models.keda.v1alpha1 import ScaledObject  # noqa: PLC0415
    from cloudcoil.models.prometheus_operator.v1 import PrometheusRule, ServiceMonitor  # noqa: PLC0415
    from cloudcoil.models.prometheus_operator.v1alpha1 import AlertmanagerConfig  # noqa: PLC0415

    return {
        ("keda.sh/v1alpha1", "ScaledObject"): ScaledObject,
        ("monitoring.coreos.com/v1", "PrometheusRule"): PrometheusRule,
        ("monitoring.coreos.com/v1", "ServiceMonitor"): ServiceMonitor,
        ("monitoring.coreos.com/v1alpha1", "AlertmanagerConfig"): AlertmanagerConfig,
        ("cert-manager.io/v1", "Certificate"): Certificate,
        ("cert-manager.io/v1", "ClusterIssuer"): ClusterIssuer,
    }


def _unknown_fields(given: Any, kept: Any, path: str = "") -> list[str]:
    """Paths in `given` that a model dropped (a field its schema does not have)."""
    if isinstance(given, Mapping) and isinstance(kept, Mapping):
        return [p for key, value in given.items() for p in (
            [f"{path}.{key}"] if key not in kept else _unknown_fields(value, kept[key], f"{path}.{key}")
        )]
    if isinstance(given, list) and isinstance(kept, list):
        return [p for i, (a, b) in enumerate(zip(given, kept, strict=False)) for p in _unknown_fields(a, b, f"{path}[{i}]")]
    return []


def check_object(obj: Mapping[str, Any], version: str) -> list[str]:
    """Problems of one object against the API schemas of Kubernetes `version` (kubernetes-validate,
    strict: unknown fields are errors), or for KEDA's, prometheus-operator's and cert-manager's kinds their CRDs' models."""
    import kubernetes_validate  # noqa: PLC0415 - validation only

    key = (obj.get("apiVersion"), obj.get("kind"))
    model = _custom_models().get(key)  # type: ignore[arg-type]
    if model is not None:
        try:
            kept = model.model_validate(obj).model_dump(by_alias=True, exclude_unset=True, mode="json")
        except ValidationError as err:
            return [f"{key[1]}: {e['loc']}: {e['msg']}" for e in err.errors()]
        return [f"{key[1]}: unknown field {p}" for p in _unknown_fields(obj, kept)]
    try:
        kubernetes_validate.validate(dict(obj), version, strict=True)
    except kubernetes_validate.SchemaNotFoundError:
        return [f"no Kubernetes {version} schema for {key[0]} {key[1]}"]
    except kubernetes_validate.ValidationError as err:
        where = "/".join(str(p) for p in err.path)
        return [f"{key[1]} {where}: {err.message}"]
    return []


def check_manifest(path: Path, root: Path) -> tuple[bool, str]:
    """A rendered `kubernetes/*.yaml`: one object, checked for the cluster version its header names."""
    text = path.read_text()
    found = _VERSION_IN_HEADER.search(text.split("\n", 1)[0])
    if found is None:
        return False, "the header does not name the Kubernetes version the object is for"
    obj = YAML(typ="safe", pure=True).load(text)
    problems = check_object(obj, found.group(1))
    return not problems, "\n".join(problems)

"""How a VM host gets its bundle and secrets: from object storage and the cloud's secret manager, with its own identity.

Names are deterministic, so the rendered user data is complete before `pulumi up` and the program creates
exactly what it names: the bucket (`gpugate-<stack>-<12 hex>`, or `vm.bundle_bucket`), the bundle object
(`bundles/<archive sha256>.tar.gz`) and one secret per credential (AWS Secrets Manager
`gpugate/<stack>/<name>`; GCP Secret Manager `projects/<project>/secrets/gpugate-<stack>-<name>`), each external
provider's key among them as `provider_<provider>_api_key`. The host's boot script (gpugate_runtime/hostboot.py)
reads this as its boot config.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from gpugate_runtime.contract.host import HostLayout, provider_key_name

from gpugate.spec import GatewaySpec, Target

BOOT_CONFIG = Path("/etc/gpugate/boot.json")
BUNDLE_PREFIX = "bundles/"
# Credentials a host reads, by the name the boot config and the secret files use.
VLLM_KEY = "vllm_api_key"
ALERT_CREDENTIAL = "alert_credential"


@dataclass(frozen=True)
class SecretRef:
    """One secret the host fetches at boot: its name, its id in the cloud's secret manager, and the file it lands in."""

    name: str
    id: str
    file: Path
    optional: bool = False


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-") or "stack"


def bucket_name(spec: GatewaySpec, stack: str) -> str:
    """The bundle bucket: the stack's own choice, else `gpugate-<stack>-<12 hex>` from what makes the stack
    unique (cloud, project, region, domain, stack), a valid S3 and GCS bucket name."""
    if spec.vm is not None and spec.vm.bundle_bucket:
        return spec.vm.bundle_bucket
    identity = f"{spec.target}|{spec.project or ''}|{spec.region}|{spec.domain}|{stack}"
    digest = hashlib.sha256(identity.encode()).hexdigest()[:12]
    return f"gpugate-{_slug(stack)[:40]}-{digest}"


def object_key(archive_sha256: str) -> str:
    return f"{BUNDLE_PREFIX}{archive_sha256}.tar.gz"


def bundle_url(spec: GatewaySpec, stack: str, archive_sha256: str) -> str:
    scheme = "s3" if spec.target is Target.AWS else "gs"
    return f"{scheme}://{bucket_name(spec, stack)}/{object_key(archive_sha256)}"


def secret_id(spec: GatewaySpec, stack: str, name: str) -> str:
    if spec.target is Target.AWS:
        return f"gpugate/{_slug(stack)}/{name}"
    return f"projects/{spec.project}/secrets/gpugate-{_slug(stack)}-{name.replace('_', '-')}"


def secrets(spec: GatewaySpec, stack: str, layout: HostLayout) -> tuple[SecretRef, ...]:
    """The secrets a host of this stack fetches: vLLM's internal key, the alert channel's credential when it has
    one, and each external provider's key (`provider_<name>_api_key`, which only the router reads)."""
    refs = [SecretRef(VLLM_KEY, secret_id(spec, stack, VLLM_KEY), layout.vllm_key_file)]
    if spec.alerts.needs_credential:
        refs.append(SecretRef(ALERT_CREDENTIAL, secret_id(spec, stack, ALERT_CREDENTIAL), layout.alert_secret_file))
    for provider in sorted(spec.providers):
        name = provider_key_name(provider)
        refs.append(SecretRef(name, secret_id(spec, stack, name), layout.provider_key_file(provider)))
    return tuple(refs)


def boot_config(spec: GatewaySpec, stack: str, layout: HostLayout, archive_sha256: str) -> dict:
    """hostboot's config: where the bundle is, its sha256, where it goes, and each secret."""
    config: dict = {
        "cloud": "aws" if spec.target is Target.AWS else "gcp",
        "bundle_url": bundle_url(spec, stack, archive_sha256),
        "bundle_sha256": archive_sha256,
        "dest": str(layout.etc),
        "secrets": [
            {"name": s.name, "id": s.id, "file": str(s.file), "optional": s.optional} for s in secrets(spec, stack, layout)
        ],
    }
    if spec.target is Target.AWS:
        config["region"] = spec.region
    else:
        config["project"] = spec.project
    return config

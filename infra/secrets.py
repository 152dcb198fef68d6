"""The gateway's secrets: where each one comes from, and the secret user-data that carries them to the host.

The bundle's user-data holds no secret. Here each secret is appended as one more
`write_files` entry (mode 0600 under /etc/gpugate/secrets/), and the whole document
becomes a Pulumi secret, so it is encrypted in the state and masked in every diff.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pulumi
import pulumi_random as random
from gpugate_runtime.contract.host import VM_LAYOUT
from ruamel.yaml import YAML

from gpugate.render.bundle import dump_yaml
from gpugate.spec import GatewaySpec
from gpugate.stackfile import NAMESPACE

SECRET_FILE_MODE = "0600"
VLLM_KEY_LENGTH = 48
CLOUD_CONFIG = "#cloud-config"


@dataclass(frozen=True)
class HostSecret:
    """One secret file on the host and the Output it is written from."""

    name: str
    path: str
    value: pulumi.Output[str]


def needs_alert_credential(spec: GatewaySpec) -> bool:
    return spec.alerts.needs_credential


def host_secrets(spec: GatewaySpec, name: str, parent: pulumi.Resource) -> list[HostSecret]:
    """The internal vLLM key (`gpugate:vllm_api_key` when set, else generated and kept in the
    state) and the alert channel's credential (`gpugate:alert_credential`, required when the
    channel needs one)."""
    config = pulumi.Config(NAMESPACE)
    vllm_key = config.get_secret("vllm_api_key")
    if vllm_key is None:
        vllm_key = random.RandomPassword(
            f"{name}-vllm-api-key",
            length=VLLM_KEY_LENGTH,
            special=False,  # it travels in an HTTP header and a shell variable
            opts=pulumi.ResourceOptions(parent=parent),
        ).result
    secrets = [HostSecret("vllm_api_key", str(VM_LAYOUT.vllm_key_file), pulumi.Output.secret(vllm_key))]
    if needs_alert_credential(spec):
        secrets.append(
            HostSecret(
                "alert_credential",
                str(VM_LAYOUT.alert_secret_file),
                pulumi.Output.secret(config.require_secret("alert_credential")),
            )
        )
    return secrets


def secret_user_data(base: bytes, secrets: Sequence[HostSecret]) -> pulumi.Output[str]:
    """The bundle's user-data with the secrets appended, as one secret Output."""
    paths = [s.path for s in secrets]
    merged = pulumi.Output.all(*[s.value for s in secrets]).apply(
        lambda values: with_secret_files(base, list(zip(paths, values, strict=True)))
    )
    return pulumi.Output.secret(merged)


def with_secret_files(base: bytes, files: Sequence[tuple[str, str]]) -> str:
    """Append `write_files` entries (root-owned, 0600) to a `#cloud-config` document; keeps its header comment."""
    text = base.decode()
    lines = text.splitlines()
    if not lines or lines[0].strip() != CLOUD_CONFIG:
        raise ValueError("the bundle's user-data must start with #cloud-config")
    header = lines[1].removeprefix("# ") if len(lines) > 1 and lines[1].startswith("# ") else "gpugate user-data"
    document = YAML(typ="safe", pure=True).load(text)
    entries = list(document.get("write_files", []))
    taken = {entry["path"] for entry in entries}
    for path, content in files:
        if path in taken:
            raise ValueError(f"user-data already writes {path}; a secret must not overwrite a bundle file")
        entries.append({"path": path, "content": content, "permissions": SECRET_FILE_MODE, "owner": "root:root"})
    document["write_files"] = entries
    return f"{CLOUD_CONFIG}\n" + dump_yaml(document, header).decode()

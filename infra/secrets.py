"""The gateway's secrets and where each one comes from. They reach a VM host through the cloud's secret
manager (infra/aws.py, infra/gcp.py) and a cluster through Secrets (infra/kubernetes.py); never user data."""

from __future__ import annotations

from dataclasses import dataclass

import pulumi
import pulumi_random as random
from gpugate_runtime.contract.host import VM_LAYOUT, provider_key_name

from gpugate.routing import provider_key_secret
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


def missing_provider_keys(spec: GatewaySpec, secrets: tuple[str, ...], stack: str) -> list[str]:
    """The providers whose key the stack file does not hold (`secrets`: Stack.secrets), as a message each."""
    return [
        f"{provider_key_secret(p)} is not set: pulumi config set --secret --path '{provider_key_secret(p)}' KEY -s {stack}"
        for p in sorted(spec.providers)
        if f"providers.{p}.api_key" not in secrets
    ]


def _provider_key(providers: dict, provider: str) -> str:
    try:
        return str(providers[provider]["api_key"])
    except (KeyError, TypeError):
        raise ValueError(f"{provider_key_secret(provider)} is not set (pulumi config set --secret --path)") from None


def host_secrets(spec: GatewaySpec, name: str, parent: pulumi.Resource) -> list[HostSecret]:
    """The internal vLLM key (`gpugate:vllm_api_key` when set, else generated and kept in the
    state), the alert channel's credential (`gpugate:alert_credential`, required when the
    channel needs one) and each external provider's key (`gpugate:providers.<name>.api_key`)."""
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
    if spec.providers:
        # Structured config with a secure value inside is a secret as a whole: read it as one.
        providers = config.require_secret_object("providers")
        for provider in sorted(spec.providers):
            secrets.append(
                HostSecret(
                    provider_key_name(provider),
                    str(VM_LAYOUT.provider_key_file(provider)),
                    pulumi.Output.secret(providers.apply(lambda p, provider=provider: _provider_key(p, provider))),
                )
            )
    return secrets

"""A local stack's external provider keys: from the environment into the state dir's secret files, before anything starts.

A local stack has no Pulumi engine to decrypt `gpugate:providers.<name>.api_key`, so `gpugate up` takes each
provider's key from `GPUGATE_PROVIDER_<NAME>_API_KEY` (the name upper-cased, `-` as `_`) and writes it to the file
the router reads (`HostLayout.provider_key_file`, mode 0600 in the 0700 secrets dir). A key already on file stays
when the variable is unset, so the variable is needed once; a provider with neither stops `gpugate up` before
anything is installed or started.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from gpugate_runtime.contract.host import HostLayout

from gpugate.routing import provider_key_secret


def provider_key_env(provider: str) -> str:
    """The environment variable `gpugate up` reads a provider's key from."""
    return f"GPUGATE_PROVIDER_{provider.upper().replace('-', '_')}_API_KEY"


class ProviderKeyMissing(Exception):
    """Providers whose key is neither in the environment nor on file; says how to give each one."""

    def __init__(self, providers: list[str], layout: HostLayout, stack: str):
        self.providers = providers
        self.lines = [
            f"{provider_key_secret(p)}: export {provider_key_env(p)}=<the provider's API key> and run "
            f"`gpugate up --stack {stack}` again (or write it to {layout.provider_key_file(p)}, mode 0600)"
            for p in providers
        ]
        super().__init__(f"no API key for provider(s) {', '.join(providers)} of stack {stack}")


def write_secret(path: Path, value: str) -> None:
    """Write a secret file atomically, mode 0600, in a 0700 directory."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path.parent, 0o700)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(value + "\n")
    os.replace(tmp, path)


def _on_file(path: Path) -> str:
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        return ""


def install_provider_keys(providers: Iterable[str], layout: HostLayout, stack: str, environ: Mapping[str, str]) -> list[str]:
    """Write each provider's key from its environment variable; returns the providers whose key file changed.
    Raises ProviderKeyMissing (writing nothing) when a provider has no key in the environment nor on file."""
    given = {p: environ.get(provider_key_env(p), "").strip() for p in sorted(providers)}
    missing = [p for p, key in given.items() if not key and not _on_file(layout.provider_key_file(p))]
    if missing:
        raise ProviderKeyMissing(missing, layout, stack)
    changed = []
    for provider, key in given.items():
        path = layout.provider_key_file(provider)
        if key and key != _on_file(path):
            write_secret(path, key)
            changed.append(provider)
    return changed

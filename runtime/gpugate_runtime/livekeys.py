"""The keys as authz serves them: the store's records resolved against the stack defaults, reloaded when the store changes."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from prometheus_client import Counter

from gpugate_runtime.contract.routing import RoutePolicy
from gpugate_runtime.keys import KeyStore, KeyStoreError, read_store
from gpugate_runtime.settings import AuthzSettings
from gpugate_runtime.spend import Spend

log = logging.getLogger("gpugate_runtime.authz")


@dataclass(frozen=True, slots=True)
class LiveKey:
    """A key as authz serves it: times as epoch seconds, limits resolved against the stack defaults."""

    id: str
    name: str
    digest: bytes
    created_at: float
    expires_at: float
    revoked_at: float | None
    rpm: int
    max_concurrent: int
    family: str = ""
    scope_header: bytes = b""  # contract.routing.KeyScope as the router reads it, made once per store load
    tpm: int | None = None
    budget_tokens: int | None = None
    budget_usd: float | None = None
    budget_period: str = "month"

    @property
    def has_budget(self) -> bool:
        return self.budget_tokens is not None or self.budget_usd is not None


def live_keys(
    store: KeyStore, default_rpm: int, default_max_concurrent: int, default_policy: RoutePolicy = RoutePolicy.LOCAL_FIRST
) -> dict[str, LiveKey]:
    live = {}
    for k in store.keys:
        scope = k.effective_scope
        live[k.id] = LiveKey(
            id=k.id,
            name=k.name,
            digest=bytes.fromhex(k.sha256),
            created_at=k.created_at.timestamp(),
            expires_at=k.expires_at.timestamp(),
            revoked_at=k.revoked_at.timestamp() if k.revoked_at else None,
            rpm=k.rpm or default_rpm,
            max_concurrent=k.max_concurrent or default_max_concurrent,
            family=k.lineage,
            scope_header=scope.route_scope(k.lineage, default_policy).to_header().encode(),
            tpm=scope.tpm,
            budget_tokens=scope.budget_tokens,
            budget_usd=scope.budget_usd,
            budget_period=scope.budget_period,
        )
    return live


def exhausted_budget(key: LiveKey, spent: Spend) -> str | None:
    """`tokens` or `usd` when the family has spent that budget of its period, else None."""
    if key.budget_tokens is not None and spent.tokens >= key.budget_tokens:
        return "tokens"
    if key.budget_usd is not None and spent.usd >= key.budget_usd:
        return "usd"
    return None


class KeyStoreWatcher:
    """Reloads the key store when its inode, size or mtime changes; refuses a store that does not
    parse and keeps serving the keys it had."""

    def __init__(self, settings: AuthzSettings, reloads: Counter, failures: Counter) -> None:
        self.path = settings.key_store
        self._defaults = (
            settings.default_rpm,
            settings.default_max_concurrent,
            settings.default_route_policy or RoutePolicy.LOCAL_FIRST,
        )
        self._reloads, self._failures = reloads, failures
        self._signature: tuple[int, int, int] | None = None
        self.keys: dict[str, LiveKey] = {}
        self.loaded_once = False

    def check(self) -> None:
        """Reload if the file changed: one stat() when it did not."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            if self.loaded_once and self._signature is not None:
                self._signature = None
                self._failures.inc()
                log.error("key store %s disappeared; still serving the %d keys loaded before", self.path, len(self.keys))
            elif not self.loaded_once and self._signature is None:
                self._signature = (0, 0, 0)
                log.warning("key store %s does not exist yet: every key is rejected until it does", self.path)
            return
        signature = (st.st_ino, st.st_size, st.st_mtime_ns)
        if signature == self._signature:
            return
        self._signature = signature
        try:
            store = read_store(self.path)
        except KeyStoreError as exc:
            self._failures.inc()
            log.error("refused key store: %s; still serving the %d keys loaded before", exc, len(self.keys))
            return
        self.keys = live_keys(store, *self._defaults)
        self.loaded_once = True
        self._reloads.inc()
        log.info("loaded key store %s: %d keys", self.path, len(self.keys))

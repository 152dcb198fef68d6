"""Client API keys: issue, rotate and revoke them in a hashed, atomically written key store."""

from __future__ import annotations

import fcntl
import getpass
import hashlib
import hmac
import json
import os
import re
import secrets
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from gpugate_runtime.contract.routing import KeyScope, RoutePolicy

# A key reads `ggk_<id>_<secret>`: the prefix makes a leaked key recognisable to secret scanners, the
# id lets authz find the record in O(1) and names the key in logs and metrics without revealing it.
TOKEN_PREFIX = "ggk"
ID_HEX = 12  # 48 random bits: unique within a store (checked), not a secret
SECRET_BYTES = 32  # 256 random bits from the OS CSPRNG
STDIN_ARGUMENT = "-"  # as an ID: read the key itself from stdin or a prompt
ID_RE = re.compile(rf"^[0-9a-f]{{{ID_HEX}}}$")
# \Z, not $: Python's $ also matches before a final newline, and "<key>\n" is not a key.
TOKEN_RE = re.compile(rf"^{TOKEN_PREFIX}_([0-9a-f]{{{ID_HEX}}})_([0-9a-f]{{{SECRET_BYTES * 2}}})\Z")
BEARER = b"bearer"
NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"
NAME_RULE = "1-64 of a-z 0-9 . _ - starting with a letter or digit"
MAX_LIMIT = 1_000_000
STORE_MODE = 0o600
MODEL_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$"  # a public model id or tier label, as the router matches it
MAX_TOKENS = 10**15
MAX_USD = 10**9
MAX_LATENCY_MS = 600_000
BudgetPeriod = Literal["day", "month"]  # UTC calendar periods (gpugate_runtime.spend)
BUDGET_PERIODS: tuple[str, ...] = ("day", "month")


class Scope(BaseModel):
    """What a key may do beyond being valid: models, route policies, tokens per minute, a budget per period.

    Every field left out is unrestricted (policies: the stack's default policy). A rotated key inherits its
    predecessor's scope; its family (on `KeyRecord`) carries the spend over.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    models: tuple[str, ...] | None = Field(None, min_length=1, description="public model ids or tier labels allowed; None: all")
    policies: tuple[RoutePolicy, ...] | None = Field(None, min_length=1, description="route policies allowed; None: all")
    default_policy: RoutePolicy | None = Field(None, description="policy without a request header; None: the stack's")
    latency_objective_ms: int | None = Field(None, ge=1, le=MAX_LATENCY_MS, description="cost-optimized: slowest route accepted")
    tpm: int | None = Field(None, ge=1, le=MAX_TOKENS, description="tokens (input + output) per UTC minute, for the key's family")
    budget_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS, description="tokens per budget period, for the family")
    budget_usd: float | None = Field(None, gt=0, le=MAX_USD, description="cost in USD per budget period, for the family")
    budget_period: BudgetPeriod = Field("month", description="the budgets' UTC calendar period")

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        for model in self.models or ():
            if not re.fullmatch(MODEL_PATTERN, model):
                raise ValueError(
                    f"{model!r} is not a model id; allowed: 1-128 of A-Z a-z 0-9 . _ : / - starting with a letter or digit"
                )
        if self.models is not None and len(set(self.models)) != len(self.models):
            raise ValueError("a model is listed twice")
        if self.policies is not None and self.default_policy is not None and self.default_policy not in self.policies:
            allowed = ", ".join(self.policies)
            raise ValueError(f"default policy {self.default_policy} is not among the allowed policies ({allowed})")
        return self

    def route_scope(self, family: str, stack_default: RoutePolicy) -> KeyScope:
        """What authz hands the router (contract.routing.KeyScope)."""
        default = self.default_policy or stack_default
        if self.policies and default not in self.policies:
            default = self.policies[0]  # the stack's default is not allowed to this key
        return KeyScope(
            family=family,
            default_policy=default,
            policies=self.policies,
            models=self.models,
            latency_objective_ms=self.latency_objective_ms,
        )

    def summary(self) -> str:
        """One line for `keys list`: what is restricted, `-` when nothing is."""
        parts = []
        if self.models is not None:
            parts.append("models " + ",".join(self.models))
        if self.policies is not None:
            parts.append("policies " + ",".join(self.policies))
        if self.default_policy is not None:
            parts.append(f"default {self.default_policy}")
        if self.latency_objective_ms is not None:
            parts.append(f"objective {self.latency_objective_ms}ms")
        if self.tpm is not None:
            parts.append(f"tpm {self.tpm}")
        if self.budget_tokens is not None:
            parts.append(f"{self.budget_tokens} tokens/{self.budget_period}")
        if self.budget_usd is not None:
            parts.append(f"{self.budget_usd:g} USD/{self.budget_period}")
        return "; ".join(parts) or "-"


UNSCOPED = Scope()


class KeyRecord(BaseModel):
    """What the store keeps of a key: never the key itself, only its hash."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=rf"^[0-9a-f]{{{ID_HEX}}}$")
    name: str = Field(pattern=NAME_PATTERN)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="sha256 of the whole key string")
    created_at: AwareDatetime
    expires_at: AwareDatetime
    revoked_at: AwareDatetime | None = None
    rpm: int | None = Field(None, ge=1, le=MAX_LIMIT, description="requests per minute; None: the stack default")
    max_concurrent: int | None = Field(None, ge=1, le=MAX_LIMIT, description="in flight; None: the stack default")
    # Written only when set, so a store without scopes reads (and is written) exactly as before.
    family: str | None = Field(
        None, pattern=rf"^[0-9a-f]{{{ID_HEX}}}$", description="rotation lineage (the first key's id); None: the key's own id"
    )
    scope: Scope | None = Field(None, description="models, policies, tpm and budgets; None: unrestricted")

    @property
    def lineage(self) -> str:
        """The family whose spend this key draws on: kept by every rotation."""
        return self.family or self.id

    @property
    def effective_scope(self) -> Scope:
        return self.scope or UNSCOPED

    def status(self, now: datetime) -> Literal["active", "expired", "revoked"]:
        if self.revoked_at is not None and self.revoked_at <= now:
            return "revoked"
        if self.expires_at <= now:
            return "expired"
        return "active"

    def public(self, now: datetime) -> dict[str, object]:
        """The record as `list --json` shows it: everything but the hash."""
        data = self.model_dump(mode="json", exclude={"sha256", "family", "scope"})
        data["status"] = self.status(now)
        data["family"] = self.lineage
        data["scope"] = self.effective_scope.model_dump(mode="json")
        return data

    def stored(self) -> dict[str, Any]:
        data = self.model_dump(mode="json")
        for optional in ("family", "scope"):
            if data[optional] is None:
                del data[optional]
        return data


class KeyStore(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    version: Literal[1] = 1
    keys: tuple[KeyRecord, ...] = ()

    @model_validator(mode="after")
    def _unique_ids(self) -> Self:
        seen: set[str] = set()
        for key in self.keys:
            if key.id in seen:
                raise ValueError(f"key id {key.id} appears twice")
            seen.add(key.id)
        return self


class KeyStoreError(Exception):
    """The store file exists but cannot be read as a key store."""


class KeyInputError(ValueError):
    """A request the store cannot honour: unknown id, name already in use, nothing to rotate."""


@dataclass(frozen=True)
class IssuedKey:
    token: str  # shown once, never stored
    record: KeyRecord


@dataclass(frozen=True)
class Rotation:
    issued: IssuedKey
    retiring: tuple[KeyRecord, ...]  # the name's previous keys, now expiring at the end of the overlap


def utcnow() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def token_digest(token: str) -> str:
    # A plain sha256 is the right hash here, unlike for passwords: a key carries 256 bits from the
    # CSPRNG, so there is no dictionary to try and brute force is out of reach whatever the hash
    # costs. A slow KDF (bcrypt, argon2) would only add milliseconds to every request.
    return hashlib.sha256(token.encode()).hexdigest()


def key_id_of(token: str) -> str | None:
    """The key id of a well-formed key, else None."""
    match = TOKEN_RE.match(token)
    return match.group(1) if match else None


def bearer_key(header: bytes) -> tuple[str, str] | None:
    """(key id, key) from an `Authorization` value `Bearer <key>` (scheme in any case, spaces after it), else None."""
    scheme, _, credential = header.partition(b" ")
    if scheme.lower() != BEARER:
        return None
    token = credential.strip().decode("latin-1")
    match = TOKEN_RE.match(token)
    return (match.group(1), token) if match else None


def read_key_input(prompt: str = "key to revoke (input hidden): ") -> str:
    """One key from stdin: a hidden prompt on a terminal, else the first line of what is piped in."""
    if sys.stdin is None:
        return ""
    if sys.stdin.isatty():
        return getpass.getpass(prompt)
    return sys.stdin.readline()


def revocation_target(key_id: str | None, read_key: Callable[[], str] = read_key_input) -> tuple[str, str | None]:
    """What a revocation acts on: (key id, the key itself when it was given).

    The id comes from the command line; the key itself only through `read_key` (stdin or a hidden prompt),
    asked for by leaving the id out or giving `-`: a key in argv stays in shell history and shows in process
    lists, so one there is refused, unechoed.
    """
    if key_id not in (None, STDIN_ARGUMENT):
        if key_id.startswith(f"{TOKEN_PREFIX}_") or key_id_of(key_id):
            raise KeyInputError(
                "ID is a whole key, not a key id: a key on the command line stays in shell history and process lists, "
                f"so it is refused. Give its id (the {ID_HEX} hex digits after `{TOKEN_PREFIX}_`), or give `-` (or no ID) "
                "and pass the key on stdin (`... revoke - < FILE`) or at the prompt"
            )
        if not ID_RE.match(key_id):
            raise KeyInputError(f"ID must be a key id: {ID_HEX} hex digits (see `keys list`), or - to read the key itself from stdin")
        return key_id, None
    token = read_key().strip()
    if not token:
        raise KeyInputError("no key given: pass the key on stdin or at the prompt, or give its ID")
    found = key_id_of(token)
    if found is None:
        raise KeyInputError(
            f"what was read is not a gpugate key ({TOKEN_PREFIX}_<{ID_HEX} hex>_<{SECRET_BYTES * 2} hex>); to revoke by id, give ID"
        )
    return found, token


def _new_token(taken: set[str]) -> tuple[str, str]:
    while True:
        key_id = secrets.token_hex(ID_HEX // 2)
        if key_id not in taken:
            return key_id, f"{TOKEN_PREFIX}_{key_id}_{secrets.token_hex(SECRET_BYTES)}"


def parse_duration(text: str, *, allow_zero: bool = False) -> timedelta:
    """`90d`, `24h`, `30m`: a whole number and one unit. Raises ValueError saying what is allowed."""
    match = re.fullmatch(r"([0-9]+)([dhm])", text.strip())
    if not match:
        raise ValueError(f"{text!r} is not a duration; use a whole number and a unit d, h or m, e.g. 90d, 24h, 30m")
    amount = int(match.group(1))
    if amount == 0 and not allow_zero:
        raise ValueError(f"{text!r} is zero; a duration here must be at least 1m")
    unit = {"d": "days", "h": "hours", "m": "minutes"}[match.group(2)]
    value = timedelta(**{unit: amount})
    if value > timedelta(days=3650):
        raise ValueError(f"{text!r} is longer than 3650d")
    return value


def read_store(path: Path) -> KeyStore:
    """The store at path; an absent file is an empty store."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return KeyStore()
    except OSError as exc:
        raise KeyStoreError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        return KeyStore.model_validate_json(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(file)'}: {e['msg']}" for e in exc.errors())
        raise KeyStoreError(f"{path}: not a valid key store: {problems}") from None


def write_store(path: Path, store: KeyStore) -> None:
    """Replace the store atomically: readers see the old file or the new one, never a mix.

    Call it with the lock held (see `locked`); authz reads without the lock, which the rename makes safe.
    """
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    document = {"version": store.version, "keys": [k.stored() for k in store.keys]}
    data = json.dumps(document, indent=2, sort_keys=True).encode() + b"\n"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # mode 0600
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), STORE_MODE)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # make the rename itself durable
    finally:
        os.close(directory)


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """Serialise read-modify-write cycles of the store between concurrent `keys` commands."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, STORE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _issue(
    store: KeyStore,
    name: str,
    expires: timedelta,
    rpm: int | None,
    max_concurrent: int | None,
    now: datetime,
    *,
    family: str | None = None,
    scope: Scope | None = None,
) -> IssuedKey:
    key_id, token = _new_token({k.id for k in store.keys})
    record = KeyRecord(
        id=key_id,
        name=name,
        sha256=token_digest(token),
        created_at=now,
        expires_at=now + expires,
        rpm=rpm,
        max_concurrent=max_concurrent,
        family=family,
        scope=None if scope == UNSCOPED else scope,
    )
    return IssuedKey(token=token, record=record)


def create_key(
    path: Path,
    name: str,
    *,
    expires: timedelta,
    rpm: int | None = None,
    max_concurrent: int | None = None,
    scope: Scope | None = None,
    now: datetime | None = None,
) -> IssuedKey:
    """Issue a key for a name that has no active key (a second one is a rotation); it starts a family of its own."""
    now = now or utcnow()
    if not re.fullmatch(NAME_PATTERN, name):
        raise KeyInputError(f"{name!r} is not a key name; allowed: {NAME_RULE}")
    with locked(path):
        store = read_store(path)
        active = [k for k in store.keys if k.name == name and k.status(now) == "active"]
        if active:
            raise KeyInputError(f"name {name!r} already has an active key ({active[0].id}); rotate it with `keys rotate {name}`")
        issued = _issue(store, name, expires, rpm, max_concurrent, now, scope=scope)
        write_store(path, store.model_copy(update={"keys": (*store.keys, issued.record)}))
    return issued


def rotate_key(
    path: Path,
    name: str,
    *,
    overlap: timedelta,
    expires: timedelta,
    rescope: Callable[[Scope | None], Scope | None] | None = None,
    now: datetime | None = None,
) -> Rotation:
    """Issue a new key for name now; the name's active keys stay valid until now + overlap.

    The new key joins the newest key's family (so the family's spend and budgets carry over) and keeps its
    limits and scope; `rescope`, when given, turns the old scope into the new one (e.g. a raised budget).
    """
    now = now or utcnow()
    with locked(path):
        store = read_store(path)
        active = sorted((k for k in store.keys if k.name == name and k.status(now) == "active"), key=lambda k: k.created_at)
        if not active:
            raise KeyInputError(f"name {name!r} has no active key to rotate; create one with `keys create {name}`")
        newest = active[-1]
        issued = _issue(
            store, name, expires, newest.rpm, newest.max_concurrent, now,
            family=newest.lineage, scope=rescope(newest.scope) if rescope else newest.scope,
        )  # fmt: skip
        cutoff = now + overlap
        retiring = tuple(k.model_copy(update={"expires_at": min(k.expires_at, cutoff)}) for k in active)
        changed = {k.id: k for k in retiring}
        keys = tuple(changed.get(k.id, k) for k in store.keys) + (issued.record,)
        write_store(path, store.model_copy(update={"keys": keys}))
    return Rotation(issued=issued, retiring=retiring)


def revoke_key(path: Path, key_id: str, now: datetime | None = None, *, token: str | None = None) -> KeyRecord:
    """Revoke a key by id from now on; revoking a revoked key changes nothing.

    With `token` (the key itself, read from stdin, never argv), the record must also match its hash, so a
    mistyped key revokes nothing rather than whichever key shares its id.
    """
    now = now or utcnow()
    with locked(path):
        store = read_store(path)
        found = next((k for k in store.keys if k.id == key_id), None)
        if found is None:
            known = ", ".join(k.id for k in store.keys) or "none"
            raise KeyInputError(f"no key with id {key_id!r} in {path}; ids there: {known}")
        if token is not None and not hmac.compare_digest(found.sha256, token_digest(token)):
            raise KeyInputError(f"the key given is not key {key_id} of {path} (its hash does not match): mistyped, or from another store")
        if found.revoked_at is not None:
            return found
        revoked = found.model_copy(update={"revoked_at": now})
        write_store(path, store.model_copy(update={"keys": tuple(revoked if k.id == key_id else k for k in store.keys)}))
    return revoked

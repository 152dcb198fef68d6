"""hostboot's config (/etc/gpugate/boot.json): what to fetch, where it goes, checked before anything is fetched."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

log = logging.getLogger("gpugate.hostboot")

EXIT_OK, EXIT_FETCH, EXIT_CONFIG = 0, 1, 2

# Names inside the destination directory that belong to this script's layout, never to a bundle.
BUNDLES_DIRNAME = ".bundles"
SECRETS_DIRNAME = "secrets"
RESERVED_TOP_LEVEL = frozenset({BUNDLES_DIRNAME, SECRETS_DIRNAME})
CURRENT_LINK, PREVIOUS_LINK = "current", "previous"
LOCK_FILE = ".lock"

DEFAULT_RETRY_SECONDS = 60.0
MAX_ATTEMPTS = 12  # a second bound next to the deadline
MAX_BACKOFF_SECONDS = 10.0
HTTP_TIMEOUT_SECONDS = 30.0
LOCK_WAIT_SECONDS = 300.0
CHUNK = 1 << 20

GCE_METADATA_DEFAULT_HOST = "metadata.google.internal"
GCE_TOKEN_PATH = "/computeMetadata/v1/instance/service-accounts/default/token"
GCS_DEFAULT_ENDPOINT = "https://storage.googleapis.com"
SECRETMANAGER_DEFAULT_ENDPOINT = "https://secretmanager.googleapis.com"
ENV_SECRETMANAGER_ENDPOINT = "GPUGATE_SECRETMANAGER_ENDPOINT"

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_SECRET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$")
_AWS_SECRET_ID = re.compile(r"^[A-Za-z0-9/_+=.@-]{1,2048}$")
_GCP_SECRET_ID = re.compile(r"^projects/(?P<project>[^/]+)/secrets/(?P<secret>[A-Za-z0-9_-]{1,255})$")
_GCP_PROJECT = re.compile(r"^[a-z][a-z0-9-]{4,28}[a-z0-9]$|^[0-9]+$")  # an id, or a project number

T = TypeVar("T")


class ConfigError(Exception):
    """The boot config is unusable (exit 2)."""


class FetchError(Exception):
    """A fetch, check or install step failed (exit 1). `retryable`: may succeed if tried again soon."""

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


class NotFound(FetchError):
    """The object or secret (or the secret's current version) does not exist."""


class Sink(Protocol):
    """Where a download writes (a file, or a file behind a hash)."""

    def write(self, data: bytes, /) -> object: ...


def check_bundle_path(name: str) -> str:
    """The one rule for paths inside a bundle archive (the writer, gpugate.render.archive, uses it too):
    relative, `/`-separated, no empty, `.` or `..` parts, and not one of this script's own top-level names.
    Returns the path without a trailing `/`; raises ValueError naming the path."""
    path = name[:-1] if name.endswith("/") else name
    parts = path.split("/")
    if not path or path.startswith("/") or "\\" in path or "\0" in path:
        raise ValueError(f"bundle path {name!r}: must be a relative path with '/' separators")
    if any(part in ("", ".", "..") for part in parts):
        raise ValueError(f"bundle path {name!r}: empty, '.' or '..' parts are not allowed")
    if parts[0] in RESERVED_TOP_LEVEL:
        raise ValueError(f"bundle path {name!r}: {parts[0]!r} is reserved on the host, not part of a bundle")
    return path


# --- config ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SecretRef:
    name: str
    id: str
    file: Path
    optional: bool


@dataclass(frozen=True)
class BootConfig:
    cloud: str  # "aws" | "gcp"
    location: str  # the AWS region or the GCP project
    bundle_url: str
    bundle_sha256: str
    dest: Path
    secrets: tuple[SecretRef, ...]

    @property
    def secrets_dir(self) -> Path:
        return self.dest / SECRETS_DIRNAME


_TOP_KEYS = {
    "aws": {"cloud", "region", "bundle_url", "bundle_sha256", "dest", "secrets"},
    "gcp": {"cloud", "project", "bundle_url", "bundle_sha256", "dest", "secrets"},
}
_SECRET_KEYS = {"name", "id", "file", "optional"}


def _require(obj: dict[str, Any], key: str, where: str, kind: type = str) -> Any:
    if key not in obj:
        raise ConfigError(f"{where}{key}: required")
    value = obj[key]
    if not isinstance(value, kind) or (kind is str and not value):
        raise ConfigError(f"{where}{key}: must be a non-empty {kind.__name__}, got {value!r}")
    return value


def _check_keys(obj: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise ConfigError(f"{where}{unknown[0]}: unknown key (allowed: {', '.join(sorted(allowed))})")


def parse_config(raw: Any) -> BootConfig:
    """Validate a decoded boot.json; raises ConfigError naming the key path."""
    if not isinstance(raw, dict):
        raise ConfigError("top level: must be a JSON object")
    cloud = _require(raw, "cloud", "")
    if cloud not in _TOP_KEYS:
        raise ConfigError(f"cloud: must be 'aws' or 'gcp', got {cloud!r}")
    _check_keys(raw, _TOP_KEYS[cloud], "")
    scheme = {"aws": "s3", "gcp": "gs"}[cloud]
    if cloud == "aws":
        location = _require(raw, "region", "")
        if not re.fullmatch(r"[a-z]{2}(-[a-z]+)+-[0-9]+", location):
            raise ConfigError(f"region: not an AWS region name: {location!r}")
    else:
        location = _require(raw, "project", "")
        if not _GCP_PROJECT.match(location):
            raise ConfigError(f"project: not a GCP project id or number: {location!r}")
    bundle_url = _require(raw, "bundle_url", "")
    try:
        split_object_url(bundle_url, scheme)
    except ValueError as error:
        raise ConfigError(f"bundle_url: {error}") from None
    sha = _require(raw, "bundle_sha256", "")
    if not _SHA256.match(sha):
        raise ConfigError(f"bundle_sha256: must be 64 lowercase hex digits, got {sha!r}")
    dest = Path(_require(raw, "dest", ""))
    if not dest.is_absolute() or ".." in dest.parts:
        raise ConfigError(f"dest: must be an absolute path without '..', got {str(dest)!r}")
    secrets_raw = _require(raw, "secrets", "", list)
    secrets: list[SecretRef] = []
    for index, item in enumerate(secrets_raw):
        where = f"secrets[{index}]."
        if not isinstance(item, dict):
            raise ConfigError(f"secrets[{index}]: must be an object")
        _check_keys(item, _SECRET_KEYS, where)
        name = _require(item, "name", where)
        if not _SECRET_NAME.match(name):
            raise ConfigError(f"{where}name: letters, digits, '_', '.', '-' only, got {name!r}")
        secret_id = _require(item, "id", where)
        _check_secret_id(cloud, location, secret_id, f"{where}id")
        file = Path(_require(item, "file", where))
        if file.parent != dest / SECRETS_DIRNAME or file.name in ("", ".", ".."):
            raise ConfigError(f"{where}file: must be a file directly in {dest / SECRETS_DIRNAME}, got {str(file)!r}")
        optional = item.get("optional", False)
        if not isinstance(optional, bool):
            raise ConfigError(f"{where}optional: must be true or false, got {optional!r}")
        secrets.append(SecretRef(name=name, id=secret_id, file=file, optional=optional))
    for attribute in ("name", "file"):
        seen: set[Any] = set()
        for index, secret in enumerate(secrets):
            value = getattr(secret, attribute)
            if value in seen:
                raise ConfigError(f"secrets[{index}].{attribute}: {str(value)!r} appears twice")
            seen.add(value)
    return BootConfig(cloud, location, bundle_url, sha, dest, tuple(secrets))


def _check_secret_id(cloud: str, location: str, secret_id: str, where: str) -> None:
    if cloud == "aws":
        if secret_id.startswith("arn:"):
            parts = secret_id.split(":")
            if len(parts) < 7 or parts[2] != "secretsmanager" or parts[5] != "secret":
                raise ConfigError(f"{where}: not a Secrets Manager secret ARN: {secret_id!r}")
            if parts[3] != location:
                raise ConfigError(f"{where}: the secret is in region {parts[3]!r}, the config's region is {location!r}")
        elif not _AWS_SECRET_ID.match(secret_id):
            raise ConfigError(f"{where}: not a Secrets Manager secret name or ARN: {secret_id!r}")
    else:
        match = _GCP_SECRET_ID.match(secret_id)
        if not match:
            raise ConfigError(f"{where}: must be projects/<project>/secrets/<secret>, got {secret_id!r}")
        if match["project"] != location:
            raise ConfigError(f"{where}: the secret is in project {match['project']!r}, the config's project is {location!r}")


def split_object_url(url: str, scheme: str) -> tuple[str, str]:
    """`s3://bucket/key` or `gs://bucket/object` -> (bucket, key); ValueError says what is wrong."""
    prefix = f"{scheme}://"
    if not url.startswith(prefix):
        raise ValueError(f"must start with {prefix}, got {url!r}")
    bucket, _, key = url[len(prefix) :].partition("/")
    if not _BUCKET.match(bucket):
        raise ValueError(f"not a bucket name: {bucket!r}")
    if not key or key.endswith("/"):
        raise ValueError(f"names no object: {url!r}")
    return bucket, key


def load_config(path: Path) -> BootConfig:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise ConfigError(f"cannot read: {error.strerror}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"not valid JSON: {error}") from None
    return parse_config(raw)


# --- retries --------------------------------------------------------------------------------------------

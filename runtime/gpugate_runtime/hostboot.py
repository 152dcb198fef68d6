#!/usr/bin/env python3
"""A VM host's first-boot fetch of its bundle and secrets, with the instance's own identity.

    python3 hostboot.py --config /etc/gpugate/boot.json [--retry-seconds 60]

cloud-init runs this file on first boot, before any virtualenv exists, so it uses the Python standard
library only, plus boto3 from Debian's `python3-boto3` on AWS (bookworm: boto3 1.26 / botocore 1.29).
It ships in gpugate-runtime and is embedded verbatim in user data; it must stay one standalone file.

What it does, safe to re-run:
1. downloads the bundle archive (s3:// or gs://) to a temporary file and checks its sha256 against the
   config: a mismatch changes nothing on the host;
2. extracts it (regular files and directories only, no absolute paths, no `..`) into
   `<dest>/.bundles/<sha256>/` and swaps it in with one rename of the symlink `<dest>/.bundles/current`;
   each top-level entry of the bundle is a stable link `<dest>/<name> -> .bundles/current/<name>`, so
   `/etc/gpugate/Caddyfile` keeps its path and every file changes at once. `<dest>/secrets/` and the
   config file are real entries of `<dest>` and never part of the swap. The previous bundle is kept
   (`.bundles/previous`) for a rollback by hand; older ones are removed;
3. writes each secret atomically, mode 0600, into `<dest>/secrets` (mode 0700).

Credentials come from the instance: the IAM instance role through the EC2 metadata service (boto3's
own chain), or the service account's token from the GCE metadata server. Right after boot these can
lag (role propagation, metadata server warming up) and Pulumi may still be writing the object or a
secret's first version, so every fetch is retried with backoff until --retry-seconds have passed
since start. Logs (stderr) name what was fetched with sizes, the bundle's sha256 and each secret's
version, never a secret's value.

Exit status: 0 done, 1 a fetch, check or install failed, 2 bad config.

Endpoint overrides, for emulators (unset on a real host): AWS_ENDPOINT_URL, AWS_ENDPOINT_URL_S3 and
AWS_ENDPOINT_URL_SECRETS_MANAGER (the standard names; bookworm's botocore predates them, so this script
reads them itself); AWS_EC2_METADATA_SERVICE_ENDPOINT (botocore reads it); GCE_METADATA_HOST and
STORAGE_EMULATOR_HOST (the standard Google names); GPUGATE_SECRETMANAGER_ENDPOINT (gpugate's own, a
base URL replacing https://secretmanager.googleapis.com: Google defines no variable for it).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
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


def with_retries(what: str, attempt: Callable[[], T], deadline: float, *, retry_not_found: bool = True) -> T:
    """Run attempt() until it succeeds, it fails for good, MAX_ATTEMPTS are spent, or the deadline
    (time.monotonic()) passes; the first attempt always runs. Backoff 1, 2, 4, 8, 10, 10... seconds."""
    delay = 1.0
    for number in range(1, MAX_ATTEMPTS + 1):
        try:
            return attempt()
        except FetchError as error:
            left = deadline - time.monotonic()
            final = not error.retryable or (isinstance(error, NotFound) and not retry_not_found)
            if final or number == MAX_ATTEMPTS or left <= 0:
                raise
            wait = min(delay, left, MAX_BACKOFF_SECONDS)
            log.warning("%s: attempt %d failed (%s); retrying in %.1fs", what, number, error, wait)
            time.sleep(wait)
            delay *= 2
    raise AssertionError("unreachable: the loop returns or raises")


# --- AWS ------------------------------------------------------------------------------------------------


class Aws:
    """S3 and Secrets Manager through boto3, with credentials from boto3's chain (the instance role)."""

    def __init__(self, region: str) -> None:
        try:
            # Imported here: only AWS hosts have boto3 (Debian's python3-boto3).
            import boto3
            import botocore.config
            import botocore.exceptions
        except ImportError as error:
            raise FetchError(f"boto3 is not importable ({error}); install Debian's python3-boto3", retryable=False) from None
        self._botocore = botocore
        self._session = boto3.session.Session()
        self.region = region
        # The transport errors of botocore's HTTP stack, to retry them like any other.
        self._transient: tuple[type[BaseException], ...] = (botocore.exceptions.BotoCoreError, OSError)
        with contextlib.suppress(ImportError):
            import urllib3.exceptions  # a dependency of botocore

            self._transient += (urllib3.exceptions.HTTPError,)

    def _client(self, service: str, env_suffix: str) -> Any:
        endpoint = os.environ.get(f"AWS_ENDPOINT_URL_{env_suffix}") or os.environ.get("AWS_ENDPOINT_URL") or None
        config = self._botocore.config.Config(
            connect_timeout=10,
            read_timeout=HTTP_TIMEOUT_SECONDS,
            retries={"total_max_attempts": 1, "mode": "standard"},  # with_retries() is the one retry policy
        )
        # A new client each attempt: a client keeps the credentials it was made with, or their absence
        # while the instance role is not there yet; the session looks again until it finds some.
        return self._session.client(service, region_name=self.region, endpoint_url=endpoint, config=config)

    def _error(self, what: str, error: BaseException, not_found_codes: tuple[str, ...]) -> FetchError:
        client_error = self._botocore.exceptions.ClientError
        if isinstance(error, client_error):
            details = error.response.get("Error", {})
            code, message = details.get("Code", "?"), details.get("Message", "")
            status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "?")
            kind = NotFound if code in not_found_codes else FetchError
            return kind(f"{what}: {code} (HTTP {status}) {_one_line(message)}".rstrip())
        return FetchError(f"{what}: {type(error).__name__}: {_one_line(str(error))}")

    def download(self, url: str, out: Sink) -> None:
        bucket, key = split_object_url(url, "s3")
        try:
            body = self._client("s3", "S3").get_object(Bucket=bucket, Key=key)["Body"]
            for chunk in iter(lambda: body.read(CHUNK), b""):
                out.write(chunk)
        except (self._botocore.exceptions.ClientError, *self._transient) as error:
            raise self._error(url, error, ("NoSuchKey", "NoSuchBucket")) from None

    def secret(self, ref: SecretRef) -> tuple[bytes, str]:
        try:
            response = self._client("secretsmanager", "SECRETS_MANAGER").get_secret_value(SecretId=ref.id)
        except (self._botocore.exceptions.ClientError, *self._transient) as error:
            raise self._error(f"secret {ref.name} ({ref.id})", error, ("ResourceNotFoundException",)) from None
        # A secret holds a string (what Pulumi's SecretVersion.secret_string writes) or bytes.
        value = response["SecretString"].encode("utf-8") if "SecretString" in response else response["SecretBinary"]
        return value, str(response.get("VersionId", "?"))


# --- GCP ------------------------------------------------------------------------------------------------


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    # A redirect would carry the bearer token to wherever it points; none of these APIs redirects.
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), which Secret Manager sends with every payload (the stdlib has only CRC-32)."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


class Gcp:
    """GCS (JSON API) and Secret Manager (REST) with the service account's token from the metadata server."""

    def __init__(self, project: str) -> None:
        self.project = project
        self.metadata = "http://" + (os.environ.get("GCE_METADATA_HOST") or GCE_METADATA_DEFAULT_HOST)
        storage = os.environ.get("STORAGE_EMULATOR_HOST") or GCS_DEFAULT_ENDPOINT
        self.storage = storage if "://" in storage else f"http://{storage}"
        self.secretmanager = (os.environ.get(ENV_SECRETMANAGER_ENDPOINT) or SECRETMANAGER_DEFAULT_ENDPOINT).rstrip("/")
        # The metadata server is link-local: never through a proxy. The Google APIs honour the usual proxy variables.
        self._metadata_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirects)
        self._api_opener = urllib.request.build_opener(_NoRedirects)

    def _open(self, opener: urllib.request.OpenerDirector, what: str, url: str, headers: dict[str, str]) -> Any:
        request = urllib.request.Request(url, headers=headers)
        try:
            return opener.open(request, timeout=HTTP_TIMEOUT_SECONDS)
        except urllib.error.HTTPError as error:
            kind = NotFound if error.code == 404 else FetchError
            raise kind(f"{what}: HTTP {error.code} {_google_error_message(error)}".rstrip()) from None
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise FetchError(f"{what}: {reason}") from None

    def _token(self) -> str:
        what = "service account token from the metadata server"
        with self._open(self._metadata_opener, what, self.metadata + GCE_TOKEN_PATH, {"Metadata-Flavor": "Google"}) as response:
            if response.headers.get("Metadata-Flavor") != "Google":
                raise FetchError(f"{what}: the answer lacks 'Metadata-Flavor: Google'; not a metadata server")
            try:
                return str(json.loads(response.read())["access_token"])
            except (ValueError, KeyError, TypeError):
                raise FetchError(f"{what}: the answer has no access_token") from None

    def download(self, url: str, out: Sink) -> None:
        bucket, name = split_object_url(url, "gs")
        api = f"{self.storage}/storage/v1/b/{urllib.parse.quote(bucket, safe='')}/o/{urllib.parse.quote(name, safe='')}?alt=media"
        with self._open(self._api_opener, url, api, {"Authorization": f"Bearer {self._token()}"}) as response:
            try:
                shutil.copyfileobj(response, out, CHUNK)
            except OSError as error:
                raise FetchError(f"{url}: download interrupted: {error}") from None

    def secret(self, ref: SecretRef) -> tuple[bytes, str]:
        what = f"secret {ref.name} ({ref.id})"
        url = f"{self.secretmanager}/v1/{ref.id}/versions/latest:access"
        with self._open(self._api_opener, what, url, {"Authorization": f"Bearer {self._token()}"}) as response:
            try:
                document = json.loads(response.read())
                payload = document["payload"]
                value = base64.b64decode(payload["data"], validate=True)
            except (ValueError, KeyError, TypeError):
                raise FetchError(f"{what}: the answer has no payload.data in base64") from None
        expected = payload.get("dataCrc32c")
        if expected is not None and int(expected) != crc32c(value):
            raise FetchError(f"{what}: the payload fails its CRC32C check (damaged in transit)")
        version = str(document.get("name", "")).rpartition("/")[2] or "?"
        return value, version


def _google_error_message(error: urllib.error.HTTPError) -> str:
    # Google APIs answer {"error": {"status": ..., "message": ...}}; an error never carries a secret's payload.
    try:
        details = json.loads(error.read())["error"]
        return _one_line(f"{details.get('status', '')} {details.get('message', '')}")
    except (ValueError, KeyError, TypeError, OSError):
        return _one_line(str(error.reason))


def _one_line(text: str, limit: int = 300) -> str:
    """An error text as one log line of bounded length (some servers answer with a whole XML or HTML page)."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- install --------------------------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def extract_bundle(archive: Path, into: Path) -> list[str]:
    """Extract a tar.gz into the new, empty directory `into`: regular files (0644) and directories (0755)
    only; any link, device or unsafe path refuses the whole archive. Returns the files' paths."""
    files: list[str] = []
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                try:
                    path = check_bundle_path(member.name)
                except ValueError as error:
                    raise FetchError(f"bundle refused: {error}", retryable=False) from None
                target = into / path
                if member.isdir():
                    target.mkdir(mode=0o755, parents=True, exist_ok=True)
                    continue
                if not member.isreg():
                    kind = "link" if member.issym() or member.islnk() else "special file"
                    raise FetchError(f"bundle refused: {member.name!r} is a {kind}; only files and directories", retryable=False)
                target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
                source = tar.extractfile(member)
                assert source is not None  # a regular member always has data
                # O_EXCL|O_NOFOLLOW: a duplicate member or anything already there is an error, never overwritten.
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
                with os.fdopen(fd, "wb") as out:
                    shutil.copyfileobj(source, out, CHUNK)
                    out.flush()
                    os.fsync(out.fileno())
                os.chmod(target, 0o644)  # whatever the umask
                files.append(path)
        # Directories made along the way got the umask's mode; the services (other users) must read them.
        for directory, _, _ in os.walk(into):
            os.chmod(directory, 0o755)
    except (tarfile.TarError, EOFError, OSError) as error:
        raise FetchError(f"bundle refused: cannot extract: {error}", retryable=False) from None
    return files


def _our_link(dest: Path, name: str) -> bool:
    path = dest / name
    return path.is_symlink() and os.readlink(path) == f"{BUNDLES_DIRNAME}/{CURRENT_LINK}/{name}"


def _replace_link(link: Path, target: str) -> None:
    temporary = link.with_name(f".{link.name}.new")
    with contextlib.suppress(FileNotFoundError):
        temporary.unlink()
    os.symlink(target, temporary)
    os.replace(temporary, link)  # rename(2): readers see the old link or the new one, never neither


def install_bundle(config: BootConfig, cloud: Aws | Gcp, deadline: float) -> None:
    dest, sha = config.dest, config.bundle_sha256
    bundles = dest / BUNDLES_DIRNAME
    current = bundles / CURRENT_LINK
    installed = bundles / sha
    previous_target = os.readlink(current) if current.is_symlink() else None
    if installed.is_dir():
        # A directory is renamed to its sha only after a verified download was completely extracted.
        log.info("bundle %s: already on the host, nothing fetched", sha)
    else:
        with tempfile.TemporaryDirectory(dir=bundles, prefix=".fetch-") as scratch:
            archive = Path(scratch) / "bundle.tar.gz"

            def fetch() -> int:
                digest = hashlib.sha256()
                with archive.open("wb") as out:
                    cloud.download(config.bundle_url, _HashingWriter(out, digest))
                size = archive.stat().st_size
                actual = digest.hexdigest()
                if actual != sha:
                    raise FetchError(
                        f"{config.bundle_url}: sha256 mismatch: expected {sha}, got {actual} ({size} bytes);"
                        " the installed bundle is unchanged"
                    )
                return size

            size = with_retries(f"bundle {config.bundle_url}", fetch, deadline)
            log.info("bundle %s: fetched %d bytes, sha256 %s (as expected)", config.bundle_url, size, sha)
            staging = Path(scratch) / "tree"
            staging.mkdir()
            files = extract_bundle(archive, staging)
            os.rename(staging, installed)
            _fsync_dir(bundles)
            log.info("bundle %s: %d files extracted into %s", sha, len(files), installed)

    names = sorted(entry.name for entry in installed.iterdir())
    for name in names:
        if name in RESERVED_TOP_LEVEL:
            raise FetchError(f"bundle refused: top-level {name!r} is reserved on the host", retryable=False)
        path = dest / name
        if path.is_symlink() or path.exists():
            if not _our_link(dest, name):
                raise FetchError(f"bundle refused: {path} exists and is not the bundle's link; move it away first", retryable=False)
        else:
            # Points through `current`: dangles until the swap below when the name is new.
            os.symlink(f"{BUNDLES_DIRNAME}/{CURRENT_LINK}/{name}", path)
    if previous_target not in (None, sha):
        _replace_link(bundles / PREVIOUS_LINK, previous_target)
    _replace_link(current, sha)
    _fsync_dir(bundles)
    for entry in sorted(dest.iterdir()):
        if entry.name not in names and _our_link(dest, entry.name):
            entry.unlink()
            log.info("bundle %s: %s is gone from the bundle; its link is removed", sha, entry.name)
    _fsync_dir(dest)
    # Keep the current and the previous bundle; drop older ones and what a crashed run left behind.
    keep = {sha}
    if (bundles / PREVIOUS_LINK).is_symlink():
        keep.add(os.readlink(bundles / PREVIOUS_LINK))
    for entry in sorted(bundles.iterdir()):
        if entry.is_dir() and not entry.is_symlink() and entry.name not in keep:
            shutil.rmtree(entry)
            log.info("bundle %s: removed %s", sha, entry)
    if previous_target == sha:
        log.info("bundle %s: installed (unchanged)", sha)
    else:
        log.info("bundle %s: installed (was %s)", sha, previous_target or "none")


class _HashingWriter:
    """A binary file wrapper that feeds everything written through a hash."""

    def __init__(self, out: Sink, digest: Any) -> None:
        self._out, self._digest = out, digest

    def write(self, data: bytes) -> object:
        self._digest.update(data)
        return self._out.write(data)


def ensure_secrets_dir(path: Path) -> None:
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    if not stat.S_ISDIR(os.lstat(path).st_mode):
        raise FetchError(f"{path} is not a directory", retryable=False)
    os.chmod(path, 0o700)


def write_secret(path: Path, value: bytes) -> bool:
    """Write atomically with mode 0600; False when the file already held exactly this value."""
    with contextlib.suppress(OSError):
        st = os.lstat(path)
        if stat.S_ISREG(st.st_mode) and path.read_bytes() == value:
            os.chmod(path, 0o600)
            return False
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mkstemp: mode 0600
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(value)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    _fsync_dir(path.parent)
    return True


def install_secrets(config: BootConfig, cloud: Aws | Gcp, deadline: float) -> list[str]:
    """Fetch and write every secret; returns the error of each one that failed (all are tried)."""
    ensure_secrets_dir(config.secrets_dir)
    failures: list[str] = []
    for ref in config.secrets:
        try:
            # A missing optional secret is final at once; a missing required one may still be on its way.
            value, version = with_retries(
                f"secret {ref.name}", functools.partial(cloud.secret, ref), deadline, retry_not_found=not ref.optional
            )
        except NotFound as error:
            if not ref.optional:
                failures.append(f"required secret {ref.name} not found: {error}")
                continue
            log.info("secret %s (%s): not found; optional, skipped", ref.name, ref.id)
            if ref.file.exists():
                ref.file.unlink()  # a stale value must not outlive its secret
                log.info("secret %s: removed the stale %s", ref.name, ref.file)
            continue
        except FetchError as error:
            failures.append(f"secret {ref.name}: {error}")
            continue
        changed = write_secret(ref.file, value)
        log.info(
            "secret %s (%s): version %s, %d bytes, %s %s (0600)",
            ref.name, ref.id, version, len(value), "written to" if changed else "unchanged in", ref.file,
        )
    return failures


@contextlib.contextmanager
def _locked(bundles: Path):  # type: ignore[no-untyped-def]
    """One run at a time (cloud-init and someone re-running it by hand)."""
    with open(bundles / LOCK_FILE, "a") as handle:
        give_up = time.monotonic() + LOCK_WAIT_SECONDS
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > give_up:
                    raise FetchError(f"another run holds {bundles / LOCK_FILE}", retryable=False) from None
                time.sleep(1)
        yield


def run(config: BootConfig, retry_seconds: float) -> int:
    deadline = time.monotonic() + retry_seconds
    log.info(
        "%s %s: bundle %s (sha256 %s), %d secrets into %s",
        config.cloud, config.location, config.bundle_url, config.bundle_sha256, len(config.secrets), config.secrets_dir,
    )
    try:
        cloud: Aws | Gcp = Aws(config.location) if config.cloud == "aws" else Gcp(config.location)
        os.makedirs(config.dest / BUNDLES_DIRNAME, exist_ok=True)
        for directory in (config.dest, config.dest / BUNDLES_DIRNAME):
            os.chmod(directory, 0o755)  # whatever the umask: the services read the bundle through both
        with _locked(config.dest / BUNDLES_DIRNAME):
            install_bundle(config, cloud, deadline)
            failures = install_secrets(config, cloud, deadline)
    except FetchError as error:
        log.error("%s", error)
        return EXIT_FETCH
    except OSError as error:
        log.error("cannot write under %s: %s", config.dest, error)
        return EXIT_FETCH
    for failure in failures:
        log.error("%s", failure)
    if failures:
        return EXIT_FETCH
    log.info("done: bundle %s and %d secrets in place", config.bundle_sha256, len(config.secrets))
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True, help="the boot config (JSON), e.g. /etc/gpugate/boot.json")
    parser.add_argument(
        "--retry-seconds", type=float, default=DEFAULT_RETRY_SECONDS,
        help=f"keep retrying failed fetches this long after start (default {DEFAULT_RETRY_SECONDS:.0f})",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="gpugate-hostboot: %(levelname)s %(message)s", stream=sys.stderr)
    # botocore's INFO lines are noise except the one naming where the credentials came from (the instance role).
    for name in ("botocore", "boto3", "urllib3", "s3transfer"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("botocore.credentials").setLevel(logging.INFO)
    if args.retry_seconds < 0:
        log.error("--retry-seconds: must be 0 or more, got %s", args.retry_seconds)
        return EXIT_CONFIG
    try:
        config = load_config(args.config)
    except ConfigError as error:
        log.error("config %s: %s", args.config, error)
        return EXIT_CONFIG
    return run(config, args.retry_seconds)


if __name__ == "__main__":
    sys.exit(main())

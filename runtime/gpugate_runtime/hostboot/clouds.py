"""Fetching with the instance's identity: S3 and Secrets Manager (boto3), Cloud Storage and Secret Manager (metadata token)."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any

from .config import (
    CHUNK,
    ENV_SECRETMANAGER_ENDPOINT,
    GCE_METADATA_DEFAULT_HOST,
    GCE_TOKEN_PATH,
    GCS_DEFAULT_ENDPOINT,
    HTTP_TIMEOUT_SECONDS,
    MAX_ATTEMPTS,
    MAX_BACKOFF_SECONDS,
    SECRETMANAGER_DEFAULT_ENDPOINT,
    FetchError,
    NotFound,
    SecretRef,
    Sink,
    T,
    log,
    split_object_url,
)


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

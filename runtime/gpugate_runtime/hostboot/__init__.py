"""A VM host's first-boot fetch of its bundle and secrets, with the instance's own identity.

    PYTHONPATH=/usr/local/lib/gpugate python3 -m gpugate_hostboot --config /etc/gpugate/boot.json [--retry-seconds 60]

cloud-init runs this package on first boot, before any virtualenv exists, so it uses the Python standard
library only, plus boto3 from Debian's `python3-boto3` on AWS (bookworm: boto3 1.26 / botocore 1.29).
It ships in gpugate-runtime (as gpugate_runtime.hostboot) and its files are embedded verbatim in user
data (as the top-level package gpugate_hostboot): its modules import each other relatively and nothing
else of gpugate_runtime.

config.py reads the boot config, clouds.py fetches, install.py puts what was fetched in place.

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

from .config import (
    ENV_SECRETMANAGER_ENDPOINT,
    GCE_TOKEN_PATH,
    SECRETS_DIRNAME,
    ConfigError,
    FetchError,
    check_bundle_path,
    parse_config,
    split_object_url,
)
from .install import extract_bundle, main

__all__ = [
    "ENV_SECRETMANAGER_ENDPOINT",
    "GCE_TOKEN_PATH",
    "SECRETS_DIRNAME",
    "ConfigError",
    "FetchError",
    "check_bundle_path",
    "extract_bundle",
    "main",
    "parse_config",
    "split_object_url",
]

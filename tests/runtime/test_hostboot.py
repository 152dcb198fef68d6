"""The VM host's boot script fetches the bundle and the secrets with the instance's identity, run as
cloud-init runs it: `python3 hostboot.py --config /etc/gpugate/boot.json`, a lone file in a fresh process.

What these tests prove, and what they cannot:
- AWS runs against moto's real HTTP server (S3 and Secrets Manager wire protocols, boto3's real
  signing and error parsing). The instance role is boto3's real credential chain reading a small
  IMDSv2 server written here (moto has none) that follows the documented paths. One test turns on
  moto's IAM enforcement: the role's policy allows s3:GetObject on the one object and
  secretsmanager:GetSecretValue, nothing else, and the boot still works. moto checks S3 policies
  against the object's ARN but Secrets Manager calls only against "*", so "those secrets and no
  others" is not proven here; neither is real IAM propagation time.
- One run uses Debian bookworm's own python3-boto3/python3-botocore (the .debs from the apt
  mirror, unpacked) under Debian's /usr/bin/python3: what a bookworm VM runs.
- GCP: GCS is gcp-storage-emulator (the JSON API's `alt=media` download, URL-encoded object names);
  it does not check the bearer token. The metadata server and Secret Manager have no emulator: a
  small server here follows the documented REST shapes (token JSON, `Metadata-Flavor`, the
  `versions/latest:access` answer with base64 data and CRC32C, Google's error JSON). It proves the
  script speaks those shapes and handles their errors, not that Google answers exactly so, nor
  anything about IAM on GCP.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tarfile
import threading
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import boto3
import pytest

from gpugate.render.archive import archive
from gpugate_runtime import hostboot
from gpugate_runtime.contract.host import HostLayout

from tests.conftest import running_moto

REGION = "eu-west-1"
GCP_PROJECT = "gpugate-test"
RUN_TIMEOUT_S = 120
HOSTBOOT = Path(hostboot.__file__).parent  # the package's directory

BUNDLE_V1 = {
    "Caddyfile": b"# v1\n:443 { respond ok }\n",
    "prometheus/prometheus.yml": b"global: {scrape_interval: 15s}\n",
    "systemd/gpugate-authz.service": b"[Service]\nExecStart=/bin/true\n",
    "wheels/gpugate_runtime-0.1.0-py3-none-any.whl": bytes(range(256)) * 64,
    "requirements.lock": b"pydantic==2.9.2 --hash=sha256:" + b"0" * 64 + b"\n",
}
BUNDLE_V2 = {
    "Caddyfile": b"# v2\n:443 { respond ok }\n",
    "prometheus/prometheus.yml": b"global: {scrape_interval: 30s}\n",
    "alertmanager/alertmanager.yml": b"route: {receiver: default}\n",
}
VLLM_KEY = "vllm-3f1c9a7e5b2d4c6e8f0a1b3c5d7e9f10"
ALERT_CREDENTIAL = "https://hooks.slack.com/services/T000/B000/XXXXXXXXXXXXXXXXXXXXXXXX"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- the host ---------------------------------------------------------------------------------------------


@dataclass
class Host:
    """A host's file system under tmp_path: the destination /etc/gpugate with boot.json in it, as user data writes it."""

    root: Path
    env: dict[str, str]
    python: list[str] = field(default_factory=lambda: [sys.executable, "-I"])

    @property
    def layout(self) -> HostLayout:
        return HostLayout(self.root)

    @property
    def dest(self) -> Path:
        return self.layout.etc

    @property
    def config_path(self) -> Path:
        return self.dest / "boot.json"

    def write_config(self, config: Mapping[str, Any]) -> None:
        self.dest.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(config, indent=2))

    def command(self, retry_seconds: float = 0) -> list[str]:
        """The boot package as cloud-init runs it: its files copied where user data puts them, as the top-level
        package gpugate_hostboot, in a fresh interpreter that sees nothing else of gpugate_runtime."""
        lib = self.root / "usr" / "local" / "lib" / "gpugate"
        package = lib / "gpugate_hostboot"
        package.mkdir(parents=True, exist_ok=True)
        for source in HOSTBOOT.glob("*.py"):
            shutil.copyfile(source, package / source.name)
        return [
            *self.python,
            "-c",
            f"import sys; sys.path.insert(0, {str(lib)!r}); import runpy; runpy.run_module('gpugate_hostboot', run_name='__main__')",
            "--config",
            str(self.config_path),
            "--retry-seconds",
            str(retry_seconds),
        ]

    def boot(self, retry_seconds: float = 0) -> subprocess.CompletedProcess[str]:
        # umask 077, a hardened host's: the modes the services need must not depend on the umask.
        return subprocess.run(
            self.command(retry_seconds), env=self.env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, umask=0o077
        )

    def files(self) -> dict[str, bytes]:
        """The bundle as a service on the host reads it: every file reached through <dest>/<name>."""
        found = {}
        for directory, dirnames, filenames in os.walk(self.dest, followlinks=True):
            relative = Path(directory).relative_to(self.dest)
            if relative == Path("."):
                dirnames[:] = [d for d in dirnames if d not in (".bundles", "secrets")]
                filenames = [f for f in filenames if f != "boot.json"]
            found.update({str(relative / name): (Path(directory) / name).read_bytes() for name in filenames})
        return found


def base_env(home: Path) -> dict[str, str]:
    return {"PATH": os.environ["PATH"], "HOME": str(home), "LANG": "C.UTF-8"}


def assert_secret_file(path: Path, value: str) -> None:
    assert path.read_text() == value
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def assert_no_secret_in(result: subprocess.CompletedProcess[str], *values: str) -> None:
    for value in values:
        assert value not in result.stdout + result.stderr


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def unsafe_archive(add: Callable[[tarfile.TarFile], None]) -> bytes:
    """A tar.gz with one good file and whatever `add` puts in (what the writer would never produce)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w:gz") as tar:
        good = tarfile.TarInfo("Caddyfile")
        good.size = 3
        tar.addfile(good, io.BytesIO(b"ok\n"))
        add(tar)
    return raw.getvalue()


def member(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"pwned\n", linkname: str = "") -> Callable[[tarfile.TarFile], None]:
    def add(tar: tarfile.TarFile) -> None:
        info = tarfile.TarInfo(name)
        info.type = kind
        info.linkname = linkname
        info.size = len(data) if kind == tarfile.REGTYPE else 0
        tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)

    return add


# --- AWS: moto's server ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    with running_moto() as endpoint:
        yield endpoint


ROOT_CREDENTIALS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}


class AwsAccount:
    """Creates what the Pulumi program creates (bucket + object, Secret + SecretVersion), through moto's API."""

    def __init__(self, endpoint: str, **credentials: str) -> None:
        self.endpoint = endpoint
        self.prefix = f"t{uuid.uuid4().hex[:12]}"  # moto's state lives as long as the server: names are per test
        self.bucket = f"{self.prefix}-bundles"
        credentials = credentials or ROOT_CREDENTIALS
        self.s3 = boto3.client("s3", region_name=REGION, endpoint_url=endpoint, **credentials)
        self.secretsmanager = boto3.client("secretsmanager", region_name=REGION, endpoint_url=endpoint, **credentials)
        self.s3.create_bucket(Bucket=self.bucket, CreateBucketConfiguration={"LocationConstraint": REGION})

    def put_bundle(self, data: bytes) -> str:
        key = f"bundles/{sha256(data)}.tar.gz"
        self.s3.put_object(Bucket=self.bucket, Key=key, Body=data)
        return f"s3://{self.bucket}/{key}"

    def secret(self, name: str, value: str | None) -> str:
        """A Secret, and its first version unless value is None (Pulumi has not written it yet); returns the ARN."""
        arn = self.secretsmanager.create_secret(Name=f"{self.prefix}/{name}")["ARN"]
        if value is not None:
            self.secretsmanager.put_secret_value(SecretId=arn, SecretString=value)
        return arn

    def missing_secret_arn(self, name: str) -> str:
        return f"arn:aws:secretsmanager:{REGION}:123456789012:secret:{self.prefix}/{name}-AbCdEf"


@pytest.fixture
def aws(moto_endpoint: str) -> AwsAccount:
    return AwsAccount(moto_endpoint)


@pytest.fixture
def aws_host(tmp_path: Path, moto_endpoint: str) -> Host:
    env = base_env(tmp_path) | {
        "AWS_ENDPOINT_URL": moto_endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"),
        # Never probe 169.254.169.254 from this machine.
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    return Host(tmp_path / "host", env)


def aws_config(host: Host, url: str, sha: str, secrets: list[dict[str, Any]]) -> dict[str, Any]:
    return {"cloud": "aws", "region": REGION, "bundle_url": url, "bundle_sha256": sha, "dest": str(host.dest), "secrets": secrets}


def secret_entry(host: Host, name: str, secret_id: str, optional: bool = False) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": name, "id": secret_id, "file": str(host.layout.secrets / name)}
    if optional:
        entry["optional"] = True
    return entry


def boot_v1(host: Host, aws: AwsAccount) -> subprocess.CompletedProcess[str]:
    data = archive(BUNDLE_V1)
    secrets = [
        secret_entry(host, "vllm_api_key", aws.secret("vllm", VLLM_KEY)),
        secret_entry(host, "alert_credential", aws.secret("alert", ALERT_CREDENTIAL)),
    ]
    host.write_config(aws_config(host, aws.put_bundle(data), sha256(data), secrets))
    return host.boot()


@pytest.mark.e2e
def test_first_boot_installs_the_bundle_and_the_secrets(aws_host: Host, aws: AwsAccount) -> None:
    result = boot_v1(aws_host, aws)

    assert result.returncode == 0, result.stderr
    assert aws_host.files() == BUNDLE_V1
    assert aws_host.layout.bundle_file("Caddyfile").read_bytes() == BUNDLE_V1["Caddyfile"]
    assert_secret_file(aws_host.layout.vllm_key_file, VLLM_KEY)
    assert_secret_file(aws_host.layout.alert_secret_file, ALERT_CREDENTIAL)
    # What was installed is what was checked: the archive's sha256 names the bundle and is logged.
    bundle_sha = sha256(archive(BUNDLE_V1))
    assert os.readlink(aws_host.dest / ".bundles" / "current") == bundle_sha
    assert f"sha256 {bundle_sha} (as expected)" in result.stderr
    assert "vllm_api_key" in result.stderr and f"{len(VLLM_KEY)} bytes" in result.stderr
    assert_no_secret_in(result, VLLM_KEY, ALERT_CREDENTIAL)
    assert json.loads(aws_host.config_path.read_text())["cloud"] == "aws"  # the config next to the bundle survives
    # Readable by the services' own users, though the boot ran with umask 077.
    bundle_dir = aws_host.dest / ".bundles" / bundle_sha
    modes = {str(p.relative_to(bundle_dir)): stat.S_IMODE(p.stat().st_mode) for p in [bundle_dir, *bundle_dir.rglob("*")]}
    assert len(modes) == len(BUNDLE_V1) + 4  # the files, the tree and its prometheus/ systemd/ wheels/
    assert modes == {name: 0o644 if name in BUNDLE_V1 else 0o755 for name in modes}
    assert stat.S_IMODE(aws_host.dest.stat().st_mode) == stat.S_IMODE((aws_host.dest / ".bundles").stat().st_mode) == 0o755


@pytest.mark.e2e
def test_a_wrong_sha256_is_refused_and_the_installed_bundle_stays(aws_host: Host, aws: AwsAccount) -> None:
    assert boot_v1(aws_host, aws).returncode == 0
    before = sorted(p.name for p in (aws_host.dest / ".bundles").iterdir())
    config = json.loads(aws_host.config_path.read_text())
    tampered = archive(BUNDLE_V2)
    expected = sha256(archive(BUNDLE_V2 | {"Caddyfile": b"# what the operator built\n"}))
    aws_host.write_config(config | {"bundle_url": aws.put_bundle(tampered), "bundle_sha256": expected})

    result = aws_host.boot()

    assert result.returncode == 1
    assert f"expected {expected}, got {sha256(tampered)}" in result.stderr
    assert aws_host.files() == BUNDLE_V1
    assert sorted(p.name for p in (aws_host.dest / ".bundles").iterdir()) == before


@pytest.mark.e2e
@pytest.mark.parametrize("state", ["no such secret", "secret without a version yet"])
def test_a_missing_required_secret_fails_naming_it(aws_host: Host, aws: AwsAccount, state: str) -> None:
    data = archive(BUNDLE_V1)
    missing = aws.missing_secret_arn("alert") if state == "no such secret" else aws.secret("alert", None)
    secrets = [
        secret_entry(aws_host, "vllm_api_key", aws.secret("vllm", VLLM_KEY)),
        secret_entry(aws_host, "alert_credential", missing),
    ]
    aws_host.write_config(aws_config(aws_host, aws.put_bundle(data), sha256(data), secrets))

    result = aws_host.boot(retry_seconds=5)  # counted from start: leaves room for one retry after the boto3 import and the bundle

    assert result.returncode == 1
    assert f"required secret alert_credential not found: secret alert_credential ({missing}): ResourceNotFoundException" in result.stderr
    assert "secret alert_credential: attempt 1 failed" in result.stderr  # it waited for a late SecretVersion
    # The others are still fetched, so a rerun has less to do.
    assert_secret_file(aws_host.layout.vllm_key_file, VLLM_KEY)
    assert not aws_host.layout.alert_secret_file.exists()


@pytest.mark.e2e
def test_a_missing_optional_secret_is_skipped_and_its_stale_file_removed(aws_host: Host, aws: AwsAccount) -> None:
    data = archive(BUNDLE_V1)
    aws_host.layout.secrets.mkdir(parents=True)
    aws_host.layout.alert_secret_file.write_text("revoked credential")
    secrets = [secret_entry(aws_host, "alert_credential", aws.secret("alert", None), optional=True)]
    aws_host.write_config(aws_config(aws_host, aws.put_bundle(data), sha256(data), secrets))

    result = aws_host.boot(retry_seconds=30)

    assert result.returncode == 0, result.stderr
    assert "not found; optional, skipped" in result.stderr
    assert "attempt 1 failed" not in result.stderr  # not found is final for an optional secret: no 30 s wait
    assert not aws_host.layout.alert_secret_file.exists()


@pytest.mark.e2e
def test_a_rerun_changes_nothing_and_fetches_no_bundle(aws_host: Host, aws: AwsAccount) -> None:
    assert boot_v1(aws_host, aws).returncode == 0
    installed = aws_host.dest / ".bundles" / sha256(archive(BUNDLE_V1))
    inode = installed.stat().st_ino
    bucket, key = hostboot.split_object_url(json.loads(aws_host.config_path.read_text())["bundle_url"], "s3")
    aws.s3.delete_object(Bucket=bucket, Key=key)  # a second fetch would now fail

    result = aws_host.boot()

    assert result.returncode == 0, result.stderr
    assert "already on the host, nothing fetched" in result.stderr
    assert "installed (unchanged)" in result.stderr
    assert result.stderr.count("unchanged in") == 2  # both secrets, already current
    assert installed.stat().st_ino == inode
    assert aws_host.files() == BUNDLE_V1
    assert_secret_file(aws_host.layout.vllm_key_file, VLLM_KEY)


@pytest.mark.e2e
def test_two_runs_at_once_both_succeed(aws_host: Host, aws: AwsAccount) -> None:
    data = archive(BUNDLE_V1)
    secrets = [secret_entry(aws_host, "vllm_api_key", aws.secret("vllm", VLLM_KEY))]
    aws_host.write_config(aws_config(aws_host, aws.put_bundle(data), sha256(data), secrets))

    runs = [
        subprocess.Popen(aws_host.command(), env=aws_host.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [run.communicate(timeout=RUN_TIMEOUT_S) for run in runs]

    assert [run.returncode for run in runs] == [0, 0], outputs
    assert sum("already on the host, nothing fetched" in err for _, err in outputs) == 1  # one waited for the other
    assert aws_host.files() == BUNDLE_V1
    assert_secret_file(aws_host.layout.vllm_key_file, VLLM_KEY)


@pytest.mark.e2e
def test_a_new_bundle_is_swapped_in_whole_and_the_previous_one_kept(aws_host: Host, aws: AwsAccount) -> None:
    assert boot_v1(aws_host, aws).returncode == 0
    config = json.loads(aws_host.config_path.read_text())
    v1, v2 = sha256(archive(BUNDLE_V1)), sha256(archive(BUNDLE_V2))
    aws_host.write_config(config | {"bundle_url": aws.put_bundle(archive(BUNDLE_V2)), "bundle_sha256": v2})

    result = aws_host.boot()

    assert result.returncode == 0, result.stderr
    assert aws_host.files() == BUNDLE_V2
    assert not os.path.lexists(aws_host.dest / "wheels")  # a top-level name the new bundle dropped
    bundles = aws_host.dest / ".bundles"
    assert os.readlink(bundles / "current") == v2 and os.readlink(bundles / "previous") == v1
    assert (bundles / v1 / "Caddyfile").read_bytes() == BUNDLE_V1["Caddyfile"]
    assert_secret_file(aws_host.layout.vllm_key_file, VLLM_KEY)  # the secrets dir is outside the swap

    v3_files = BUNDLE_V2 | {"Caddyfile": b"# v3\n"}
    v3 = sha256(archive(v3_files))
    aws_host.write_config(config | {"bundle_url": aws.put_bundle(archive(v3_files)), "bundle_sha256": v3})
    assert aws_host.boot().returncode == 0
    assert sorted(p.name for p in bundles.iterdir() if not p.name.startswith(".")) == sorted([v2, v3, "current", "previous"])


@pytest.mark.e2e
@pytest.mark.parametrize(
    "add, outside",
    [
        (member("../escaped"), "etc/escaped"),
        (member("/tmp-absolute-escape"), None),
        (member("prometheus/../../escaped"), "etc/escaped"),
        (member("link", tarfile.SYMTYPE, linkname="../../../escaped"), None),
        (member("hardlink", tarfile.LNKTYPE, linkname="/etc/passwd"), None),
        (member("secrets/vllm_api_key"), None),
        (member("fifo", tarfile.FIFOTYPE), None),
    ],
    ids=["dotdot", "absolute", "dotdot-inside", "symlink", "hardlink", "reserved-secrets-dir", "fifo"],
)
def test_an_archive_member_that_escapes_is_refused(
    aws_host: Host, aws: AwsAccount, add: Callable[[tarfile.TarFile], None], outside: str | None
) -> None:
    assert boot_v1(aws_host, aws).returncode == 0
    config = json.loads(aws_host.config_path.read_text())
    data = unsafe_archive(add)
    aws_host.write_config(config | {"bundle_url": aws.put_bundle(data), "bundle_sha256": sha256(data)})

    result = aws_host.boot(retry_seconds=5)

    assert result.returncode == 1
    assert "bundle refused" in result.stderr
    assert "attempt 1 failed" not in result.stderr  # a bad archive does not get better by waiting
    assert aws_host.files() == BUNDLE_V1
    assert_secret_file(aws_host.layout.vllm_key_file, VLLM_KEY)
    if outside:
        assert not (aws_host.root / outside).exists()
    assert not Path("/tmp-absolute-escape").exists()


# --- AWS: the instance role ------------------------------------------------------------------------------


class FakeImds:
    """EC2's instance metadata service (IMDSv2) as far as boto3's credential chain uses it: a session
    token, then the role's name and its temporary credentials. The first `not_ready` credential
    lookups answer 404, as right after boot before the instance profile is attached."""

    def __init__(self, role: str, credentials: Mapping[str, str], not_ready: int = 0) -> None:
        self.role, self.credentials, self.not_ready = role, credentials, not_ready
        self.requests: list[str] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, status: int, body: str, content_type: str = "text/plain") -> None:
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_PUT(self) -> None:
                owner.requests.append(f"PUT {self.path}")
                if self.path == "/latest/api/token" and self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
                    self._send(200, "imds-session-token")
                else:
                    self._send(400, "")

            def do_GET(self) -> None:
                owner.requests.append(f"GET {self.path}")
                if self.headers.get("X-aws-ec2-metadata-token") != "imds-session-token":
                    return self._send(401, "")
                prefix = "/latest/meta-data/iam/security-credentials/"
                if not self.path.startswith(prefix):
                    return self._send(404, "")
                if owner.not_ready > 0:
                    owner.not_ready -= 1
                    return self._send(404, "")
                if self.path == prefix:
                    return self._send(200, owner.role)
                if self.path == prefix + owner.role:
                    document = {
                        "Code": "Success",
                        "LastUpdated": "2026-12-01T00:00:00Z",
                        "Type": "AWS-HMAC",
                        "AccessKeyId": owner.credentials["AccessKeyId"],
                        "SecretAccessKey": owner.credentials["SecretAccessKey"],
                        "Token": owner.credentials["SessionToken"],
                        "Expiration": "2099-01-01T00:00:00Z",
                    }
                    return self._send(200, json.dumps(document), "application/json")
                return self._send(404, "")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}/"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeImds:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def instance_role(aws: AwsAccount, statements: list[dict[str, Any]]) -> dict[str, str]:
    """The instance role with an inline policy, and the temporary credentials EC2 would hand the instance."""
    iam = boto3.client("iam", region_name=REGION, endpoint_url=aws.endpoint, **ROOT_CREDENTIALS)
    sts = boto3.client("sts", region_name=REGION, endpoint_url=aws.endpoint, **ROOT_CREDENTIALS)
    trust = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}]}
    role = iam.create_role(RoleName=f"{aws.prefix}-host", AssumeRolePolicyDocument=json.dumps(trust))["Role"]
    iam.put_role_policy(
        RoleName=role["RoleName"], PolicyName="boot", PolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": statements})
    )
    return dict(sts.assume_role(RoleArn=role["Arn"], RoleSessionName="i-0123456789abcdef0")["Credentials"])


def instance_env(host: Host, endpoint: str, imds: FakeImds) -> dict[str, str]:
    return base_env(host.root) | {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_EC2_METADATA_SERVICE_ENDPOINT": imds.endpoint,
        "AWS_CONFIG_FILE": str(host.root / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(host.root / "no-aws-credentials"),
    }


@pytest.fixture
def iam_enforced(moto_endpoint: str) -> Iterator[Callable[[], None]]:
    """Call the yielded function to make moto check every request against IAM; switched off again after the test."""

    def reset_auth(count: str) -> None:
        request = urllib.request.Request(f"{moto_endpoint}/moto-api/reset-auth", data=count.encode(), method="POST")
        request.add_header("Content-Type", "text/plain")  # as a form, Flask would take the body away from moto
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 200

    try:
        yield lambda: reset_auth("0")
    finally:
        reset_auth("inf")


@pytest.mark.e2e
@pytest.mark.parametrize("allowed", ["what the boot needs", "no secretsmanager:GetSecretValue"])
def test_the_instance_role_with_least_privilege_is_enough(
    tmp_path: Path, moto_endpoint: str, aws: AwsAccount, iam_enforced: Callable[[], None], allowed: str
) -> None:
    host = Host(tmp_path / "host", {})
    data = archive(BUNDLE_V1)
    url = aws.put_bundle(data)
    bucket, key = hostboot.split_object_url(url, "s3")
    vllm_arn = aws.secret("vllm", VLLM_KEY)
    statements = [{"Effect": "Allow", "Action": "s3:GetObject", "Resource": f"arn:aws:s3:::{bucket}/{key}"}]
    if allowed == "what the boot needs":
        # moto checks Secrets Manager calls against "*" only, so the secret's ARN cannot be named here.
        statements.append({"Effect": "Allow", "Action": "secretsmanager:GetSecretValue", "Resource": "*"})
    credentials = instance_role(aws, statements)
    host.write_config(aws_config(host, url, sha256(data), [secret_entry(host, "vllm_api_key", vllm_arn)]))
    iam_enforced()
    role_s3 = boto3.client(
        "s3", region_name=REGION, endpoint_url=moto_endpoint, aws_access_key_id=credentials["AccessKeyId"],
        aws_secret_access_key=credentials["SecretAccessKey"], aws_session_token=credentials["SessionToken"],
    )
    with pytest.raises(role_s3.exceptions.ClientError, match="AccessDenied"):
        role_s3.list_objects_v2(Bucket=bucket)  # the check is on: the role may not even list its bucket

    with FakeImds("gpugate-host", credentials, not_ready=2) as imds:
        host.env = instance_env(host, moto_endpoint, imds)
        result = host.boot(retry_seconds=8)

    assert any(r.startswith("GET /latest/meta-data/iam/security-credentials/gpugate-host") for r in imds.requests)
    assert "NoCredentialsError: Unable to locate credentials); retrying" in result.stderr  # the role came late
    assert "Found credentials from IAM Role: gpugate-host" in result.stderr
    if allowed == "what the boot needs":
        assert result.returncode == 0, result.stderr
        assert host.files() == BUNDLE_V1
        assert_secret_file(host.layout.vllm_key_file, VLLM_KEY)
    else:
        assert result.returncode == 1
        # moto answers this one in XML, so botocore finds no error code; AWS sends AccessDeniedException.
        assert f"ERROR secret vllm_api_key: secret vllm_api_key ({vllm_arn}): " in result.stderr
        assert "(HTTP 403)" in result.stderr and "not authorized to perform: secretsmanager:GetSecretValue" in result.stderr
        assert host.files() == BUNDLE_V1  # the bundle was allowed
    assert_no_secret_in(result, VLLM_KEY, credentials["SecretAccessKey"], credentials["SessionToken"])


# --- AWS: Debian bookworm's boto3 ------------------------------------------------------------------------

DEBIAN_PACKAGES = ("python3-boto3", "python3-botocore", "python3-s3transfer", "python3-jmespath", "python3-dateutil", "python3-six")
DEBIAN_PYTHON = Path("/usr/bin/python3")


@pytest.fixture(scope="module")
def bookworm_boto3() -> Path:
    """Debian's own python3-boto3 and its dependencies, unpacked (not installed) from the apt mirror:
    the code a bookworm VM runs. Cached under ~/.cache/gpugate, keyed by the package versions."""
    policy = subprocess.run(["apt-cache", "policy", *DEBIAN_PACKAGES], capture_output=True, text=True, check=True).stdout
    candidates = [line.split()[1] for line in policy.splitlines() if line.strip().startswith("Candidate:")]
    assert len(candidates) == len(DEBIAN_PACKAGES) and "(none)" not in candidates, policy
    key = hashlib.sha256(" ".join(candidates).encode()).hexdigest()[:16]
    root = Path.home() / ".cache" / "gpugate" / f"bookworm-boto3-{key}"
    site = root / "usr" / "lib" / "python3" / "dist-packages"
    if not (site / "boto3").is_dir():
        debs = root.with_name(root.name + ".debs")
        shutil.rmtree(debs, ignore_errors=True)
        debs.mkdir(parents=True)
        os.chmod(debs, 0o777)  # apt-get download runs as the unprivileged _apt user where it can
        subprocess.run(["apt-get", "download", "-q", *DEBIAN_PACKAGES], cwd=debs, check=True, capture_output=True, timeout=300)
        for deb in sorted(debs.glob("*.deb")):
            subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
        shutil.rmtree(debs)
    return site


@pytest.mark.e2e
def test_first_boot_with_debian_bookworm_boto3(tmp_path: Path, moto_endpoint: str, aws: AwsAccount, bookworm_boto3: Path) -> None:
    host = Host(tmp_path / "host", {}, python=[str(DEBIAN_PYTHON), "-s"])
    versions = subprocess.run(
        [str(DEBIAN_PYTHON), "-s", "-c", "import boto3, botocore; print(boto3.__version__, botocore.__version__, botocore.__file__)"],
        env={"PYTHONPATH": str(bookworm_boto3)}, capture_output=True, text=True, check=True,
    ).stdout.split()
    assert versions[0].startswith("1.26.") and versions[1].startswith("1.29."), versions
    assert versions[2].startswith(str(bookworm_boto3))
    data = archive(BUNDLE_V1)
    url = aws.put_bundle(data)
    secrets = [secret_entry(host, "vllm_api_key", aws.secret("vllm", VLLM_KEY))]
    host.write_config(aws_config(host, url, sha256(data), secrets))
    credentials = instance_role(aws, [{"Effect": "Allow", "Action": "*", "Resource": "*"}])

    with FakeImds("gpugate-host", credentials, not_ready=1) as imds:
        host.env = instance_env(host, moto_endpoint, imds) | {"PYTHONPATH": str(bookworm_boto3)}
        result = host.boot(retry_seconds=8)

    assert result.returncode == 0, result.stderr
    assert host.files() == BUNDLE_V1
    assert_secret_file(host.layout.vllm_key_file, VLLM_KEY)
    assert "attempt 1 failed" in result.stderr  # credentials from the (late) instance role, through Debian's botocore


# --- GCP --------------------------------------------------------------------------------------------------


class FakeGoogle:
    """The GCE metadata server's token endpoint and Secret Manager's `access`, as documented:
    https://cloud.google.com/compute/docs/access/authenticate-workloads#applications and
    https://cloud.google.com/secret-manager/docs/reference/rest/v1/projects.secrets.versions/access.
    Secrets are keyed by their short name; `corrupt` names secrets whose CRC32C is sent wrong.
    The first `token_failures` token requests answer 503."""

    TOKEN = "ya29.test-access-token"
    PROJECT_NUMBER = "123456789012"

    def __init__(self, secrets: Mapping[str, str], corrupt: frozenset[str] = frozenset(), token_failures: int = 0) -> None:
        import google_crc32c  # with gcp-storage-emulator: Google's own CRC32C, to check ours against

        self.secrets, self.corrupt, self.token_failures = dict(secrets), corrupt, token_failures
        self.requests: list[tuple[str, dict[str, str]]] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _json(self, status: int, document: Any, headers: Mapping[str, str] = {}) -> None:
                data = json.dumps(document).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _error(self, code: int, status: str, message: str) -> None:
                self._json(code, {"error": {"code": code, "message": message, "status": status}})

            def do_GET(self) -> None:
                owner.requests.append((self.path, dict(self.headers)))
                if self.path == hostboot.GCE_TOKEN_PATH:
                    if self.headers.get("Metadata-Flavor") != "Google":
                        return self._error(403, "PERMISSION_DENIED", "Missing Metadata-Flavor:Google header")
                    if owner.token_failures > 0:
                        owner.token_failures -= 1
                        return self._error(503, "UNAVAILABLE", "metadata server starting")
                    token = {"access_token": owner.TOKEN, "expires_in": 3599, "token_type": "Bearer"}
                    return self._json(200, token, {"Metadata-Flavor": "Google"})
                prefix, suffix = f"/v1/projects/{GCP_PROJECT}/secrets/", "/versions/latest:access"
                if self.path.startswith(prefix) and self.path.endswith(suffix):
                    if self.headers.get("Authorization") != f"Bearer {owner.TOKEN}":
                        return self._error(401, "UNAUTHENTICATED", "Request had invalid authentication credentials.")
                    name = self.path[len(prefix) : -len(suffix)]
                    if name not in owner.secrets:
                        message = f"Secret [projects/{owner.PROJECT_NUMBER}/secrets/{name}] not found or has no versions."
                        return self._error(404, "NOT_FOUND", message)
                    data = owner.secrets[name].encode()
                    crc = google_crc32c.value(data) ^ (1 if name in owner.corrupt else 0)
                    return self._json(200, {
                        "name": f"projects/{owner.PROJECT_NUMBER}/secrets/{name}/versions/3",
                        "payload": {"data": base64.b64encode(data).decode(), "dataCrc32c": str(crc)},
                    })
                return self._error(404, "NOT_FOUND", "no such path")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeGoogle:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def gcs_endpoint() -> Iterator[str]:
    from gcp_storage_emulator.server import create_server

    port = free_port()
    server = create_server("127.0.0.1", port, in_memory=True)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def gcs_put(endpoint: str, bucket: str, name: str, data: bytes) -> str:
    """Create the bucket and upload the object through the JSON API (what Pulumi's BucketObject does)."""
    create = urllib.request.Request(
        f"{endpoint}/storage/v1/b?project={GCP_PROJECT}", data=json.dumps({"name": bucket}).encode(),
        headers={"Content-Type": "application/json"}, method="POST",
    )
    with urllib.request.urlopen(create, timeout=10):
        pass
    upload = urllib.request.Request(
        f"{endpoint}/upload/storage/v1/b/{bucket}/o?uploadType=media&name={urllib.parse.quote(name, safe='')}",
        data=data, headers={"Content-Type": "application/gzip"}, method="POST",
    )
    with urllib.request.urlopen(upload, timeout=10):
        pass
    return f"gs://{bucket}/{name}"


@dataclass
class GcpCase:
    host: Host
    google: FakeGoogle
    url: str
    sha: str


@pytest.fixture
def gcp(tmp_path: Path, gcs_endpoint: str) -> Iterator[Callable[..., GcpCase]]:
    started: list[FakeGoogle] = []

    def make(secrets: Mapping[str, str], **fake: Any) -> GcpCase:
        google = FakeGoogle(secrets, **fake).__enter__()
        started.append(google)
        data = archive(BUNDLE_V1)
        url = gcs_put(gcs_endpoint, f"b{uuid.uuid4().hex[:12]}", f"bundles/{sha256(data)}.tar.gz", data)
        env = base_env(tmp_path) | {
            "GCE_METADATA_HOST": google.host,
            "STORAGE_EMULATOR_HOST": gcs_endpoint,
            hostboot.ENV_SECRETMANAGER_ENDPOINT: f"http://{google.host}",
        }
        return GcpCase(Host(tmp_path / "host", env), google, url, sha256(data))

    yield make
    for google in started:
        google.__exit__()


def gcp_config(case: GcpCase, names: list[str]) -> dict[str, Any]:
    secrets = [secret_entry(case.host, name, f"projects/{GCP_PROJECT}/secrets/gpugate-{name}") for name in names]
    return {
        "cloud": "gcp", "project": GCP_PROJECT, "bundle_url": case.url, "bundle_sha256": case.sha,
        "dest": str(case.host.dest), "secrets": secrets,
    }


@pytest.mark.e2e
def test_gcp_first_boot_uses_the_service_account_token(gcp: Callable[..., GcpCase]) -> None:
    case = gcp({"gpugate-vllm_api_key": VLLM_KEY, "gpugate-alert_credential": ALERT_CREDENTIAL}, token_failures=1)
    case.host.write_config(gcp_config(case, ["vllm_api_key", "alert_credential"]))

    result = case.host.boot(retry_seconds=8)

    assert result.returncode == 0, result.stderr
    assert case.host.files() == BUNDLE_V1
    assert_secret_file(case.host.layout.vllm_key_file, VLLM_KEY)
    assert_secret_file(case.host.layout.alert_secret_file, ALERT_CREDENTIAL)
    assert "metadata server: HTTP 503 UNAVAILABLE" in result.stderr  # the first token request failed and was retried
    assert "version 3" in result.stderr
    accesses = [headers for path, headers in case.google.requests if path.endswith(":access")]
    assert len(accesses) == 2 and all(h["Authorization"] == f"Bearer {FakeGoogle.TOKEN}" for h in accesses)
    assert_no_secret_in(result, VLLM_KEY, ALERT_CREDENTIAL, FakeGoogle.TOKEN)


@pytest.mark.e2e
def test_gcp_a_missing_required_secret_fails_naming_it(gcp: Callable[..., GcpCase]) -> None:
    case = gcp({"gpugate-vllm_api_key": VLLM_KEY})
    case.host.write_config(gcp_config(case, ["vllm_api_key", "alert_credential"]))

    result = case.host.boot(retry_seconds=5)  # counted from start: leaves room for one retry after the boto3 import and the bundle

    assert result.returncode == 1
    assert (
        f"required secret alert_credential not found: secret alert_credential (projects/{GCP_PROJECT}/secrets/gpugate-alert_credential):"
        " HTTP 404 NOT_FOUND" in result.stderr
    )
    assert_secret_file(case.host.layout.vllm_key_file, VLLM_KEY)


@pytest.mark.e2e
def test_gcp_a_payload_failing_its_crc32c_is_not_written(gcp: Callable[..., GcpCase]) -> None:
    case = gcp({"gpugate-vllm_api_key": VLLM_KEY}, corrupt=frozenset({"gpugate-vllm_api_key"}))
    case.host.write_config(gcp_config(case, ["vllm_api_key"]))

    result = case.host.boot()

    assert result.returncode == 1
    assert "secret vllm_api_key" in result.stderr and "CRC32C" in result.stderr
    assert not case.host.layout.vllm_key_file.exists()


# --- config ---------------------------------------------------------------------------------------------

GOOD_CONFIG: dict[str, Any] = {
    "cloud": "aws",
    "region": REGION,
    "bundle_url": "s3://gpugate-bundles/bundles/x.tar.gz",
    "bundle_sha256": "a" * 64,
    "dest": "/etc/gpugate",
    "secrets": [{"name": "vllm_api_key", "id": f"arn:aws:secretsmanager:{REGION}:1:secret:v-AbCdEf", "file": "/etc/gpugate/secrets/vllm_api_key"}],
}


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c.pop("bundle_sha256"), "bundle_sha256: required"),
        (lambda c: c.update(bundle_sha256="A" * 64), "bundle_sha256: must be 64 lowercase hex digits"),
        (lambda c: c.update(cloud="azure"), "cloud: must be 'aws' or 'gcp'"),
        (lambda c: c.update(project="p"), "project: unknown key"),
        (lambda c: c.update(bundle_url="gs://gpugate-bundles/x"), "bundle_url: must start with s3://"),
        (lambda c: c.update(dest="etc/gpugate"), "dest: must be an absolute path"),
        (lambda c: c["secrets"][0].update(file="/tmp/vllm_api_key"), "secrets[0].file: must be a file directly in /etc/gpugate/secrets"),
        (lambda c: c["secrets"][0].update(id="arn:aws:secretsmanager:us-east-1:1:secret:v"), "secrets[0].id: the secret is in region 'us-east-1'"),
        (lambda c: c["secrets"][0].update(optional="yes"), "secrets[0].optional: must be true or false"),
        (lambda c: c["secrets"].append(dict(c["secrets"][0])), "secrets[1].name: 'vllm_api_key' appears twice"),
    ],
    ids=["missing-sha", "uppercase-sha", "cloud", "unknown-key", "wrong-scheme", "relative-dest", "file-outside", "region", "optional", "duplicate"],
)
def test_a_bad_config_exits_2_naming_the_key(tmp_path: Path, change: Callable[[dict[str, Any]], Any], message: str) -> None:
    config = json.loads(json.dumps(GOOD_CONFIG))
    change(config)
    host = Host(tmp_path / "host", base_env(tmp_path))
    host.write_config(config)

    result = host.boot()

    assert result.returncode == 2
    assert f"config {host.config_path}: {message}" in result.stderr
    assert not (tmp_path / "host" / "etc" / "gpugate" / ".bundles").exists()


def test_a_gcp_secret_of_another_project_is_a_config_error(tmp_path: Path) -> None:
    config = {
        "cloud": "gcp", "project": GCP_PROJECT, "bundle_url": "gs://b-1/x", "bundle_sha256": "a" * 64, "dest": "/etc/gpugate",
        "secrets": [{"name": "k", "id": "projects/other-project/secrets/k", "file": "/etc/gpugate/secrets/k"}],
    }
    with pytest.raises(hostboot.ConfigError, match=r"secrets\[0\]\.id: the secret is in project 'other-project'"):
        hostboot.parse_config(config)


def test_the_secrets_dir_is_the_host_layouts() -> None:
    layout = HostLayout(Path("/"))
    assert layout.secrets == layout.etc / hostboot.SECRETS_DIRNAME
    assert layout.vllm_key_file.parent == layout.secrets and layout.alert_secret_file.parent == layout.secrets

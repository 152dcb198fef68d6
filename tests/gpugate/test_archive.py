"""The bundle archive is deterministic: the same files give the same bytes, so its sha256 moves only with a file."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import re
import subprocess
import sys
import tarfile

import pytest

from gpugate.render.archive import archive

FILES = {
    "Caddyfile": b":443 { respond ok }\n",
    "systemd/gpugate-authz.service": b"[Service]\nExecStart=/bin/true\n",
    "prometheus/rules/gateway.yml": b"groups: []\n",
    "wheels/gpugate_runtime-0.1.0-py3-none-any.whl": bytes(range(256)) * 8,
    "requirements.lock": b"",
}

ARCHIVE_IN_ANOTHER_PROCESS = """
import hashlib, json, sys
from gpugate.render.archive import archive
files = {k: v.encode("latin-1") for k, v in json.loads(sys.stdin.read()).items()}
print(hashlib.sha256(archive(files)).hexdigest())
"""


def test_the_same_files_in_any_order_give_the_same_bytes() -> None:
    reordered = dict(reversed(list(FILES.items())))

    assert archive(reordered) == archive(FILES)


def test_the_same_files_give_the_same_bytes_in_another_process_time_zone_and_umask() -> None:
    payload = json.dumps({k: v.decode("latin-1") for k, v in FILES.items()})
    shell = f"umask 077; TZ=Pacific/Kiritimati PYTHONHASHSEED=12345 exec {sys.executable} -c '{ARCHIVE_IN_ANOTHER_PROCESS}'"

    other = subprocess.run(["sh", "-c", shell], input=payload, capture_output=True, text=True, check=True, timeout=60)

    assert other.stdout.strip() == hashlib.sha256(archive(FILES)).hexdigest()


def test_a_changed_byte_changes_the_archive() -> None:
    assert archive(FILES | {"Caddyfile": b":443 { respond OK }\n"}) != archive(FILES)


def test_members_carry_no_time_owner_or_mode_of_the_build_machine() -> None:
    data = archive(FILES)

    assert data[4:8] == b"\0\0\0\0", "gzip header mtime"
    assert data[3] == 0, "gzip header flags: no file name, no comment"
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        members = tar.getmembers()
        contents = {m.name: tar.extractfile(m).read() for m in members}  # type: ignore[union-attr]
    assert [m.name for m in members] == sorted(FILES)
    for m in members:
        assert (m.type, m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) == (tarfile.REGTYPE, 0, 0, 0, "", "", 0o644), m.name
        assert not m.pax_headers, m.name
    assert contents == FILES
    assert len(gzip.decompress(data)) % 512 == 0


def test_a_long_non_ascii_path_survives() -> None:
    name = "dashboards/" + "é" * 120 + ".json"

    with tarfile.open(fileobj=io.BytesIO(archive({name: b"{}"})), mode="r:gz") as tar:
        assert tar.getnames() == [name]


@pytest.mark.parametrize(
    "files, message",
    [
        ({"../Caddyfile": b""}, "'..' parts"),
        ({"/etc/gpugate/Caddyfile": b""}, "must be a relative path"),
        ({"systemd//x.service": b""}, "empty, '.' or '..' parts"),
        ({"./Caddyfile": b""}, "empty, '.' or '..' parts"),
        ({"secrets/vllm_api_key": b""}, "'secrets' is reserved"),
        ({".bundles/x": b""}, "'.bundles' is reserved"),
        ({"systemd/": b""}, "must not end with '/'"),
        ({"systemd": b"", "systemd/x.service": b""}, "'systemd' is a file and also the directory of 'systemd/x.service'"),
        ({"Caddyfile": ":443"}, "content must be bytes"),
    ],
)
def test_a_path_the_host_would_refuse_is_refused_here(files: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        archive(files)

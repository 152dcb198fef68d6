"""Following Caddy's JSON access log: the (key id, request id) of each request as it finishes."""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# The access-log field carrying "<key id> <request id>" (Caddy 2.6 can add no fields of its own,
# so the Caddyfile maps both into `user_id` and renames it).
ACCESS_LOG_IDS_FIELD = "key_and_request_id"
NO_KEY = "-"  # key id placeholder in logs and in the access-log field when no key was accepted

log = logging.getLogger("gpugate_runtime.authz")


class AccessLogTail:
    """Follows Caddy's JSON access log and yields (key id, request id) of each finished request.

    Reads from the end at start (earlier requests are not in flight here), survives Caddy's log
    rolling (a new inode: the old file is drained, the new one read from its start) and truncation.
    `healthy` is False while the file cannot be read.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.healthy = False
        self._fd: int | None = None
        self._ino: int | None = None
        self._rest = b""
        self._field = f'"{ACCESS_LOG_IDS_FIELD}"'.encode()
        # The ids are a key id and a request id Caddy checked (or made): no quote, no escape. Taking
        # them with a regex is a tenth of json.loads of the line, which matters at thousands of
        # lines a second; anything else (an escape) still goes through json.loads.
        self._plain = re.compile(rb'"' + ACCESS_LOG_IDS_FIELD.encode() + rb'":"([^"\\]*)"')

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
        self._fd = None
        self.healthy = False

    def _open(self, from_end: bool) -> None:
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError as exc:
            if self.healthy or self._ino is None:
                log.warning(
                    "access log %s unreadable (%s): concurrency limits are off until it is", self.path, exc.strerror
                )
            self._ino = -1
            self.healthy = False
            return
        if from_end:
            os.lseek(fd, 0, os.SEEK_END)
        self._fd, self._ino, self._rest = fd, os.fstat(fd).st_ino, b""
        if not self.healthy:
            log.info("following access log %s", self.path)
        self.healthy = True

    def check_rotation(self) -> Iterator[tuple[str, str]]:
        if self._fd is None:
            self._open(from_end=self._ino is None)
            return
        try:
            current = os.stat(self.path)
        except OSError:
            return  # rolled away and not yet recreated: keep draining the old file
        if current.st_ino != self._ino:
            yield from self.read()
            self.close()
            self._open(from_end=False)
        elif current.st_size < os.lseek(self._fd, 0, os.SEEK_CUR):
            os.lseek(self._fd, 0, os.SEEK_SET)
            self._rest = b""

    def read(self) -> Iterator[tuple[str, str]]:
        if self._fd is None:
            return
        while chunk := os.read(self._fd, 1 << 16):
            lines = (self._rest + chunk).split(b"\n")
            self._rest = lines.pop()
            for line in lines:
                ids = self._ids(line)
                if ids:
                    yield ids

    def _ids(self, line: bytes) -> tuple[str, str] | None:
        if self._field not in line:
            return None  # not an access-log entry of this gateway
        plain = self._plain.search(line)
        if plain and line.startswith(b"{") and line.rstrip().endswith(b"}"):
            value: Any = plain.group(1).decode("latin-1")
        else:
            try:
                value = json.loads(line).get(ACCESS_LOG_IDS_FIELD)
            except ValueError:
                return None
        if not isinstance(value, str):
            return None
        key_id, _, request_id = value.partition(" ")
        return (key_id, request_id) if key_id and key_id != NO_KEY else None  # NO_KEY: nothing was acquired

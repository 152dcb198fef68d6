"""A client for qemu-guest-agent: JSON commands over the unix socket QEMU connects to the guest's virtio-serial port.

The tests reach the guest through the agent, not through its network, so a broken network in the guest
shows up as a failed assertion, not as a harness that cannot connect.
"""

from __future__ import annotations

import base64
import json
import random
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SYNC_ATTEMPT_S = 2.0  # one guest-sync round; the agent answers in milliseconds once it runs
EXEC_POLL_S = 0.5
READ_CHUNK = 48 * 1024  # guest-file-read's count; answers come back base64-encoded
SOCKET_READ = 65536
DELIMITER = b"\xff"  # guest-sync-delimited: flushes the agent's parser and marks the start of its answer


class GuestAgentError(RuntimeError):
    """The agent did not answer in time, or answered with an error; the message names the command."""


@dataclass(frozen=True)
class ExecResult:
    rc: int
    stdout: str
    stderr: str


class GuestAgent:
    """One connection to the agent socket. Every call is bounded by a timeout."""

    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path
        self._sock: socket.socket | None = None
        self._buffer = b""

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._buffer = b""

    def _connect(self) -> socket.socket:
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(self.socket_path))
            except OSError as exc:
                sock.close()
                raise GuestAgentError(f"cannot connect to the guest agent socket {self.socket_path}: {exc}") from exc
            self._sock = sock
        return self._sock

    def _send(self, payload: bytes) -> None:
        try:
            self._connect().sendall(payload)
        except OSError as exc:
            self.close()
            raise GuestAgentError(f"writing to the guest agent socket {self.socket_path}: {exc}") from exc

    def _next_message(self, deadline: float) -> dict[str, Any]:
        """The next JSON object the agent sends, skipping delimiters; raises TimeoutError at `deadline`."""
        sock = self._connect()
        while True:
            self._buffer = self._buffer.lstrip(DELIMITER + b"\r\n ")
            line, newline, rest = self._buffer.partition(b"\n")
            if newline:
                self._buffer = rest
                try:
                    message = json.loads(line.strip(DELIMITER))
                except json.JSONDecodeError:
                    continue  # a fragment from before a resync
                if isinstance(message, dict):
                    return message
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            sock.settimeout(remaining)
            try:
                chunk = sock.recv(SOCKET_READ)
            except socket.timeout as exc:
                raise TimeoutError from exc
            except OSError as exc:
                self.close()
                raise GuestAgentError(f"reading from the guest agent socket {self.socket_path}: {exc}") from exc
            if not chunk:
                self.close()
                raise GuestAgentError(f"the guest agent socket {self.socket_path} closed (QEMU exited?)")
            self._buffer += chunk

    def sync(self, timeout: float = SYNC_ATTEMPT_S) -> bool:
        """True once the agent answers a guest-sync-delimited within `timeout`; stale answers are discarded."""
        token = random.randrange(1, 2**31)
        self._send(DELIMITER + json.dumps({"execute": "guest-sync-delimited", "arguments": {"id": token}}).encode())
        deadline = time.monotonic() + timeout
        try:
            while True:
                if self._next_message(deadline).get("return") == token:
                    return True
        except TimeoutError:
            return False

    def command(self, name: str, arguments: dict[str, Any] | None = None, timeout: float = 10.0) -> Any:
        """Run one agent command and return its `return` value."""
        if not self.sync(timeout=min(timeout, SYNC_ATTEMPT_S * 2)):
            raise GuestAgentError(f"guest agent on {self.socket_path} did not answer guest-sync before {name}")
        request: dict[str, Any] = {"execute": name}
        if arguments is not None:
            request["arguments"] = arguments
        self._send(json.dumps(request).encode())
        try:
            message = self._next_message(time.monotonic() + timeout)
        except TimeoutError as exc:
            self.close()  # a late answer would be read as the next command's
            raise GuestAgentError(f"guest agent did not answer {name} within {timeout:.0f} s") from exc
        if "error" in message:
            raise GuestAgentError(f"guest agent: {name} failed: {message['error']}")
        return message.get("return")

    def exec(self, argv: list[str], timeout: float, stdin: bytes | None = None) -> ExecResult:
        """Run `argv` in the guest (as root, no shell), wait for it, and return its exit code and output."""
        if not argv:
            raise ValueError("exec needs a program to run")
        arguments: dict[str, Any] = {"path": argv[0], "arg": argv[1:], "capture-output": True}
        if stdin is not None:
            arguments["input-data"] = base64.b64encode(stdin).decode()
        pid = self.command("guest-exec", arguments)["pid"]
        deadline = time.monotonic() + timeout
        while True:
            status = self.command("guest-exec-status", {"pid": pid})
            if status.get("exited"):
                break
            if time.monotonic() >= deadline:
                self._kill(pid)
                raise GuestAgentError(f"{argv} did not finish within {timeout:.0f} s in the guest (killed)")
            time.sleep(EXEC_POLL_S)
        rc = status.get("exitcode")
        if rc is None:  # ended by a signal
            rc = 128 + int(status.get("signal", 0))
        return ExecResult(
            rc=int(rc),
            stdout=base64.b64decode(status.get("out-data", "")).decode(errors="replace"),
            stderr=base64.b64decode(status.get("err-data", "")).decode(errors="replace"),
        )

    def _kill(self, pid: int) -> None:
        try:
            self.command("guest-exec", {"path": "/bin/kill", "arg": ["-KILL", str(pid)]})
        except GuestAgentError:
            pass  # best effort: the caller is already raising

    def read_file(self, path: str, timeout: float = 30.0) -> bytes:
        """The whole content of a file in the guest."""
        deadline = time.monotonic() + timeout
        handle = self.command("guest-file-open", {"path": path, "mode": "r"})
        data = bytearray()
        try:
            while True:
                if time.monotonic() >= deadline:
                    raise GuestAgentError(f"reading {path} from the guest took over {timeout:.0f} s")
                chunk = self.command("guest-file-read", {"handle": handle, "count": READ_CHUNK})
                data += base64.b64decode(chunk.get("buf-b64", ""))
                if chunk.get("eof") or not chunk.get("count"):
                    return bytes(data)
        finally:
            self.command("guest-file-close", {"handle": handle})

"""Keeps the fast subset service-free: a test not marked e2e that starts a service fails, naming what it started.

"A service" here is anything that listens for connections: a socket put to listen() in the test process (a stub
server, moto's, uvicorn), or a process started whose command line is one of the gateway's servers or the tools
that start them (Caddy `run`, Prometheus, Alertmanager, sshd, supervisord, a `gpugate_runtime ... serve`,
vLLM's API server, `gpugate up`). Tests that need one are marked `e2e`. The guard watches each test from the setup
of its fixtures (module and session fixtures included) to its teardown, lets it run as written (a server thread
refused its socket would leave the test waiting) and turns its teardown into an error naming what was started.
"""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
from collections.abc import Iterator, Sequence

import pytest

SERVER_PROGRAMS = frozenset({"prometheus", "prometheus-alertmanager", "alertmanager", "sshd", "supervisord", "moto_server"})
# The real methods, whatever guard is installed.
LISTEN = socket.socket.listen
POPEN_INIT = subprocess.Popen.__init__
FOUND = pytest.StashKey[list]()


def service_in(argv: str | bytes | os.PathLike | Sequence[str | bytes | os.PathLike]) -> str | None:
    """What `argv` starts, when it is a service; else None."""
    if isinstance(argv, bytes):
        argv = argv.decode()
    if isinstance(argv, str):
        words = shlex.split(argv)
    elif isinstance(argv, os.PathLike):
        words = [os.fspath(argv)]
    else:
        words = [os.fsdecode(a) if isinstance(a, bytes) else os.fspath(a) for a in argv]
    if not words:
        return None
    program, rest = os.path.basename(words[0]), words[1:]
    if "--help" in rest:  # a command's help starts nothing
        return None
    if program in SERVER_PROGRAMS:
        return program
    if program == "caddy" and rest[:1] in (["run"], ["start"]):
        return "caddy " + rest[0]
    if "gpugate_runtime" in rest and "serve" in rest:
        return "gpugate_runtime " + " ".join(w for w in rest if w not in ("-m", "gpugate_runtime"))
    if "vllm.entrypoints.openai.api_server" in rest:
        return "vLLM's API server"
    if ("gpugate" in rest or program == "gpugate") and "up" in rest:
        return "gpugate up"
    if program in ("sh", "bash") and rest[:1] == ["-c"] and len(rest) > 1:
        return service_in(rest[1].rsplit(" exec ", 1)[-1])
    return None


class Guard:
    """While installed, records every listening socket and every service process started, in `found`."""

    def __init__(self) -> None:
        self.found: list[str] = []
        self.saved = (socket.socket.listen, subprocess.Popen.__init__)

    def __enter__(self) -> Guard:
        found = self.found

        def listen(sock: socket.socket, *args: int) -> None:
            found.append(f"a socket listening on {sock.getsockname()}")
            LISTEN(sock, *args)

        def popen_init(process: subprocess.Popen, args, *rest, **kwargs) -> None:  # noqa: ANN001
            started = service_in(args)
            if started:
                found.append(started)
            POPEN_INIT(process, args, *rest, **kwargs)

        socket.socket.listen = listen  # type: ignore[method-assign]
        subprocess.Popen.__init__ = popen_init  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        socket.socket.listen, subprocess.Popen.__init__ = self.saved  # type: ignore[method-assign]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    if item.get_closest_marker("e2e") is not None:
        yield
        return
    with Guard() as guard:
        item.stash[FOUND] = guard.found
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    found = item.stash.get(FOUND, [])
    if call.when == "teardown" and found and report.passed:
        report.outcome = "failed"
        report.longrepr = (
            f"{item.nodeid} is not marked e2e but started a service: {', '.join(dict.fromkeys(found))}. "
            "Mark it @pytest.mark.e2e, or make it start nothing (tests/service_guard.py)."
        )

"""The fast subset stays service-free: the guard of tests/service_guard.py watches every test not marked e2e."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from tests.service_guard import LISTEN, POPEN_INIT, Guard, service_in


def test_the_guard_watches_every_fast_test():
    # this very test is not marked e2e: the guard's methods are installed while it runs
    assert socket.socket.listen is not LISTEN and subprocess.Popen.__init__ is not POPEN_INIT


@pytest.mark.e2e
def test_an_e2e_test_runs_unwatched():
    assert socket.socket.listen is LISTEN and subprocess.Popen.__init__ is POPEN_INIT


def test_a_listening_socket_and_a_service_process_are_recorded_and_tools_are_not():
    # given a guard of its own (the real methods underneath, so the guard around this test sees nothing)
    with Guard() as guard, socket.socket() as sock:
        # when a socket listens, a tool runs and a service command is started (one that exits at once)
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        address = sock.getsockname()
        subprocess.run(["/bin/true", "caddy", "run"], check=True)
        subprocess.run([sys.executable, "-c", "pass", "-m", "gpugate_runtime", "authz", "serve"], check=True)
    # then the socket and the service are named, the tool is not
    assert guard.found == [f"a socket listening on {address}", "gpugate_runtime -c pass authz serve"]
    assert socket.socket.listen is not LISTEN  # the guard around this test is back


@pytest.mark.parametrize(
    ("argv", "service"),
    [
        (["/usr/bin/caddy", "run", "--config", "C"], "caddy run"),
        (["caddy", "start"], "caddy start"),
        (["/usr/bin/prometheus", "--config.file=p.yml"], "prometheus"),
        (["/usr/bin/prometheus-alertmanager"], "prometheus-alertmanager"),
        (["/usr/sbin/sshd", "-D"], "sshd"),
        ([".venv/bin/supervisord", "-c", "s.conf"], "supervisord"),
        ("python -m vllm.entrypoints.openai.api_server --port 1", "vLLM's API server"),
        ([sys.executable, "-m", "gpugate", "up", "--stack", "local"], "gpugate up"),
        (["/bin/sh", "-c", 'K="$(cat key)" exec /usr/bin/caddy run --config C'], "caddy run"),
        ([sys.executable, "-m", "gpugate_runtime", "authz", "serve"], "gpugate_runtime authz serve"),
        ([sys.executable, "-m", "gpugate", "up", "--help"], None),
        (["/usr/bin/caddy", "adapt", "--config", "C"], None),
        (["/usr/bin/caddy", "validate", "--config", "C"], None),
        (["/usr/bin/promtool", "check", "rules", "r.yml"], None),
        (["amtool", "check-config", "a.yml"], None),
        ([sys.executable, "-m", "gpugate_runtime", "keys", "list"], None),
        ([sys.executable, "-m", "gpugate", "render", "--stack", "local"], None),
    ],
)
def test_the_guard_tells_services_from_tools(argv, service):
    assert service_in(argv) == service

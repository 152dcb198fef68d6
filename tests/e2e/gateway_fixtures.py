"""A real gateway on loopback for tests: rendered Caddyfile, real Caddy, real authz, a stub vLLM."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Protocol

import httpx

from gpugate.render.bundle import write_bundle
from gpugate.targets import render_bundle
from gpugate.stackfile import load_stack
from gpugate_runtime.contract.host import CADDY_GO_ENV, KEY_ID_HEADER, REQUEST_ID_HEADER, HostLayout, Ports
from gpugate_runtime.keys import IssuedKey, create_key
from tests.conftest import edit_stack

REPO = Path(__file__).resolve().parents[2]
CADDY = shutil.which("caddy") or "/usr/bin/caddy"
INTERNAL_KEY = "internal-vllm-key-for-tests"
HOSTNAME = "localhost"  # the local stack's domain; tests connect to 127.0.0.1 and send it as SNI/Host


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_internal_base(span: int = 8) -> int:
    """A base port whose whole block of internal ports is free right now."""
    for _ in range(200):
        base = free_port()
        if base + span < 65000 and all(port_is_free(base + i) for i in range(span)):
            return base
    raise RuntimeError("no free block of loopback ports")


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.05, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = predicate()
        except (httpx.HTTPError, OSError):
            result = None
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


# --- the stub vLLM --------------------------------------------------------------------------------


class Upstream(Protocol):
    """What stands in for vLLM on the stack's vLLM port."""

    def start(self) -> None: ...

    def stop(self) -> None: ...


@dataclass
class Seen:
    method: str
    path: str
    authorization: str | None
    key_id: str | None
    request_id: str | None


class StubUpstream:
    """A tiny real HTTP/1.1 server standing in for vLLM. It records the method, path and the
    identity headers of each request (never bodies). A request body may steer it:
    {"stream": true, "chunks": 3, "delay": 0.3} streams SSE chunks; {"hold": 5} waits (at most that
    long) until `release()` is called, to keep a request in flight."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.seen: list[Seen] = []
        self._lock = threading.Lock()
        self._release = threading.Event()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _record(self) -> None:
                with stub._lock:
                    stub.seen.append(
                        Seen(
                            self.command,
                            self.path,
                            self.headers.get("Authorization"),
                            self.headers.get(KEY_ID_HEADER),
                            self.headers.get(REQUEST_ID_HEADER),
                        )
                    )

            def _json(self, status: int, payload: Any) -> None:
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                self._record()
                if self.path == "/health":
                    self.send_response(200)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                elif self.path == "/v1/models":
                    self._json(200, {"object": "list", "data": [{"id": "stub", "object": "model"}]})
                else:
                    self._json(200, {"stub": "would have answered", "path": self.path})

            # vLLM answers these methods too (405 on most routes); recorded like GET so a test can
            # tell whether one reached it.
            do_DELETE = do_OPTIONS = do_GET

            def do_POST(self) -> None:
                self._record()
                length = int(self.headers.get("Content-Length") or 0)
                try:
                    request = json.loads(self.rfile.read(length) or b"{}")
                except ValueError:
                    request = {}
                if not isinstance(request, dict):
                    request = {}
                if request.get("hold"):
                    stub._release.wait(float(request["hold"]))
                if request.get("stream"):
                    self.send_response(200)
                    self.send_header("Content-Type", "text/event-stream")
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    for i in range(int(request.get("chunks", 3))):
                        if i:
                            time.sleep(float(request.get("delay", 0.3)))
                        self._chunk(f'data: {{"choices":[{{"index":0,"delta":{{"content":"tok{i}"}}}}]}}\n\n'.encode())
                    self._chunk(b"data: [DONE]\n\n")
                    self._chunk(b"")
                    return
                self._json(200, {"object": "chat.completion", "choices": [{"message": {"role": "assistant", "content": "ok"}}]})

            def _chunk(self, data: bytes) -> None:
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()

        self._server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._release.set()
        self._server.shutdown()
        self._server.server_close()

    def release(self) -> None:
        self._release.set()

    def hold(self) -> None:
        self._release.clear()

    def seen_with(self, request_id: str) -> list[Seen]:
        with self._lock:
            return [s for s in self.seen if s.request_id == request_id]


# --- the gateway ----------------------------------------------------------------------------------


@dataclass
class Gateway:
    root: Path
    layout: HostLayout
    ports: Ports
    https_port: int
    http_port: int
    upstream: Any  # StubUpstream unless running_gateway was given another Upstream
    ca_file: Path
    processes: list[subprocess.Popen] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"https://127.0.0.1:{self.https_port}"

    @property
    def access_log(self) -> Path:
        return self.layout.logs / "access.log"

    @property
    def authz_log(self) -> Path:
        return self.layout.logs / "authz.log"

    def client(self, **kwargs: Any) -> httpx.Client:
        context = ssl.create_default_context(cafile=str(self.ca_file))
        return httpx.Client(base_url=self.base_url, verify=context, timeout=10, headers={"Host": HOSTNAME}, **kwargs)

    def request(self, client: httpx.Client, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """A request to 127.0.0.1 that presents the gateway's hostname in TLS SNI and Host."""
        return client.request(method, path, extensions={"sni_hostname": HOSTNAME}, **kwargs)

    def new_key(self, name: str, **kwargs: Any) -> IssuedKey:
        """Issue a key straight into the store authz serves (the CLI path is tested in test_keys)."""
        kwargs.setdefault("expires", timedelta(days=1))
        return create_key(self.layout.key_store, name, **kwargs)

    def authz_metrics(self) -> str:
        return httpx.get(f"http://127.0.0.1:{self.ports.authz}/metrics", timeout=5).text

    def metric(self, name: str, labels: str = "") -> float:
        series = f"{name}{{{labels}}}" if labels else name
        for line in self.authz_metrics().splitlines():
            if line.startswith(series + " "):
                return float(line.split()[-1])
        return 0.0


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


@contextmanager
def running_gateway(
    root: Path, upstream_on: Callable[[int], Upstream] = StubUpstream, config: dict[str, Any] | None = None
) -> Iterator[Gateway]:
    """Render a copy of the local stack with free ports under root (and the stack keys in `config`,
    e.g. {"gpugate:timeouts": {...}}), start a stand-in for vLLM (`upstream_on(port)`, a StubUpstream
    by default), authz and Caddy, and stop them all on exit."""
    base, https_port, http_port = free_internal_base(), free_port(), free_port()

    def ports(stack: dict[str, Any]) -> None:
        stack["gpugate:ports"] = {"https": https_port, "http": http_port, "internal_base": base}
        stack.update(config or {})

    stack_file = edit_stack("local", root / "Pulumi.local.yaml", ports)
    layout = HostLayout(root / "host")
    bundle = render_bundle(load_stack(stack_file), layout)
    write_bundle(bundle, layout.etc)
    # What host preparation creates (user-data on VMs): logs, state and Caddy's own 0700 storage.
    for directory in (layout.logs, layout.state, root / "home"):
        directory.mkdir(parents=True, exist_ok=True)
    layout.caddy_storage.mkdir(mode=0o700, parents=True, exist_ok=True)
    ports_ = Ports(base)
    upstream = upstream_on(ports_.vllm)
    gateway = Gateway(
        root=root,
        layout=layout,
        ports=ports_,
        https_port=https_port,
        http_port=http_port,
        upstream=upstream,
        ca_file=layout.local_ca_file,
    )
    home = str(root / "home")
    base_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": home, "XDG_CONFIG_HOME": home, "XDG_DATA_HOME": home}
    try:
        upstream.start()
        authz_env = {
            **base_env,
            "GPUGATE_ENV_FILE": str(layout.runtime_env),
            "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "runtime")]),
        }
        with (layout.logs / "authz.stderr.log").open("wb") as out:
            gateway.processes.append(
                subprocess.Popen(
                    [sys.executable, "-m", "gpugate_runtime", "authz", "serve"], env=authz_env, stdout=out, stderr=out
                )
            )
        with (layout.logs / "caddy.log").open("wb") as out:
            gateway.processes.append(
                subprocess.Popen(
                    [CADDY, "run", "--adapter", "caddyfile", "--config", str(layout.etc / "caddy" / "Caddyfile")],
                    env={**base_env, **CADDY_GO_ENV, "GPUGATE_VLLM_API_KEY": INTERNAL_KEY},
                    stdout=out,
                    stderr=out,
                )
            )
        wait_until(
            lambda: httpx.get(f"http://127.0.0.1:{ports_.authz}/health", timeout=1).status_code == 200, 20, what="authz"
        )
        wait_until(gateway.ca_file.exists, 20, what="Caddy's local CA")
        with gateway.client() as client:
            wait_until(lambda: gateway.request(client, "GET", "/healthz").status_code == 200, 20, what="Caddy")
        # authz enforces concurrency only once it follows the access log Caddy has now created.
        wait_until(lambda: "following access log" in gateway.authz_log.read_text(), 5, what="authz to follow the access log")
        yield gateway
    finally:
        for process in reversed(gateway.processes):
            _stop(process)
        upstream.stop()

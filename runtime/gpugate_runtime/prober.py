"""Synthetic checks of one gateway host (vLLM health, models, a 1-token completion, TLS, GPU memory) as metrics."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

import httpx
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from pydantic import BaseModel, ConfigDict, Field
from rich.table import Table

from gpugate_runtime import __version__
from gpugate_runtime.contract import metrics as m
from gpugate_runtime.contract.host import LOOPBACK
from gpugate_runtime.prober_settings import ProberSettings
from gpugate_runtime.quietserver import loopback_server

log = logging.getLogger(__name__)

# The only words the prober ever sends as a prompt: fixed and harmless, so nothing it sends is
# sensitive, and it never reads, logs or stores what the model answers.
PROMPT = "ping"
USER_AGENT = f"gpugate-prober/{__version__}"
# Pause between runs until every check has passed once since the prober started (see run_forever).
STARTUP_RETRY_SECONDS = 2.0

_HTTP_HINTS = {
    401: "the prober's key was rejected",
    403: "the prober's key is not allowed here",
    404: "not found: check public_url and the proxy's routes",
    413: "request refused as too large",
    429: "the prober's key is rate limited",
    502: "the proxy cannot reach vLLM",
    503: "unavailable: draining, or vLLM is down",
    504: "vLLM did not answer the proxy in time",
}


class Check(StrEnum):
    VLLM_HEALTH = "vllm_health"
    MODELS = "models"
    COMPLETION = "completion"
    TLS = "tls"
    GPU = "gpu"


class ProbeResult(BaseModel):
    """The outcome of one check: `ok` is None where the check does not apply to this host."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    check: Check
    ok: bool | None
    seconds: float = Field(ge=0)
    detail: str


class GpuMemory(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    gpu: str = Field(description="NVML index")
    name: str
    used_bytes: int = Field(ge=0)
    total_bytes: int = Field(ge=0)


class ProbeRun(BaseModel):
    """One run of every check, as `/status` and `status --json` show it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    checked_at: datetime
    results: tuple[ProbeResult, ...]
    tls_not_after: datetime | None = None
    gpus: tuple[GpuMemory, ...] = ()

    @property
    def ok(self) -> bool:
        """Every applicable check passed."""
        return all(result.ok is not False for result in self.results)

    def result(self, check: Check) -> ProbeResult:
        return next(r for r in self.results if r.check is check)


class CheckFailed(Exception):
    """A check failed; the message is the reason an operator reads (never a key or response content)."""


class NotApplicable(Exception):
    """The check does not apply to this host (no GPU); the message says why."""


@dataclass
class _Findings:
    """What the checks of one run measured besides pass/fail."""

    tls_not_after: float | None = None
    gpus: list[GpuMemory] = field(default_factory=list)
    tls_context: ssl.SSLContext | None = None
    tls_context_error: str | None = None


def _tls_context(ca_file: Path | None) -> ssl.SSLContext:
    try:
        return ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    except FileNotFoundError:
        raise CheckFailed(f"CA file {ca_file} not found") from None
    except (OSError, ssl.SSLError) as exc:
        raise CheckFailed(f"cannot load CA file {ca_file}: {exc}") from None


def _file_stamp(path: Path) -> tuple[int, int, int]:
    stat = path.stat()
    return stat.st_ino, stat.st_mtime_ns, stat.st_size


def _http_failure(response: httpx.Response) -> CheckFailed:
    hint = _HTTP_HINTS.get(response.status_code) or response.reason_phrase
    return CheckFailed(f"HTTP {response.status_code}: {hint}")


def _causes(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _describe_error(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, TimeoutError | httpx.TimeoutException):
        return f"timed out after {timeout:g}s"
    # httpx wraps the errors of the ssl and socket modules; theirs is the useful message.
    causes = list(_causes(exc))
    untrusted = next((e for e in causes if isinstance(e, ssl.SSLCertVerificationError)), None)
    if untrusted is not None:
        return f"certificate not trusted: {untrusted.verify_message}"
    os_error = next((e for e in causes if isinstance(e, OSError) and e.strerror), None)
    if isinstance(exc, httpx.ConnectError | ConnectionError):
        return f"cannot connect: {os_error.strerror if os_error else exc}"
    if isinstance(exc, httpx.HTTPError):
        return f"{type(exc).__name__}: {exc}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS error: {exc.reason or exc}"
    if isinstance(exc, OSError):
        return f"{type(exc).__name__}: {exc}"
    return f"unexpected {type(exc).__name__}: {exc}"


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        raise CheckFailed(f"HTTP {response.status_code} but the body is not JSON") from None


def _in_words(seconds: float) -> str:
    if seconds >= 2 * 86400:
        return f"{seconds / 86400:.0f} days"
    return f"{seconds / 3600:.1f} hours"


class Prober:
    """Runs the checks of one host and keeps the last run for `/metrics` and `/status`."""

    def __init__(self, settings: ProberSettings) -> None:
        self.settings = settings
        self.last: ProbeRun | None = None
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_ProbeCollector(self))
        # TLS contexts are built once, not per run: loading a CA bundle costs about 35 ms of CPU,
        # more than the rest of a run. Every check still opens its own connection, with a full handshake.
        self._health_tls = httpx.create_ssl_context()  # what a bare httpx client would build for vllm_health_url
        self._public_tls: tuple[tuple[int, int, int] | None, ssl.SSLContext] | None = None

    def _public_tls_context(self) -> ssl.SSLContext:
        """The context for the public URL, rebuilt when the CA file changes (Caddy writes its local
        CA after the prober may have started; a renewed CA replaces it)."""
        ca_file = self.settings.ca_file
        try:
            stamp = None if ca_file is None else _file_stamp(ca_file)
        except OSError:
            return _tls_context(ca_file)  # raises CheckFailed naming the file and the reason
        if self._public_tls is None or self._public_tls[0] != stamp:
            self._public_tls = (stamp, _tls_context(ca_file))
        return self._public_tls[1]

    async def run_once(self) -> ProbeRun:
        """Run every check now (concurrently, each bounded by timeout_seconds) and keep the result."""
        findings = _Findings()
        try:
            findings.tls_context = self._public_tls_context()
        except CheckFailed as exc:
            findings.tls_context_error = str(exc)
        checks: dict[Check, Callable[[_Findings], Awaitable[str]]] = {
            Check.VLLM_HEALTH: self._vllm_health,
            Check.MODELS: self._models,
            Check.COMPLETION: self._completion,
            Check.TLS: self._tls,
            Check.GPU: self._gpu,
        }
        checked_at = datetime.now(UTC)
        results = await asyncio.gather(*(self._timed(check, run, findings) for check, run in checks.items()))
        run = ProbeRun(
            checked_at=checked_at,
            results=tuple(results),
            tls_not_after=datetime.fromtimestamp(findings.tls_not_after, UTC) if findings.tls_not_after else None,
            gpus=tuple(findings.gpus),
        )
        self._log_changes(run)
        self.last = run
        return run

    async def run_forever(self) -> None:
        interval = self.settings.interval_seconds
        passed_once = False
        while True:
            started = time.monotonic()
            try:
                passed_once = (await self.run_once()).ok or passed_once
            except Exception:  # noqa: BLE001 - the loop must outlive a bad run; /status shows the last good one
                log.exception("a run of the checks failed")
            # Until every check has passed once, the next run comes soon: `gpugate up` waits for the
            # first all-green run, and a starting vLLM is ready up to an interval before the prober
            # would otherwise look. After that, the interval even while failing: never probe harder.
            pause = interval if passed_once else min(interval, STARTUP_RETRY_SECONDS)
            await asyncio.sleep(max(0.0, pause - (time.monotonic() - started)))

    def metrics(self) -> bytes:
        return generate_latest(self.registry)

    async def _timed(
        self, check: Check, run: Callable[[_Findings], Awaitable[str]], findings: _Findings
    ) -> ProbeResult:
        timeout = self.settings.timeout_seconds
        started = time.perf_counter()
        ok: bool | None
        try:
            async with asyncio.timeout(timeout):
                detail = await run(findings)
            ok = True
        except CheckFailed as exc:
            ok, detail = False, str(exc)
        except NotApplicable as exc:
            ok, detail = None, f"not applicable: {exc}"
        except Exception as exc:  # noqa: BLE001 - a check reports its failure; it never stops the prober
            ok, detail = False, _describe_error(exc, timeout)
        return ProbeResult(check=check, ok=ok, seconds=round(time.perf_counter() - started, 6), detail=detail)

    def _log_changes(self, run: ProbeRun) -> None:
        # A log line when a check changes state or its reason, not every interval.
        before = {r.check: r for r in self.last.results} if self.last else {}
        for result in run.results:
            previous = before.get(result.check)
            if result.ok is False and (
                previous is None or previous.ok is not False or previous.detail != result.detail
            ):
                log.warning("check %s failed: %s", result.check, result.detail)
            elif result.ok is True and previous is not None and previous.ok is False:
                log.info("check %s passes again: %s", result.check, result.detail)
            else:
                log.debug("check %s: ok=%s in %.3fs: %s", result.check, result.ok, result.seconds, result.detail)

    # -- the checks: each returns its detail, or raises CheckFailed / NotApplicable ----------------

    async def _vllm_health(self, findings: _Findings) -> str:
        async with httpx.AsyncClient(
            verify=self._health_tls, timeout=self.settings.timeout_seconds, trust_env=False
        ) as client:
            response = await client.get(str(self.settings.vllm_health_url), headers={"User-Agent": USER_AGENT})
        if response.status_code != 200:
            raise _http_failure(response)
        return "HTTP 200"

    async def _models(self, findings: _Findings) -> str:
        async with self._public_client(findings) as client:
            response = await client.get(f"{self.settings.public_base}/v1/models", **self._public_request())
        if response.status_code != 200:
            raise _http_failure(response)
        body = _json(response)
        try:
            served = [str(entry["id"]) for entry in body["data"]]
        except (KeyError, TypeError):
            raise CheckFailed("HTTP 200 but the body is not a model list") from None
        if self.settings.model not in served:
            raise CheckFailed(f"model {self.settings.model!r} is not served (served: {', '.join(served) or 'none'})")
        return f"HTTP 200, serves {self.settings.model}"

    async def _completion(self, findings: _Findings) -> str:
        payload = {
            "model": self.settings.model,
            "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": 1,
            "stream": False,
        }
        async with self._public_client(findings) as client:
            response = await client.post(
                f"{self.settings.public_base}/v1/chat/completions", json=payload, **self._public_request()
            )
        if response.status_code != 200:
            raise _http_failure(response)
        body = _json(response)
        choices = body.get("choices") if isinstance(body, dict) else None
        if not isinstance(choices, list) or not choices:
            raise CheckFailed("HTTP 200 but no choices in the completion")
        usage = body.get("usage") if isinstance(body.get("usage"), dict) else {}
        tokens = usage.get("completion_tokens")
        return f"HTTP 200, {tokens} token" if tokens is not None else "HTTP 200"

    async def _tls(self, findings: _Findings) -> str:
        context = self._context(findings)
        host, port = self.settings.public_address
        _, writer = await asyncio.open_connection(host, port, ssl=context, server_hostname=self.settings.server_name)
        try:
            certificate = writer.get_extra_info("peercert") or {}
        finally:
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()
        if "notAfter" not in certificate:
            raise CheckFailed("the server sent no certificate expiry")
        not_after = float(ssl.cert_time_to_seconds(certificate["notAfter"]))
        findings.tls_not_after = not_after
        expires = datetime.fromtimestamp(not_after, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return f"valid for {self.settings.server_name}, expires {expires} (in {_in_words(not_after - time.time())})"

    async def _gpu(self, findings: _Findings) -> str:
        gpus = await asyncio.to_thread(_read_gpus, self.settings.expect_gpu)
        findings.gpus = gpus
        used = sum(g.used_bytes for g in gpus) / 2**30
        total = sum(g.total_bytes for g in gpus) / 2**30
        return f"{len(gpus)} GPU{'s' if len(gpus) != 1 else ''} ({gpus[0].name}): {used:.1f} of {total:.1f} GiB used"

    # -- helpers -----------------------------------------------------------------------------------

    def _context(self, findings: _Findings) -> ssl.SSLContext:
        if findings.tls_context is None:
            raise CheckFailed(findings.tls_context_error or "no TLS context")
        return findings.tls_context

    def _public_client(self, findings: _Findings) -> httpx.AsyncClient:
        # A fresh client per check: every run proves a full TLS handshake, as a new client would make.
        return httpx.AsyncClient(verify=self._context(findings), timeout=self.settings.timeout_seconds, trust_env=False)

    def _public_request(self) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {self._read_key()}", "User-Agent": USER_AGENT}
        extensions: dict[str, Any] = {}
        if self.settings.tls_host:
            host, port = self.settings.tls_host, self.settings.public_address[1]
            headers["Host"] = host if port == 443 else f"{host}:{port}"
            extensions["sni_hostname"] = host
        return {"headers": headers, "extensions": extensions}

    def _read_key(self) -> str:
        # Read on every run, so a rotated key is picked up without a restart.
        path = self.settings.key_file
        try:
            key = path.read_text().strip()
        except FileNotFoundError:
            raise CheckFailed(
                f"the prober's key file {path} is missing: write a client key named prober there"
            ) from None
        except OSError as exc:
            raise CheckFailed(f"cannot read the prober's key file {path}: {exc.strerror}") from None
        if not key:
            raise CheckFailed(f"the prober's key file {path} is empty")
        return key


def _read_gpus(expect_gpu: bool) -> list[GpuMemory]:
    """Memory of every NVIDIA GPU through NVML; NotApplicable where there is none and none is expected."""

    def absent(reason: str) -> Exception:
        return CheckFailed(f"no GPU visible: {reason}") if expect_gpu else NotApplicable(reason)

    try:
        import pynvml  # noqa: PLC0415 - optional: only GPU hosts install nvidia-ml-py
    except ImportError:
        raise absent("no NVML library (nvidia-ml-py is not installed)") from None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        raise absent(f"NVML cannot start ({exc})") from None
    try:
        count = pynvml.nvmlDeviceGetCount()
        if count == 0:
            raise absent("NVML sees no GPU")
        gpus = []
        for index in range(count):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            name = pynvml.nvmlDeviceGetName(handle)
            gpus.append(
                GpuMemory(
                    gpu=str(index),
                    name=name.decode() if isinstance(name, bytes) else str(name),
                    used_bytes=int(memory.used),
                    total_bytes=int(memory.total),
                )
            )
        return gpus
    except pynvml.NVMLError as exc:
        raise CheckFailed(f"NVML: {exc}") from None
    finally:
        with contextlib.suppress(pynvml.NVMLError):
            pynvml.nvmlShutdown()


class _ProbeCollector(Collector):
    """Exports the prober's last run; a check that does not apply has no series (so it never reads as 0)."""

    def __init__(self, prober: Prober) -> None:
        self.prober = prober

    def collect(self) -> Iterator[Metric]:
        run = self.prober.last
        success = GaugeMetricFamily(
            m.PROBE_SUCCESS, "1 if the check passed on its last run, 0 if it failed", labels=["check"]
        )
        duration = GaugeMetricFamily(m.PROBE_DURATION, "How long the last run of the check took", labels=["check"])
        not_after = GaugeMetricFamily(m.TLS_CERT_NOT_AFTER, "Expiry of the public URL's certificate, unix time")
        used = GaugeMetricFamily(m.GPU_MEMORY_USED, "GPU memory in use", labels=["gpu"])
        total = GaugeMetricFamily(m.GPU_MEMORY_TOTAL, "GPU memory in all", labels=["gpu"])
        if run is not None:
            for result in run.results:
                if result.ok is None:
                    continue
                success.add_metric([result.check.value], 1.0 if result.ok else 0.0)
                duration.add_metric([result.check.value], result.seconds)
            if run.tls_not_after is not None:
                not_after.add_metric([], run.tls_not_after.timestamp())
            for gpu in run.gpus:
                used.add_metric([gpu.gpu], gpu.used_bytes)
                total.add_metric([gpu.gpu], gpu.total_bytes)
        yield from (success, duration, not_after, used, total)


class StatusApp:
    """ASGI app on loopback: `/metrics` for Prometheus, `/status` (JSON of the last run) for people."""

    def __init__(self, prober: Prober) -> None:
        self.prober = prober

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return
        if scope["method"] not in ("GET", "HEAD"):
            await _respond(send, 405, b"method not allowed\n", "text/plain", allow="GET, HEAD")
        elif scope["path"] == "/metrics":
            await _respond(send, 200, self.prober.metrics(), CONTENT_TYPE_LATEST)
        elif scope["path"] == "/status":
            run = self.prober.last
            if run is None:
                await _respond(send, 503, b'{"checked_at": null, "results": []}\n', "application/json")
            else:
                await _respond(send, 200, run.model_dump_json(indent=2).encode() + b"\n", "application/json")
        else:
            await _respond(send, 404, b"not found\n", "text/plain")


async def _respond(send: Callable, status: int, body: bytes, content_type: str, **headers: str) -> None:
    raw = [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]
    raw += [(name.encode(), value.encode()) for name, value in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


async def serve(settings: ProberSettings) -> None:
    """Run the checks every interval and serve /metrics and /status until stopped."""
    prober = Prober(settings)
    server = loopback_server(StatusApp(prober), settings.port, settings.log_level)
    loop = asyncio.create_task(prober.run_forever(), name="prober-loop")
    log.info(
        "prober on http://%s:%d: %s every %gs", LOOPBACK, settings.port, settings.public_base, settings.interval_seconds
    )
    try:
        await server.serve()
    finally:
        loop.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loop


def status_table(run: ProbeRun) -> Table:
    table = Table(title=f"gpugate prober · {run.checked_at:%Y-%m-%d %H:%M:%S} UTC")
    table.add_column("check")
    table.add_column("ok")
    table.add_column("latency", justify="right")
    table.add_column("detail", overflow="fold")
    marks = {True: "[green]ok[/green]", False: "[bold red]FAIL[/bold red]", None: "[dim]n/a[/dim]"}
    for result in run.results:
        table.add_row(result.check.value, marks[result.ok], f"{result.seconds * 1000:.0f} ms", result.detail)
    return table

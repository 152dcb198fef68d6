"""`gpugate smoke`: the post-deploy check of a live gateway from outside, with the official openai client."""

from __future__ import annotations

import logging
import secrets
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import httpx
from pydantic import BaseModel, ConfigDict, computed_field, model_validator
from rich.table import Table

from gpugate.release import Release, ReleaseError, now, release_of
from gpugate.spec import SloSpec
from gpugate.stackfile import Stack

if TYPE_CHECKING:
    import openai

log = logging.getLogger(__name__)

# What HSTS must promise: one year, the bundle's own value and the preload lists' minimum.
HSTS_MIN_MAX_AGE_S = 31_536_000
# Paths of vLLM's own server that a client must never reach through the gateway, with the method
# each is served with (a 405 would mean the route exists).
INTERNAL_PATHS: tuple[tuple[str, str], ...] = (
    ("GET", "/metrics"),
    ("POST", "/invocations"),
    ("POST", "/v1/load_lora_adapter"),
    ("GET", "/docs"),
)
CLOSED_STATUSES = (403, 404)
PROMPT = "Say hello"
CHAT_MAX_TOKENS = 8
STREAM_MAX_TOKENS = 16
# A request may take the SLO plus this before the client gives up (the SLO decides pass or fail).
TIMEOUT_MARGIN_S = 30.0

TLS, MODELS, CHAT, STREAM, WRONG_KEY = "tls-hsts", "models-listed", "chat", "chat-stream", "wrong-key-401"


def closed_check_name(path: str) -> str:
    return f"closed {path}"


class SmokeCheck(BaseModel):
    """One check: `ok` is None when it was not run (a failed TLS check stops the rest)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    check: str
    ok: bool | None
    seconds: float = 0.0
    evidence: str
    threshold: str = ""


class SmokeReport(BaseModel):
    """A smoke run; `--record` writes it, and `gpugate promote` reads it as the smoke gate's evidence."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str
    at: datetime
    stack: str | None = None
    release: Release | None = None
    checks: list[SmokeCheck]

    @model_validator(mode="before")
    @classmethod
    def _derived_ok(cls, data: object) -> object:
        # `ok` is written for readers of the record, and derived again from the checks when read.
        if isinstance(data, dict):
            data = {k: v for k, v in data.items() if k != "ok"}
        return data

    @computed_field  # type: ignore[prop-decorator]
    @property
    def ok(self) -> bool:
        return all(c.ok is True for c in self.checks)

    @property
    def failed(self) -> list[SmokeCheck]:
        return [c for c in self.checks if c.ok is not True]


@dataclass(frozen=True)
class SmokeTarget:
    url: str
    key: str
    ca_file: Path | None = None
    model: str | None = None
    latency_slo_s: float = SloSpec().latency_p95_seconds
    ttft_slo_s: float | None = None

    @property
    def timeout_s(self) -> float:
        return self.latency_slo_s + TIMEOUT_MARGIN_S

    def tls_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file else None)

    def http(self) -> httpx.Client:
        return httpx.Client(verify=self.tls_context(), timeout=self.timeout_s, follow_redirects=False)

    def client(self, key: str | None = None) -> openai.OpenAI:
        import openai  # noqa: PLC0415 - 0.2 s to import; every gpugate command would pay it at start

        return openai.OpenAI(
            base_url=f"{self.url}/v1", api_key=key or self.key, max_retries=0, timeout=self.timeout_s, http_client=self.http()
        )


def _error(exc: BaseException) -> str:
    import openai  # noqa: PLC0415 - 0.2 s to import; every gpugate command would pay it at start

    """An error in words, without a response body (a gateway's body could echo a request)."""
    if isinstance(exc, openai.APIStatusError):
        return f"HTTP {exc.status_code}"
    if isinstance(exc, openai.APITimeoutError):
        return "timed out"
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ssl.SSLCertVerificationError):
            return f"TLS: {cause.verify_message or cause}"
        if isinstance(cause, ssl.SSLError):
            return f"TLS: {cause.reason or cause}"
        cause = cause.__cause__ or cause.__context__
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:200]


def _timed(name: str, threshold: str, body: Callable[[], tuple[bool, str]]) -> SmokeCheck:
    import openai  # noqa: PLC0415 - 0.2 s to import; every gpugate command would pay it at start

    started = time.monotonic()
    try:
        ok, evidence = body()
    except (openai.OpenAIError, httpx.HTTPError, OSError) as exc:
        ok, evidence = False, _error(exc)
    return SmokeCheck(check=name, ok=ok, seconds=round(time.monotonic() - started, 3), evidence=evidence, threshold=threshold)


def check_tls(target: SmokeTarget) -> SmokeCheck:
    trusted = f"{target.ca_file}" if target.ca_file else "the system CAs"
    threshold = f"certificate for {urlsplit(target.url).hostname} trusted by {trusted}; HSTS max-age >= {HSTS_MIN_MAX_AGE_S}"

    def body() -> tuple[bool, str]:
        if urlsplit(target.url).scheme != "https":
            return False, f"{target.url} is not HTTPS"
        with target.http() as http:
            response = http.get(f"{target.url}/v1/models", headers={"Authorization": f"Bearer {target.key}"})
        hsts = response.headers.get("strict-transport-security")
        if hsts is None:
            return False, f"certificate valid, but HTTP {response.status_code} carries no Strict-Transport-Security header"
        max_age = next((int(p.split("=", 1)[1]) for p in hsts.split(";") if p.strip().lower().startswith("max-age=")), 0)
        if max_age < HSTS_MIN_MAX_AGE_S:
            return False, f"certificate valid, but HSTS max-age is {max_age}"
        return True, f"certificate valid; HSTS {hsts}"

    return _timed(TLS, threshold, body)


def check_models(target: SmokeTarget) -> tuple[SmokeCheck, str | None]:
    served: list[str] = []
    expected = f"lists {target.model}" if target.model else "lists at least one model"

    def body() -> tuple[bool, str]:
        with target.client() as client:
            served.extend(m.id for m in client.models.list())
        if target.model:
            return target.model in served, f"listed: {', '.join(served) or 'none'}"
        return bool(served), f"listed: {', '.join(served) or 'none'}"

    result = _timed(MODELS, expected, body)
    model = target.model if target.model else (served[0] if served else None)
    return result, model


def check_chat(target: SmokeTarget, model: str) -> SmokeCheck:
    threshold = f"an answer within the latency SLO of {target.latency_slo_s:g} s"

    def body() -> tuple[bool, str]:
        started = time.monotonic()
        with target.client() as client:
            reply = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": PROMPT}], max_tokens=CHAT_MAX_TOKENS
            )
        seconds = time.monotonic() - started
        if not reply.choices or not reply.choices[0].message.content:
            return False, f"an empty answer in {seconds:.2f} s"
        tokens = f"{reply.usage.completion_tokens} tokens" if reply.usage else "an answer"
        return seconds <= target.latency_slo_s, f"{tokens} in {seconds:.2f} s"

    return _timed(CHAT, threshold, body)


def check_stream(target: SmokeTarget, model: str) -> SmokeCheck:
    threshold = f"streamed chunks, all within {target.latency_slo_s:g} s" + (
        f", the first within {target.ttft_slo_s:g} s" if target.ttft_slo_s else ""
    )

    def body() -> tuple[bool, str]:
        started = time.monotonic()
        first: float | None = None
        chunks = 0
        with target.client() as client:
            stream = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": PROMPT}], max_tokens=STREAM_MAX_TOKENS, stream=True
            )
            with stream:
                for chunk in stream:
                    if chunk.choices and chunk.choices[0].delta.content:
                        chunks += 1
                        first = first if first is not None else time.monotonic() - started
        total = time.monotonic() - started
        if not chunks or first is None:
            return False, f"no content chunk in {total:.2f} s"
        ok = total <= target.latency_slo_s and (target.ttft_slo_s is None or first <= target.ttft_slo_s)
        return ok, f"{chunks} chunks; first after {first:.2f} s, last after {total:.2f} s"

    return _timed(STREAM, threshold, body)


def check_wrong_key(target: SmokeTarget) -> SmokeCheck:
    import openai  # noqa: PLC0415 - 0.2 s to import; every gpugate command would pay it at start

    def body() -> tuple[bool, str]:
        wrong = "ggk_smoke_" + secrets.token_urlsafe(32)
        try:
            with target.client(wrong) as client:
                client.models.list()
        except openai.AuthenticationError:
            return True, "HTTP 401"
        return False, "a wrong key was ACCEPTED (HTTP 200)"

    return _timed(WRONG_KEY, "HTTP 401 for a key the gateway never issued", body)


def check_closed(target: SmokeTarget, method: str, path: str) -> SmokeCheck:
    threshold = f"{' or '.join(map(str, CLOSED_STATUSES))} even with a valid key"

    def body() -> tuple[bool, str]:
        with target.http() as http:
            response = http.request(method, f"{target.url}{path}", headers={"Authorization": f"Bearer {target.key}"})
        kind = response.headers.get("content-type", "no content type").split(";")[0]
        evidence = f"{method} {path} -> HTTP {response.status_code} ({kind}, {len(response.content):,} bytes)"
        return response.status_code in CLOSED_STATUSES, evidence

    return _timed(closed_check_name(path), threshold, body)


def run_smoke(target: SmokeTarget) -> list[SmokeCheck]:
    """Every check once, in a fixed order: at most 9 requests, each bounded by the SLO plus a margin."""
    tls = check_tls(target)
    later = [MODELS, CHAT, STREAM, WRONG_KEY, *(closed_check_name(p) for _, p in INTERNAL_PATHS)]
    if not tls.ok:
        # Nothing else can be trusted (or even reached) over a connection that failed verification.
        return [tls, *(SmokeCheck(check=name, ok=None, evidence="not run: the TLS check failed") for name in later)]
    models, model = check_models(target)
    checks = [tls, models]
    if model is None:
        checks += [SmokeCheck(check=name, ok=False, evidence="no model to ask: none listed") for name in (CHAT, STREAM)]
    else:
        checks += [check_chat(target, model), check_stream(target, model)]
    checks.append(check_wrong_key(target))
    checks += [check_closed(target, method, path) for method, path in INTERNAL_PATHS]
    return checks


def smoke(target: SmokeTarget, stack: Stack | None = None) -> SmokeReport:
    """Run the smoke checks; with a stack, the report names the release that stack file describes."""
    release: Release | None = None
    if stack is not None:
        try:
            release = release_of(stack)
        except ReleaseError as err:  # e.g. the local stack: no image digest to promote
            log.info("smoke of %s records no release: %s", stack.name, err.what)
    checks = run_smoke(target)
    return SmokeReport(url=target.url, at=now(), stack=stack.name if stack else None, release=release, checks=checks)


def read_report(path: Path) -> SmokeReport:
    return SmokeReport.model_validate_json(path.read_text())


# ---- the command ------------------------------------------------------------------------------


def report_table(report: SmokeReport) -> Table:
    table = Table("check", "result", "seconds", "evidence", "threshold", title=f"smoke {report.url}", title_justify="left")
    for c in report.checks:
        mark = {True: "[green]pass[/]", False: "[bold red]FAIL[/]", None: "[yellow]not run[/]"}[c.ok]
        table.add_row(c.check, mark, f"{c.seconds:.2f}" if c.ok is not None else "", c.evidence, c.threshold)
    return table

"""Tasks that change what serves: drain the proxy, restart a service behind a drain."""

from __future__ import annotations

import time

from fabric import task
from gpugate_runtime.contract.services import VLLM, is_vllm
from invoke.exceptions import Exit

from runbooks.tasks.host import (
    EXIT_BAD_INPUT,
    EXIT_CHECK_FAILED,
    RESTARTABLE,
    Host,
    found,
    restartable,
    say,
    wait_for,
)


@task(auto_shortflags=False, help={"off": "stop draining: serve the public API again"})
def drain(c, off=False):
    """Drain the gateway: the proxy answers 503 with Retry-After on the public API until `drain --off`.

    Requests already in flight finish. Idempotent: draining a draining host (or releasing a serving one)
    changes nothing. `restart` drains by itself; use this for longer maintenance.
    """
    host = Host(c)
    host.env()
    if not host.drain_supported():
        raise Exit(
            f"error: the deployed Caddyfile on {host.where} does not check the drain marker (an older bundle); deploy the current bundle first",
            EXIT_CHECK_FAILED,
        )
    marker = host.layout.drain_marker
    draining = host.exists(marker)
    found(f"the proxy is {'draining' if draining else 'serving'} (marker {marker} {'present' if draining else 'absent'})")
    if off:
        if not draining:
            say("not draining: nothing to do")
            return
        host.clear_drain()
    else:
        if draining:
            say("already draining: nothing to do")
            return
        host.set_drain("gpugate run drain")
    if host.dry_run:
        return
    answer = host.public_get("/healthz")[0]
    want = 200 if off else 503
    if answer.get("status") == want:
        say(f"✓ the proxy answers {want} on /healthz" + (f" with Retry-After: {answer.get('retry_after')}" if not off else ""))
    else:
        say(f"warning: /healthz through the public URL answered {answer.get('status') or answer.get('error')}, expected {want}")


@task(
    auto_shortflags=False,
    help={
        "service": f"which service: {', '.join(RESTARTABLE)}, or vllm-<tier> for a stack's extra tier (vllm is drained first)",
        "drain_timeout": "seconds to let requests in flight finish before vLLM restarts",
        "timeout": "seconds to wait for the service to be healthy again",
    },
)
def restart(c, service="vllm", drain_timeout=60.0, timeout=900.0):
    """Restart a service; for vLLM drain first (503 + Retry-After), restart, wait until healthy, then serve again.

    Checks first that the service exists and that the deployed proxy can drain. While vLLM restarts clients get
    503 with Retry-After, never a refused connection; requests in flight get up to --drain-timeout to finish.
    Done when vLLM's /health answers and the prober's checks pass through the public URL. Safe to re-run.
    An extra tier's vLLM (vllm-<tier>, listed by `status`) restarts without a drain: the other tiers keep
    serving, and the router holds the tier down meanwhile (its provider answers, or 503 with Retry-After).
    """
    if service not in RESTARTABLE and not service.startswith(f"{VLLM}-"):
        hint = " (Caddy: use reload-proxy, it reloads without dropping connections)" if service == "caddy" else ""
        raise Exit(f"error: cannot restart {service!r}; choose one of: {', '.join(RESTARTABLE)}{hint}", EXIT_BAD_INPUT)
    host = Host(c)
    host.env()
    choices = restartable(host.names())
    if service not in choices:
        raise Exit(f"error: no service {service!r} on {host.where}; choose one of: {', '.join(choices)}", EXIT_BAD_INPUT)
    before = host.service(service)
    found(f"{service} is {before['state']} (pid {before['pid'] or '-'})")
    drains = service == "vllm"
    already_draining = False
    if drains:
        if not host.drain_supported():
            raise Exit(
                f"error: the deployed Caddyfile on {host.where} cannot drain (an older bundle): a restart would drop requests; deploy the current bundle first",
                EXIT_CHECK_FAILED,
            )
        already_draining = host.exists(host.layout.drain_marker)
        found(f"in flight in vLLM: {host.vllm_in_flight()}; proxy {'already draining (left so afterwards)' if already_draining else 'serving'}")
    argv, role = host.restart_argv(service)
    if host.dry_run:
        if drains and not already_draining:
            host.set_drain("gpugate run restart")
            say(f"would wait up to {drain_timeout:g} s for vLLM's requests in flight to finish")
        host.change(f"restart {service}", argv, role)
        say(f"would wait up to {timeout:g} s until {service} is healthy and the prober's checks pass")
        if drains and not already_draining:
            host.clear_drain()
        return
    started = time.monotonic()
    try:
        if drains:
            if not already_draining:
                host.set_drain("gpugate run restart")
            answer = host.public_get("/healthz")[0]
            if answer.get("status") != 503:
                raise Exit(
                    f"error: the drain marker is set but the proxy still answers {answer.get('status') or answer.get('error')} on /healthz; "
                    f"not restarting (can Caddy's user see {host.layout.drain_marker}?)",
                    EXIT_CHECK_FAILED,
                )
            say(f"✓ draining: the proxy answers 503 with Retry-After: {answer.get('retry_after')}")
            if wait_for(lambda: host.vllm_in_flight() in (0, None), drain_timeout):
                say("✓ no request in flight")
            else:
                say(f"warning: {host.vllm_in_flight()} request(s) still in flight after {drain_timeout:g} s; restarting anyway")
        host.must(host.change(f"restart {service}", argv, role, timeout=timeout), f"restarting {service}")
        remaining = lambda: max(1.0, timeout - (time.monotonic() - started))  # noqa: E731
        if is_vllm(service):
            if not wait_for(lambda: host.vllm_health(service), remaining()):
                raise Exit(
                    f"error: {service} did not answer /health within {timeout:g} s; see `gpugate run logs --service {service}`",
                    EXIT_CHECK_FAILED,
                )
            say(f"✓ {service} answers /health after {time.monotonic() - started:.0f} s")
        elif not wait_for(lambda: host.service(service)["state"] == "RUNNING", remaining()):
            raise Exit(f"error: {service} is not running {timeout:g} s after the restart", EXIT_CHECK_FAILED)
    finally:
        if drains and not already_draining and not host.dry_run:
            host.clear_drain()
    after = host.service(service)
    probe = lambda: host.check(host.runtime("prober", "status", "--json"), "root", timeout=120).ok  # noqa: E731
    if already_draining:
        say("the proxy stays drained as it was before; `gpugate run drain --off` serves again")
    elif not wait_for(probe, max(30.0, timeout - (time.monotonic() - started)), interval=2):
        raise Exit(f"error: {service} restarted (pid {after['pid']}) but the prober's checks still fail; see `gpugate run status`", EXIT_CHECK_FAILED)
    say(f"✓ {service} restarted: pid {before['pid'] or '-'} → {after['pid']}, healthy after {time.monotonic() - started:.0f} s")

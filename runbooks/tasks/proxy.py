"""Caddy's configuration: validate, swap and reload it, roll back if the reloaded proxy does not answer."""

from __future__ import annotations

import hashlib
import shlex
from pathlib import Path
from typing import Any

from fabric import task
from gpugate_runtime.contract.host import CADDYFILE
from invoke.exceptions import Exit
from invoke.runners import Result

from runbooks.tasks.host import (
    EXIT_BAD_INPUT,
    EXIT_CHECK_FAILED,
    VERIFY_CONNECTIONS,
    VERIFY_TIMEOUT_S,
    Host,
    found,
    last_lines,
    say,
    wait_for,
)


@task(auto_shortflags=False, help={"caddyfile": "a Caddyfile on this machine to install (e.g. from `gpugate render`); default: reload the deployed one"})
def reload_proxy(c, caddyfile=""):
    """Validate a Caddyfile with `caddy validate`, swap it in atomically and reload Caddy without dropping connections.

    A Caddyfile that fails validation never replaces the deployed one. The one it replaces is kept as
    Caddyfile.previous and put back if Caddy refuses the new config or the gateway stops answering after the
    reload. Without --caddyfile the deployed Caddyfile is validated and reloaded (idempotent).
    """
    new_text = None
    if caddyfile:
        try:
            new_text = Path(caddyfile).read_text()
        except OSError as exc:
            raise Exit(f"error: cannot read {caddyfile}: {exc.strerror}", EXIT_BAD_INPUT) from None
    host = Host(c)
    host.env()
    deployed = host.layout.bundle_file(CADDYFILE)
    candidate = deployed.with_name(".Caddyfile.candidate")
    previous = deployed.with_name("Caddyfile.previous")
    socket = host.layout.caddy_admin_socket
    deployed_sha = host.sha256(deployed)
    if deployed_sha is None:
        raise Exit(f"error: no Caddyfile at {deployed} on {host.where}", EXIT_CHECK_FAILED)
    if not host.check(["test", "-S", str(socket)], "caddy").ok:
        raise Exit(
            f"error: Caddy's admin socket {socket} is missing on {host.where}: Caddy is down, or runs a bundle without it "
            "(restart Caddy once to load the current bundle)",
            EXIT_CHECK_FAILED,
        )
    found(f"deployed Caddyfile {deployed} (sha256 {deployed_sha[:12]}); Caddy's admin socket {socket}")
    reload_argv = [host.facts.caddy, "reload", "--config", str(deployed), "--adapter", "caddyfile", "--address", f"unix/{socket}"]
    if new_text is None:
        valid = host.check([host.facts.caddy, "validate", "--config", str(deployed), "--adapter", "caddyfile"], "caddy")
        if valid.failed:
            raise Exit(f"error: the deployed Caddyfile is invalid; Caddy keeps running its loaded config:\n{_caddy_error(valid)}", EXIT_CHECK_FAILED)
        found("the deployed Caddyfile is valid")
        host.must(host.change("reload Caddy with the deployed Caddyfile", reload_argv, "caddy"), "reloading Caddy")
        if not host.dry_run:
            _verify_proxy(host)
        return
    new_sha = hashlib.sha256(new_text.encode()).hexdigest()
    found(f"candidate {caddyfile} (sha256 {new_sha[:12]}){' is identical to the deployed one' if new_sha == deployed_sha else ''}")
    if host.dry_run:
        say(f"would upload {caddyfile} to {candidate} and check it:\n    $ {host.command([host.facts.caddy, 'validate', '--config', str(candidate), '--adapter', 'caddyfile'], 'caddy')}")
        say(f"would keep {deployed} as {previous}, move {candidate} onto {deployed}, then:\n    $ {host.command(reload_argv, 'caddy')}")
        say(f"on failure would put {previous} back and reload it")
        return
    host.must(host.write(f"upload the candidate to {candidate}", candidate, new_text, "root"), "uploading the candidate")
    valid = host.check([host.facts.caddy, "validate", "--config", str(candidate), "--adapter", "caddyfile"], "caddy")
    if valid.failed:
        host.check(["rm", "-f", str(candidate)], "root")
        raise Exit(f"error: refused: caddy validate rejects {caddyfile}; the deployed Caddyfile is unchanged:\n{_caddy_error(valid)}", EXIT_CHECK_FAILED)
    say("✓ caddy validate accepts the candidate")
    if new_sha != deployed_sha:
        keep = f"cp -p {shlex.quote(str(deployed))} {shlex.quote(str(previous))}.tmp && mv {shlex.quote(str(previous))}.tmp {shlex.quote(str(previous))}"
        host.must(host.change(f"keep the deployed Caddyfile as {previous}", ["sh", "-c", keep], "root"), "keeping the previous Caddyfile")
    host.must(host.change(f"move the candidate onto {deployed}", ["mv", str(candidate), str(deployed)], "root"), "swapping in the candidate")
    reloaded = host.change("reload Caddy", reload_argv, "caddy")
    problem = f"Caddy refused the new config: {_caddy_error(reloaded)}" if reloaded is not None and reloaded.failed else None
    if problem is None and not _verify_proxy(host, strict=False):
        problem = "the gateway did not answer every connection on /healthz after the reload"
    if problem is None:
        say(f"✓ Caddy runs the new Caddyfile; the one before is kept at {previous}")
        return
    say(f"✗ {problem}")
    if new_sha != deployed_sha:
        restore = f"cp -p {shlex.quote(str(previous))} {shlex.quote(str(deployed))}.tmp && mv {shlex.quote(str(deployed))}.tmp {shlex.quote(str(deployed))}"
        host.must(host.change(f"put {previous} back", ["sh", "-c", restore], "root"), "restoring the previous Caddyfile")
        if reloaded is not None and reloaded.ok:
            host.must(host.change("reload Caddy with the previous Caddyfile", reload_argv, "caddy"), "reloading the previous Caddyfile")
    how = "Caddy serves it"
    if not _verify_proxy(host, strict=False):
        # Seen with Caddy 2.6.2: a config that fails to load leaves its listeners open beside the good ones, and
        # about half of the new connections then fail their TLS handshake; no reload closes them, a restart does.
        argv, role = host.restart_argv("caddy")
        host.must(host.change("restart Caddy with the previous Caddyfile (its listeners are damaged)", argv, role), "restarting Caddy")
        _verify_proxy(host)
        how = "Caddy was restarted with it, since the failed load had left its listeners damaged"
    raise Exit(f"error: rolled back: {problem}\nthe previous Caddyfile is in place again and {how}", EXIT_CHECK_FAILED)


def _caddy_error(result: Result) -> str:
    lines = [line for line in (result.stderr + result.stdout).splitlines() if line.startswith("Error:")]
    return "\n".join(lines[-3:]) or last_lines(result)


def _verify_proxy(host: Host, strict: bool = True) -> bool:
    """Every one of VERIFY_CONNECTIONS fresh connections gets /healthz through the public URL (503 while draining)."""
    draining = host.exists(host.layout.drain_marker)
    want = 503 if draining else 200
    seen: list[Any] = []

    def all_answer() -> bool:
        answers = host.public_get("/healthz", count=VERIFY_CONNECTIONS)
        seen[:] = [a.get("status") or a.get("error") for a in answers]
        return all(a.get("status") == want for a in answers)

    ok = wait_for(all_answer, VERIFY_TIMEOUT_S)
    if ok:
        say(f"✓ the gateway answers {want} on /healthz to {VERIFY_CONNECTIONS} new connections{' (draining)' if draining else ''}")
    elif strict:
        raise Exit(f"error: the gateway does not answer {want} on /healthz on every new connection: {seen}", EXIT_CHECK_FAILED)
    else:
        say(f"✗ /healthz on {VERIFY_CONNECTIONS} new connections: {sorted(set(map(str, seen)))}")
    return ok

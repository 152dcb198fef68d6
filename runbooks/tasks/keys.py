"""Client key tasks: rotate a key with overlap, revoke a leaked one."""

from __future__ import annotations

import json as jsonlib
import re

from fabric import task
from gpugate_runtime.keys import (
    NAME_PATTERN,
    NAME_RULE,
    KeyInputError,
    parse_duration,
    revocation_target,
)
from invoke.exceptions import Exit

from runbooks.tasks.host import EXIT_BAD_INPUT, Host, found, say


@task(
    auto_shortflags=False,
    help={
        "name": "the key name to rotate (see `status` or `gpugate-runtime keys list`)",
        "overlap": "how long the old key stays valid, e.g. 24h (default: the stack's rotation overlap)",
        "expires": "validity of the new key, e.g. 90d (default: the stack's)",
    },
)
def rotate_key(c, name, overlap="", expires=""):
    """Issue a new key for NAME and print it once; NAME's old key keeps working until the overlap ends.

    Checks first that NAME has an active key. Nothing restarts: authz reloads the key store within a second.
    Each run issues a new key (a key is shown only once, so a rerun cannot repeat it); the old key's expiry only
    ever moves earlier, so a second run is safe.
    """
    if not re.fullmatch(NAME_PATTERN, name):
        raise Exit(f"error: {name!r} is not a key name; allowed: {NAME_RULE}", EXIT_BAD_INPUT)
    for option, value in (("--overlap", overlap), ("--expires", expires)):
        if value:
            try:
                parse_duration(value, allow_zero=option == "--overlap")
            except ValueError as exc:
                raise Exit(f"error: {option}: {exc}", EXIT_BAD_INPUT) from None
    host = Host(c)
    host.env()
    active = [k for k in host.keys() if k["name"] == name and k["status"] == "active"]
    if not active:
        raise Exit(f"error: {name!r} has no active key on {host.where}; create one with `gpugate-runtime keys create {name}`", EXIT_BAD_INPUT)
    found(f"{name} has {len(active)} active key(s): " + ", ".join(f"{k['id']} (expires {k['expires_at']})" for k in active))
    argv = host.runtime("keys", "rotate", name, "--json", "--store", str(host.layout.key_store))
    argv += [*(["--overlap", overlap] if overlap else []), *(["--expires", expires] if expires else [])]
    result = host.change(f"issue a new key for {name}", argv, "service")
    if result is None:
        return None
    host.must(result, f"rotating {name}")
    issued = jsonlib.loads(result.stdout)
    say(f"✓ rotated {name}: new key {issued['id']}, expires {issued['expires_at']}")
    for key_id, until in sorted(issued.get("retiring", {}).items()):
        say(f"  old key {key_id} stays valid until {until}")
    say("The new key is shown only now; store it in a secret manager:")
    say(issued["key"])
    return issued["key"]


@task(
    auto_shortflags=False,
    help={"key_id": "the key id (12 hex digits), or - to read the leaked key itself from stdin or a hidden prompt"},
)
def revoke_key(c, key_id):
    """Revoke a key now; authz rejects it within a second. Give its id, or - and the leaked key itself on stdin.

    A key on the command line is refused (it would stay in shell history and process lists). Checks first that
    the key exists; revoking a revoked key changes nothing. A full key never leaves this machine: only its id is
    sent to the host.
    """
    try:
        key_id, _ = revocation_target(key_id)
    except KeyInputError as exc:
        raise Exit(f"error: {exc}", EXIT_BAD_INPUT) from None
    host = Host(c)
    host.env()
    record = next((k for k in host.keys() if k["id"] == key_id), None)
    if record is None:
        raise Exit(f"error: no key with id {key_id} on {host.where}", EXIT_BAD_INPUT)
    found(f"key {key_id} ({record['name']}) is {record['status']}")
    if record.get("revoked_at"):
        say(f"already revoked at {record['revoked_at']}: nothing to do")
        return
    argv = host.runtime("keys", "revoke", key_id, "--json", "--store", str(host.layout.key_store))
    result = host.change(f"revoke key {key_id} ({record['name']})", argv, "service")
    if result is None:
        return
    host.must(result, f"revoking {key_id}")
    revoked = jsonlib.loads(result.stdout)
    say(f"✓ key {key_id} ({record['name']}) revoked at {revoked['revoked_at']}; authz rejects it within a second")

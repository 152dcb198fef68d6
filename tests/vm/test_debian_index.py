"""Debian 12's package index answers which names apt can install on a stock Debian 12 cloud VM, and from where."""

from __future__ import annotations

import pytest

from tests.vm.debian_index import DebianIndex


def test_gateway_packages_are_in_bookworm_main(debian_index: DebianIndex) -> None:
    names = ["caddy", "prometheus", "prometheus-alertmanager", "python3-venv", "python3-boto3", "socat"]
    assert debian_index.missing(names) == []
    hits = debian_index.lookup("caddy", suites=["bookworm"], components=["main"])
    assert [(h.suite, h.component) for h in hits] == [("bookworm", "main")]
    assert hits[0].version.startswith("2.")


def test_names_outside_the_enabled_suites_or_components_are_missing(debian_index: DebianIndex) -> None:
    # NVIDIA's own repository ships the container toolkit; Debian does not.
    assert debian_index.missing(["nvidia-container-toolkit", "caddy"]) == ["nvidia-container-toolkit"]
    # The driver is in non-free, which a stock image's sources do not enable.
    assert debian_index.missing(["nvidia-driver"]) == ["nvidia-driver"]
    assert debian_index.missing(["nvidia-driver"], components=["main", "non-free"]) == []
    # Valkey reached Debian 12 only through backports.
    assert debian_index.missing(["valkey-server"]) == ["valkey-server"]
    if "bookworm-backports" in debian_index.suites:
        assert debian_index.missing(["valkey-server"], suites=["bookworm-backports"]) == []


def test_virtual_names_count_only_when_allowed(debian_index: DebianIndex) -> None:
    # `awk` is only a Provides (of gawk, mawk, ...): with several providers, `apt-get install awk` asks which one and fails.
    assert debian_index.missing(["awk"]) == ["awk"]
    assert debian_index.missing(["awk"], allow_virtual=True) == []


def test_unknown_suite_is_an_error_not_a_miss(debian_index: DebianIndex) -> None:
    with pytest.raises(ValueError, match="bookwork"):
        debian_index.missing(["caddy"], suites=["bookwork"])

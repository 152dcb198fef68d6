"""A local stack's provider keys: `gpugate up` writes each from GPUGATE_PROVIDER_<NAME>_API_KEY to the file the router
reads (0600 in a 0700 dir), keeps one on file, and stops with exit 2 naming the secret before anything starts when a
provider has no key. No service is started (`gpugate up` runs in process and stops first)."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner
from gpugate_runtime.contract.host import ROUTE_TABLE, HostLayout
from gpugate_runtime.routetable import RouteTable

from gpugate.cli import app
from gpugate.local.bundle import render_local
from gpugate.local.providerkeys import ProviderKeyMissing, install_provider_keys, provider_key_env
from gpugate.stackfile import load_stack

KEY = "sk-local-provider-canary-3f9a1c"


def with_providers(config: dict[str, Any]) -> None:
    provider = {"models": {"smollm2-135m-instruct": "small"}, "input_usd_per_mtok": 0.15, "output_usd_per_mtok": 0.6}
    config["gpugate:providers"] = {
        "cloud": {**provider, "base_url": "https://api.example.com/v1"},
        "eu-backup": {**provider, "base_url": "https://eu.example.com/v1"},
    }


def test_the_variable_names_the_provider_upper_cased_with_underscores():
    assert provider_key_env("cloud") == "GPUGATE_PROVIDER_CLOUD_API_KEY"
    assert provider_key_env("eu-backup") == "GPUGATE_PROVIDER_EU_BACKUP_API_KEY"


def test_each_key_lands_owner_only_in_the_file_the_routers_table_names_and_nowhere_in_the_bundle(stack_copy, tmp_path: Path):
    # given a local stack with two providers and their keys in the environment
    stack = load_stack(stack_copy("local", with_providers, name="routed"))
    layout = HostLayout(tmp_path / "state")
    environ = {provider_key_env("cloud"): KEY, provider_key_env("eu-backup"): KEY + "-eu"}
    # when gpugate up installs them
    changed = install_provider_keys(stack.spec.providers, layout, stack.name, environ)
    # then each is in its own file, 0600 in a 0700 directory
    assert changed == ["cloud", "eu-backup"]
    assert layout.provider_key_file("cloud").read_text() == KEY + "\n"
    assert layout.provider_key_file("eu-backup").read_text() == KEY + "-eu\n"
    assert stat.S_IMODE(layout.provider_key_file("cloud").stat().st_mode) == 0o600
    assert stat.S_IMODE(layout.secrets.stat().st_mode) == 0o700
    # and the router's table names exactly that file, while no bundle file holds the key
    bundle = render_local(stack, layout, tmp_path / "model")
    table = RouteTable.model_validate_json(bundle.files[ROUTE_TABLE])
    assert table.providers["cloud"].key_file == layout.provider_key_file("cloud")
    assert not any(KEY in body for body in bundle.text_files().values())
    # and a second up with the same key changes nothing; a new key is written and reported
    assert install_provider_keys(stack.spec.providers, layout, stack.name, environ) == []
    assert install_provider_keys(stack.spec.providers, layout, stack.name, {**environ, provider_key_env("cloud"): "sk-new"}) == ["cloud"]
    assert layout.provider_key_file("cloud").read_text() == "sk-new\n"


def test_a_key_on_file_stays_when_the_variable_is_unset(tmp_path: Path):
    layout = HostLayout(tmp_path)
    install_provider_keys(["cloud"], layout, "routed", {provider_key_env("cloud"): KEY})
    assert install_provider_keys(["cloud"], layout, "routed", {}) == []
    assert layout.provider_key_file("cloud").read_text() == KEY + "\n"


def test_a_provider_without_a_key_is_named_with_its_secret_variable_and_file_and_nothing_is_written(tmp_path: Path):
    layout = HostLayout(tmp_path)
    with pytest.raises(ProviderKeyMissing) as missing:
        install_provider_keys(["cloud", "eu-backup"], layout, "routed", {provider_key_env("cloud"): KEY, provider_key_env("eu-backup"): " "})
    assert missing.value.providers == ["eu-backup"]
    (line,) = missing.value.lines
    assert "gpugate:providers.eu-backup.api_key" in line and "export GPUGATE_PROVIDER_EU_BACKUP_API_KEY=" in line
    assert str(layout.provider_key_file("eu-backup")) in line
    assert not layout.secrets.exists(), "nothing is written while a key is missing"


def test_gpugate_up_without_a_providers_key_exits_2_naming_it_before_starting_anything(stack_copy, tmp_path: Path):
    # given a local stack with providers, and only one of their keys in the environment
    path = stack_copy("local", with_providers, name="routed")
    env = {k: None for k in os.environ if k.startswith("GPUGATE_PROVIDER_")}
    env |= {"GPUGATE_STATE_DIR": str(tmp_path / "state"), "COLUMNS": "200", provider_key_env("cloud"): KEY}
    # when the operator runs gpugate up (in process: it must stop before it starts anything)
    result = CliRunner().invoke(app, ["up", "--stack", str(path)], env=env)
    # then it stops at once with exit 2, naming the secret, the variable and the file
    assert result.exit_code == 2, result.output
    assert "no API key for provider(s) eu-backup" in result.output
    assert "gpugate:providers.eu-backup.api_key" in result.output and "GPUGATE_PROVIDER_EU_BACKUP_API_KEY" in result.output
    # and nothing was installed, written or started
    assert not (tmp_path / "state").exists()
    assert "checking system packages" not in result.output

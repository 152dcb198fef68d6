"""Checks every rendered file with the program that will consume it (caddy, promtool, amtool, cloud-init, ...).

The bundle is rendered under a temporary root for this, so that every absolute path in
it (rule files, secret files, log and state directories) resolves inside that root and
nothing on this machine is read or written outside it.
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import json
import re
import shutil
import subprocess
import tarfile
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gpugate_runtime import __version__ as runtime_version
from gpugate_runtime.contract.host import VM_RUNTIME_PYTHON, HostLayout
from gpugate_runtime.hostboot import FetchError, extract_bundle
from gpugate_runtime.launchspec import LaunchSpec
from gpugate_runtime.router_settings import RouterSettings
from gpugate_runtime.routetable import RouteTable
from gpugate_runtime.prober_settings import AlertSinkSettings, ProberSettings
from gpugate_runtime.settings import AuthzSettings, KeysSettings, load_settings
from pydantic import ValidationError
from ruamel.yaml import YAML

from gpugate.images import ALLOWED as IMAGES_ALLOWED
from gpugate.images import image_problems
from gpugate.kubernetes import objects, pod_build
from gpugate.kubernetes.access import private_api_note
from gpugate.kubernetes.allocatable import node_fits
from gpugate.kubernetes.checks import check_manifest as check_kubernetes
from gpugate.kubernetes.objects import CADDY_CONFIG, CADDYFILE_PATH, TLS_FILES
from gpugate.lockfiles import LockError, read_pins
from gpugate.render.bundle import MANIFEST, Bundle, write_bundle
from gpugate.render.dashboards import dashboard_exprs, dashboard_problems, recording_rules
from gpugate.stackfile import Stack
from gpugate.targets import render_bundle

TOOL_TIMEOUT_S = 60


@dataclass(frozen=True)
class Verdict:
    stack: str
    file: str
    tool: str
    ok: bool
    detail: str = ""
    warning: bool = False  # ok, but printed as WARN: something to fix before it is deployed


class ToolMissing(Exception):
    """A consuming tool is not installed: validation cannot be trusted without it."""


def _run(argv: list[str], cwd: Path) -> tuple[bool, str]:
    if shutil.which(argv[0]) is None:
        raise ToolMissing(f"{argv[0]} is not installed (run ./scripts/test or see README: it installs the validators)")
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=TOOL_TIMEOUT_S)
    output = (proc.stdout + proc.stderr).strip()
    return proc.returncode == 0, output


def _last_lines(text: str, n: int = 6) -> str:
    return "\n".join(text.splitlines()[-n:])


def check_caddyfile(path: Path, root: Path) -> tuple[bool, str]:
    ok, out = _run(["caddy", "validate", "--config", str(path), "--adapter", "caddyfile"], root)
    return ok, "" if ok else _last_lines(out)


def check_prometheus(path: Path, root: Path) -> tuple[bool, str]:
    ok, out = _run(["promtool", "check", "config", str(path)], root)
    return ok, "" if ok else _last_lines(out)


def check_rules(path: Path, root: Path) -> tuple[bool, str]:
    ok, out = _run(["promtool", "check", "rules", str(path)], root)
    return ok, "" if ok else _last_lines(out)


def check_alertmanager(path: Path, root: Path) -> tuple[bool, str]:
    ok, out = _run(["amtool", "check-config", str(path)], root)
    return ok, "" if ok else _last_lines(out)


def check_cloud_init(path: Path, root: Path) -> tuple[bool, str]:
    ok, out = _run(["cloud-init", "schema", "--config-file", str(path)], root)
    return ok, "" if ok else _last_lines(out)


# What `systemd-analyze verify` may say about a unit that is only true on this machine:
# the host's runtime venv and Docker are installed by user-data at boot, not here.
_DEFERRED_ON_HOST = (f"{VM_RUNTIME_PYTHON} is not executable", "Unit docker.service not found")


def check_systemd_unit(path: Path, root: Path) -> tuple[bool, str]:
    _, out = _run(["systemd-analyze", "verify", str(path)], root)
    problems = [line for line in out.splitlines() if line.strip() and not any(d in line for d in _DEFERRED_ON_HOST)]
    return not problems, _last_lines("\n".join(problems))


def check_launch_spec(path: Path, root: Path) -> tuple[bool, str]:
    try:
        LaunchSpec.read(path)
    except ValidationError as err:
        return False, str(err)
    return True, ""


def check_route_table(path: Path, root: Path) -> tuple[bool, str]:
    try:
        RouteTable.load(path)
    except ValidationError as err:
        return False, str(err)
    return True, ""


def check_supervisord(path: Path, root: Path) -> tuple[bool, str]:
    from supervisor.options import ServerOptions

    options = ServerOptions()
    try:
        options.realize(args=["-c", str(path)])
        programs = [g.name for g in options.process_group_configs]
    except (ValueError, OSError, SystemExit) as err:
        return False, f"supervisord refused it: {err}"
    return bool(programs), "" if programs else "no [program:...] sections"


def check_env_file(path: Path, root: Path) -> tuple[bool, str]:
    """Each runtime service loads its settings from the file exactly as it will on the host."""

    problems = []
    routes = any(line.startswith("GPUGATE_ROUTER_") for line in path.read_text().splitlines())
    for cls in (AuthzSettings, KeysSettings, ProberSettings, AlertSinkSettings, *((RouterSettings,) if routes else ())):
        try:
            load_settings(cls, path)
        except ValidationError as err:
            problems.append(f"{cls.__name__}: {err}")
    return not problems, "\n".join(problems)


def check_dashboard(path: Path, root: Path) -> tuple[bool, str]:
    """Grafana's schema as grafana-foundation-sdk reads it, and every panel's PromQL parsed by promtool."""
    try:
        data = json.loads(path.read_bytes())
    except ValueError as err:
        return False, f"not JSON: {err}"
    problems = dashboard_problems(data)
    if not problems:
        queries = root / f"{path.stem}.queries.rules.yml"
        queries.write_text(json.dumps(recording_rules(dashboard_exprs(data)), indent=1))
        ok, out = _run(["promtool", "check", "rules", str(queries)], root)
        problems += [] if ok else [_last_lines(out)]
    return not problems, "\n".join(problems)


def _object(path: Path) -> dict:
    return YAML(typ="safe", pure=True).load(path.read_text())


def stand_in_certificate(root: Path) -> tuple[Path, Path]:
    """A throwaway self-signed certificate and key, for Caddy to load where cert-manager's Secret will be mounted."""
    from datetime import UTC, datetime, timedelta  # noqa: PLC0415

    from cryptography import x509  # noqa: PLC0415 - validation only
    from cryptography.hazmat.primitives import hashes, serialization  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415
    from cryptography.x509.oid import NameOID  # noqa: PLC0415

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gpugate validate stand-in")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(now + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    paths = (root / "stand-in-tls.crt", root / "stand-in-tls.key")
    paths[0].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return paths


def check_pod_caddyfile(path: Path, root: Path) -> tuple[bool, str]:
    """The proxy pods' Caddyfile (a ConfigMap's data), as Caddy itself reads it. The certificate files
    cert-manager's Secret provides in the pod are a throwaway certificate here, so Caddy loads real files."""
    text = _object(path)["data"][CADDYFILE_PATH.name]
    if f"tls {TLS_FILES[0]} {TLS_FILES[1]}" in text:
        cert, key = stand_in_certificate(root)
        text = text.replace(f"tls {TLS_FILES[0]} {TLS_FILES[1]}", f"tls {cert} {key}")
    pod = root / f"{path.stem}.Caddyfile"
    pod.write_text(text)
    return check_caddyfile(pod, root)


def check_rule_object(path: Path, root: Path) -> tuple[bool, str]:
    """A PrometheusRule's groups, as promtool reads a rules file."""
    rules = root / f"{path.stem}.rules.yml"
    rules.write_text(json.dumps(_object(path)["spec"], indent=1))
    return check_rules(rules, root)


def check_wheel(path: Path, root: Path) -> tuple[bool, str]:
    """The runtime wheel: a zip whose metadata names gpugate-runtime at the version this checkout renders for."""
    try:
        with zipfile.ZipFile(path) as wheel:
            bad = wheel.testzip()
            meta = next((n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")), None)
            text = wheel.read(meta).decode() if meta else ""
    except (OSError, zipfile.BadZipFile) as err:
        return False, f"not a wheel: {err}"
    fields = dict(line.split(": ", 1) for line in text.splitlines() if ": " in line)
    wanted = {"Name": "gpugate-runtime", "Version": runtime_version}
    wrong = [f"{k} is {fields.get(k)!r}, expected {v!r}" for k, v in wanted.items() if fields.get(k) != v]
    if bad:
        wrong.append(f"{bad} is corrupt")
    return not wrong, "; ".join(wrong)


def check_lock(path: Path, root: Path) -> tuple[bool, str]:
    """A hash-locked requirements file: every pin exact and hashed, as `pip install --require-hashes` needs."""
    try:
        pins = read_pins(path)
    except (OSError, LockError) as err:
        return False, str(err)
    unhashed = sorted(name for name, pin in pins.items() if not pin.hashes)
    return bool(pins) and not unhashed, f"pins without hashes: {', '.join(unhashed)}" if unhashed else ("" if pins else "no pins")


def check_archive(path: Path, root: Path) -> tuple[bool, str]:
    """The bundle archive as the host unpacks it (hostboot's own extraction), holding the bundle's files."""
    into = root / f"{path.stem}.unpacked"
    try:
        names = extract_bundle(path, into)
    except (OSError, FetchError, tarfile.TarError) as err:
        return False, f"the host would refuse it: {err}"
    bundle = path.parents[1]
    differ = [n for n in names if (into / n).is_file() and (into / n).read_bytes() != (bundle / n).read_bytes()]
    return not differ, f"differs from the bundle: {', '.join(differ)}" if differ else ""


# file pattern -> (tool shown in the verdict, checker); a file may match several.
CHECKS: list[tuple[str, str, Callable[[Path, Path], tuple[bool, str]]]] = [
    ("caddy/Caddyfile", "caddy validate", check_caddyfile),
    ("prometheus/prometheus.yml", "promtool check config", check_prometheus),
    ("prometheus/rules/*.yml", "promtool check rules", check_rules),
    ("alertmanager/alertmanager.yml", "amtool check-config", check_alertmanager),
    ("cloud-init/user-data.yaml", "cloud-init schema", check_cloud_init),
    ("cloud-init/bundle.tar.gz", "gpugate-runtime hostboot extraction", check_archive),
    ("runtime/*.whl", "wheel metadata", check_wheel),
    ("runtime/requirements.lock", "hash-locked requirements", check_lock),
    ("vllm/*.lock", "hash-locked requirements", check_lock),
    ("systemd/*.service", "systemd-analyze verify", check_systemd_unit),
    ("supervisor/supervisord.conf", "supervisord config parser", check_supervisord),
    ("vllm/launch.json", "gpugate-runtime LaunchSpec", check_launch_spec),
    ("vllm/launch-*.json", "gpugate-runtime LaunchSpec", check_launch_spec),
    ("router/routes.json", "gpugate-runtime RouteTable", check_route_table),
    ("runtime/gpugate.env", "gpugate-runtime settings", check_env_file),
    ("kubernetes/*.yaml", "kubernetes-validate + CRD models", check_kubernetes),
    (f"kubernetes/*/configmap-{CADDY_CONFIG}.yaml", "caddy validate", check_pod_caddyfile),
    ("kubernetes/*/prometheusrule-*.yaml", "promtool check rules", check_rule_object),
    ("grafana/*.json", "promtool check rules (panel queries) + grafana-foundation-sdk schema", check_dashboard),
]


_VERSION_COMMANDS = {
    "caddy": ["caddy", "version"],
    "promtool": ["promtool", "--version"],
    "amtool": ["amtool", "--version"],
    "cloud-init": ["cloud-init", "--version"],
    "systemd-analyze": ["systemd-analyze", "--version"],
}


@functools.cache
def tool_version(tool: str) -> str:
    """First version-looking word the tool prints about itself, e.g. v2.6.2."""
    argv = _VERSION_COMMANDS.get(tool)
    if argv is None or shutil.which(argv[0]) is None:
        return ""
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=TOOL_TIMEOUT_S)
    match = re.search(r"\d+\.\d+(\.\d+)?", proc.stdout + proc.stderr)
    return match.group(0) if match else ""


def _labelled(tool: str) -> str:
    version = tool_version(tool.split()[0])
    return f"{tool} ({tool.split()[0]} {version})" if version else tool


def check_manifest(bundle: Bundle) -> Verdict:
    manifest = json.loads(bundle.files[MANIFEST])
    listed = manifest["files"]
    actual = {p for p in bundle.files if p != MANIFEST and p not in bundle.derived}
    wrong = [p for p in actual if listed.get(p) != hashlib.sha256(bundle.files[p]).hexdigest()]
    missing = sorted(actual - set(listed))
    derived = sorted(manifest.get("derived", [])) == sorted(bundle.derived)
    ok = not wrong and not missing and derived
    return Verdict(bundle.stack, MANIFEST, "sha256 of every file", ok, "" if ok else f"mismatch: {wrong + missing}")


def node_fit_verdicts(stack: Stack) -> list[Verdict]:
    """Kubernetes: each Deployment's pod against one node of its pool's machine type (allocatable less DaemonSets)."""
    kube = stack.spec.kubernetes
    if kube is None:
        return []
    return [
        Verdict(stack.name, f"kubernetes/{kube.namespace}/deployment-{fit.pod}.yaml", "node allocatable", fit.fits, fit.message)
        for fit in node_fits(stack.spec, objects(pod_build(stack)))
    ]


def image_verdicts(stack: Stack) -> list[Verdict]:
    """A WARN per image pinned by a placeholder digest: renderable, but `pulumi up` and `gpugate promote` refuse it."""
    return [
        Verdict(
            stack.name, f"{stack.path.name} {field}", "image pin", True,
            f"{problem}; allowed: {IMAGES_ALLOWED}; `pulumi up` and `gpugate promote` refuse it", warning=True,
        )
        for field, problem in image_problems(stack.spec)
    ]


def api_access_verdicts(stack: Stack) -> list[Verdict]:
    """A WARN when the cluster's API server will be private: `pulumi up` must then run inside its network."""
    note = private_api_note(stack.spec, stack.name)
    return [] if note is None else [Verdict(stack.name, f"{stack.path.name} gpugate:admin_cidrs", "cluster API access", True, note, warning=True)]


def validate_stack(stack: Stack) -> list[Verdict]:
    """Render `stack` under a temporary root and check each file with its consumer."""
    with tempfile.TemporaryDirectory(prefix=f"gpugate-validate-{stack.name}-") as tmp:
        layout = HostLayout(Path(tmp))
        for directory in (layout.state, layout.logs, layout.secrets):
            directory.mkdir(parents=True, exist_ok=True)
        # Secret files referenced by configs must exist for the checkers; placeholders, never real secrets.
        layout.alert_secret_file.write_text("https://alerts.invalid/validation-placeholder\n")
        layout.vllm_key_file.write_text("validation-placeholder\n")
        bundle = render_bundle(stack, layout=layout)
        write_bundle(bundle, layout.etc)
        verdicts = []
        for relpath in sorted(bundle.files):
            for pattern, tool, check in CHECKS:
                if fnmatch.fnmatch(relpath, pattern):
                    ok, detail = check(layout.etc / relpath, Path(tmp))
                    verdicts.append(Verdict(stack.name, relpath, _labelled(tool), ok, detail))
        verdicts.append(check_manifest(bundle))
        verdicts += node_fit_verdicts(stack)
        unchecked = sorted(set(bundle.files) - {v.file for v in verdicts})
        verdicts += [Verdict(stack.name, p, "(none)", False, "no checker knows this file") for p in unchecked]
        return verdicts + image_verdicts(stack) + api_access_verdicts(stack)

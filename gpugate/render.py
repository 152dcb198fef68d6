"""Renders a stack's bundle: every config file a gateway host runs, deterministic and free of secrets."""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, StrictUndefined
from ruamel.yaml import YAML

from gpugate_runtime import __version__ as runtime_version
from gpugate_runtime.contract.host import (
    CADDY_GO_ENV,
    ENV_VLLM_KEY,
    KEY_ID_HEADER,
    REQUEST_ID_HEADER,
    VM_LAYOUT,
    VM_RUNTIME_PYTHON,
    systemd_credential,
    HostLayout,
    Ports,
)
from gpugate_runtime.authz import ACCESS_LOG_IDS_FIELD, BODY_LENGTH_HEADER
from gpugate_runtime.launchspec import LaunchSpec
from gpugate_runtime.prober_settings import AlertSinkSettings, ProberSettings
from gpugate_runtime.settings import AuthzSettings, KeysSettings

from gpugate import __version__
from gpugate.alerts import rule_groups
from gpugate.dashboards import dashboard_files
from gpugate.monitoring import RULES_FILE, alertmanager_config, prometheus_config
from gpugate.spec import GatewaySpec, Target
from gpugate.stackfile import REPO_ROOT, Stack

TEMPLATES = REPO_ROOT / "templates"
MANIFEST = "manifest.json"
USER_DATA = "cloud-init/user-data.yaml"

# Files whose content does not feed the bundle hash: the manifest itself, and user-data,
# which carries the hash and so is derived from everything else.
_DERIVED = (MANIFEST, USER_DATA)


@dataclass
class Bundle:
    stack: str
    target: Target
    spec_sha256: str
    files: dict[str, bytes] = field(default_factory=dict)

    @property
    def bundle_sha256(self) -> str:
        """Hash of every non-derived file: what a host's running version is compared by."""
        digest = hashlib.sha256()
        for path in sorted(self.files):
            if path not in _DERIVED:
                digest.update(f"{path}\0{_sha256(self.files[path])}\n".encode())
        return digest.hexdigest()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def default_layout(stack: Stack) -> HostLayout:
    """`/` on cloud hosts; a per-stack state directory for the local target."""
    if stack.spec.target is not Target.LOCAL:
        return VM_LAYOUT
    base = os.environ.get("GPUGATE_STATE_DIR") or Path.home() / ".local" / "state" / "gpugate"
    return HostLayout(Path(base) / stack.name)


@dataclass(frozen=True)
class LocalPaths:
    """Where the local target finds its interpreters and model on this machine."""

    runtime_python: str
    vllm_python: str
    model_dir: str


def local_paths() -> LocalPaths:
    from gpugate.local.model import MODEL_NAME  # noqa: PLC0415 - local target only
    from gpugate.local.vllm_env import VENV_NAME, default_cache_dir, venv_python  # noqa: PLC0415

    cache = default_cache_dir()
    return LocalPaths(
        # The venv's own `python`, whichever name (python, python3, a console script) started us.
        runtime_python=str(Path(sys.prefix) / "bin" / "python"),
        vllm_python=str(venv_python(cache / VENV_NAME)),
        model_dir=str(cache / "models" / MODEL_NAME),
    )


def _templates() -> Environment:
    return Environment(
        loader=FileSystemLoader(str(TEMPLATES)),
        undefined=StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def _sorted(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _sorted(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [_sorted(v) for v in value]
    return value


def dump_yaml(data: Any, header: str) -> bytes:
    yaml = YAML(typ="safe", pure=True)
    yaml.default_flow_style = False
    yaml.width = 4096
    buffer = io.StringIO()
    buffer.write(f"# {header}\n")
    yaml.dump(_sorted(data), buffer)
    return buffer.getvalue().encode()


def dump_json(data: Any) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()


def launch_spec(spec: GatewaySpec, ports: Ports, layout: HostLayout, model_dir: Path | None = None) -> LaunchSpec:
    """vLLM's launch spec; on local the weights are the converted checkpoint in the cache."""
    local = spec.target is Target.LOCAL
    if local:
        model = str(model_dir or local_paths().model_dir)
    else:
        model = spec.model.id
    return LaunchSpec(
        model=model,
        revision=None if local else spec.model.revision,
        served_model_name=spec.model.served_name,
        max_model_len=spec.model.max_model_len,
        dtype=spec.model.dtype,
        quantization=spec.model.quantization,
        device="cpu" if local else "cuda",
        gpu_type=None if local else spec.gpu.type,
        gpu_count=spec.gpu.count,
        gpu_memory_gib=spec.gpu.memory_gib,
        gpu_memory_utilization=spec.vllm.gpu_memory_utilization,
        max_num_seqs=spec.vllm.max_num_seqs,
        tensor_parallel_size=spec.tensor_parallel_size,
        enforce_eager=True if local else spec.vllm.enforce_eager,
        cpu_kv_cache_gib=spec.vllm.cpu_kv_cache_gib or (1 if local else None),
        image=spec.vllm.image,
        model_cache_dir=None if local else layout.state / "hf",
        pgid_file=layout.state / "vllm.pgid" if local else None,
        host="127.0.0.1",
        port=ports.vllm,
        api_key_file=layout.vllm_key_file,
    )


def public_url(spec: GatewaySpec) -> str:
    port = "" if spec.ports.https == 443 else f":{spec.ports.https}"
    return f"https://{spec.domain}{port}"


def runtime_settings(spec: GatewaySpec, ports: Ports, layout: HostLayout) -> dict[str, str]:
    """Environment of the runtime services on a host (local or VM); the proxy pod's is kube.pod_settings."""
    local = spec.target is Target.LOCAL
    return settings_env(
        runtime_services(
            spec,
            ports,
            key_store=layout.key_store,
            authz_log=layout.logs / "authz.log",
            access_log=layout.logs / "access.log",
            vllm_health_url=f"http://127.0.0.1:{ports.vllm}/health",
            # On VMs the prober runs as `gpugate` and gets its key through systemd's LoadCredential=.
            prober_key_file=systemd_credential("gpugate-prober", "prober_api_key")
            if spec.target in (Target.AWS, Target.GCP)
            else layout.prober_key_file,
            ca_file=layout.local_ca_file if local else None,
            expect_gpu=not local,
            alert_log=layout.alert_log,
        )
    )


def runtime_services(
    spec: GatewaySpec,
    ports: Ports,
    *,
    key_store: Path,
    authz_log: Path | str,
    access_log: Path,
    vllm_health_url: str,
    prober_key_file: Path,
    ca_file: Path | None,
    expect_gpu: bool,
    alert_log: Path,
) -> list:
    """The runtime services' settings from the spec, built with their own settings models so that a
    name or a value the runtime would refuse cannot be rendered; where files live is the caller's.
    No secrets: those are files."""
    return [
        AuthzSettings(
            port=ports.authz,
            key_store=key_store,
            log_file=authz_log,
            access_log=access_log,
            default_rpm=spec.limits.rpm,
            default_max_concurrent=spec.limits.max_concurrent,
            max_body_bytes=spec.limits.max_body_kib * 1024,
        ),
        KeysSettings(
            store=key_store,
            expires_days=spec.limits.expires_days,
            rotation_overlap_hours=spec.limits.rotation_overlap_hours,
        ),
        ProberSettings(
            port=ports.prober,
            public_url=public_url(spec),
            model=spec.model.served_name,
            vllm_health_url=vllm_health_url,
            key_file=prober_key_file,
            ca_file=ca_file,
            expect_gpu=expect_gpu,
        ),
        AlertSinkSettings(port=ports.alert_sink, path=alert_log),
    ]


def settings_env(services: list) -> dict[str, str]:
    """PREFIX_FIELD=value for every set field of each runtime settings model, as the services read them."""
    env: dict[str, str] = {}
    for settings in services:
        prefix = settings.model_config["env_prefix"]
        for name, value in settings.model_dump(mode="json").items():
            if value is not None:
                env[f"{prefix}{name.upper()}"] = str(value)
    return env


def render_bundle(stack: Stack, layout: HostLayout | None = None, model_dir: Path | None = None) -> Bundle:
    spec = stack.spec
    layout = layout or default_layout(stack)
    ports = Ports(spec.ports.internal_base)
    source = f"stacks/{stack.path.name}"
    # No spec hash here (manifest.json has it): a header that changes with any key would make
    # every file change, and `gpugate up` would restart every service for a one-key edit.
    header = f"Generated by gpugate {__version__} from {source} — do not edit"
    env = _templates()
    context = {
        "spec": spec,
        "stack": stack.name,
        "ports": ports,
        "layout": layout,
        "header": header,
        "request_id_header": REQUEST_ID_HEADER,
        "key_id_header": KEY_ID_HEADER,
        "env_vllm_key": ENV_VLLM_KEY,
        "caddy_go_env": CADDY_GO_ENV,
        "body_length_header": BODY_LENGTH_HEADER,
        "access_log_ids_field": ACCESS_LOG_IDS_FIELD,
        "runtime_version": runtime_version,
        "vm_runtime_python": VM_RUNTIME_PYTHON,
        "local": local_paths(),
    }

    def template(name: str, **extra: Any) -> bytes:
        return env.get_template(name).render(**context, **extra).encode()

    bundle = Bundle(stack=stack.name, target=spec.target, spec_sha256=stack.spec_sha256)
    files = bundle.files
    files["caddy/Caddyfile"] = template("common/Caddyfile.j2")
    files["vllm/launch.json"] = dump_json(launch_spec(spec, ports, layout, model_dir).model_dump(mode="json"))
    files["prometheus/prometheus.yml"] = dump_yaml(prometheus_config(spec, ports, layout), header)
    files[f"prometheus/{RULES_FILE}"] = dump_yaml(rule_groups(spec), header)
    vm = spec.target in (Target.AWS, Target.GCP)
    credential = systemd_credential("gpugate-alertmanager", "alert_credential") if vm else None
    files["alertmanager/alertmanager.yml"] = dump_yaml(alertmanager_config(spec, ports, layout, credential), header)
    settings = runtime_settings(spec, ports, layout)
    files["runtime/gpugate.env"] = template("common/gpugate.env.j2", settings=settings)
    if not vm:  # VM user-data has no room for it (16 KiB on AWS) and VMs run no Grafana: `gpugate dashboard`
        files.update(dashboard_files(spec, stack.name))

    if spec.target is Target.LOCAL:
        files["supervisor/supervisord.conf"] = template("local/supervisord.conf.j2")
    elif spec.target in (Target.AWS, Target.GCP):
        for unit in sorted(p.name for p in (TEMPLATES / "vm").glob("gpugate-*.service.j2")):
            files[f"systemd/{unit.removesuffix('.j2')}"] = template(f"vm/{unit}")
        from gpugate.userdata import user_data  # noqa: PLC0415 - VM targets only

        files[USER_DATA] = user_data(bundle, layout, header)
    else:  # kubernetes: every object the program creates, one YAML file each (gpugate/kube.py)
        from gpugate.kube import manifest_files  # noqa: PLC0415 - kubernetes target only

        files.update(manifest_files(stack, layout, files))

    files[MANIFEST] = dump_json(
        {
            "stack": stack.name,
            "target": str(spec.target),
            "gpugate_version": __version__,
            "spec_sha256": stack.spec_sha256,
            "bundle_sha256": bundle.bundle_sha256,
            "layout_root": str(layout.root),
            "files": {path: _sha256(data) for path, data in sorted(files.items())},
        }
    )
    return bundle


def write_bundle(bundle: Bundle, out_dir: Path) -> list[Path]:
    """Write the bundle; each file is replaced atomically, and files that an older render of
    this directory listed in its manifest but this one does not are removed (nothing else is)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    previous = _listed_files(out_dir / MANIFEST)
    written = []
    for relpath, data in sorted(bundle.files.items()):
        path = out_dir / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        written.append(path)
    for stale in sorted(previous - set(bundle.files)):
        (out_dir / stale).unlink(missing_ok=True)
    return written


def _listed_files(manifest: Path) -> set[str]:
    try:
        return set(json.loads(manifest.read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return set()

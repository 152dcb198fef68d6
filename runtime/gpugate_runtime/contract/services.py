"""The gateway's services: one typed table that every target's process definitions are generated from.

supervisord programs (local), systemd units (VM) and the proxy pod's containers (Kubernetes) are each
a translation of `services(...)`; none of them states a command line, a user, a port or a credential
of its own. Adding a service is one entry here (see docs/concepts.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from types import MappingProxyType

from gpugate_runtime.contract.defaults import PROMETHEUS_RETENTION
from gpugate_runtime.contract.host import (
    ALERTMANAGER_CONFIG,
    CADDY_GO_ENV,
    CADDYFILE,
    ENV_VLLM_KEY,
    LAUNCH_SPEC,
    LOOPBACK,
    PROMETHEUS_CONFIG,
    ROUTE_TABLE,
    RUNTIME_ENV,
    HostLayout,
    Ports,
    provider_key_name,
    tier_launch_spec,
)

CADDY = Path("/usr/bin/caddy")
PROMETHEUS = Path("/usr/bin/prometheus")
ALERTMANAGER = Path("/usr/bin/prometheus-alertmanager")
SHELL = Path("/bin/sh")

# Users the services run as on a VM and in the images (Kubernetes runs them by uid). The local
# target runs everything as whoever runs `gpugate up`.
USER_GATEWAY = "gpugate"
USER_CADDY = "caddy"
USER_PROMETHEUS = "prometheus"
USER_ROOT = "root"
# Fixed ids in the images gpugate builds (runtime/containers/), so a pod's runAsUser names the same
# user the image has (a uid without a passwd entry breaks PyTorch's and Caddy's home lookups).
UIDS: Mapping[str, int] = MappingProxyType({USER_GATEWAY: 10001, USER_CADDY: 10002})
# The group every gateway user shares: authz reads Caddy's access log through it.
GROUP_GATEWAY = USER_GATEWAY
GID_GATEWAY = UIDS[USER_GATEWAY]
# The umask every service runs with: what it creates is its owner's and the gateway group's at most, never
# other users'. Caddy has no mode option for its access log (2.6 creates it 0666 less the umask, and its
# roller keeps that mode): under this umask it is 0640, which authz reads through the group.
SERVICE_UMASK = 0o027
# supervisord's own umask on a local stack: its log and each program's stdout log are its user's only.
SUPERVISOR_UMASK = 0o077


# The services' names: supervisord programs, `gpugate-<name>` systemd units, pod containers, Prometheus jobs.
VLLM = "vllm"
AUTHZ = "authz"
CADDY_SERVICE = "caddy"
PROBER = "prober"
CADDY_ROOT_CA = "caddy_root_ca"
ALERTSINK = "alertsink"
PROMETHEUS_SERVICE = "prometheus"
ALERTMANAGER_SERVICE = "alertmanager"
ROUTER = "router"  # only on a stack that routes (several tiers or external providers)
NAMES = (VLLM, AUTHZ, CADDY_SERVICE, PROBER, ALERTSINK, PROMETHEUS_SERVICE, ALERTMANAGER_SERVICE, ROUTER)


def tier_service(tier: str) -> str:
    """The service name of an extra tier's vLLM: `vllm-<tier>`."""
    return f"{VLLM}-{tier}"


def is_vllm(name: str) -> bool:
    """A vLLM process: the first model's or an extra tier's."""
    return name == VLLM or name.startswith(f"{VLLM}-")
# Run only on a local stack (the `file` alert channel).
LOCAL_ONLY = (ALERTSINK,)


class Restart(StrEnum):
    ALWAYS = "always"
    ON_FAILURE = "on-failure"


@dataclass(frozen=True)
class Listen:
    """A port a service binds: `address` "" means every interface (the public ports on a VM or pod)."""

    name: str
    port: int
    address: str = LOOPBACK


@dataclass(frozen=True)
class Credential:
    """A secret a service reads. It stays a root-only file on the host; each target hands the service
    its own copy (systemd LoadCredential=, a Secret in a pod, the state dir locally). `env`: given to
    the process as this environment variable; None: the service reads the file whose path its settings name."""

    name: str
    file: Path
    env: str | None = None


@dataclass(frozen=True)
class Health:
    """Ready when an HTTP GET of `path` on the service's first listen port answers 2xx."""

    path: str


@dataclass(frozen=True)
class Service:
    name: str
    description: str
    argv: tuple[str, ...]
    user: str
    listens: tuple[Listen, ...] = ()
    credentials: tuple[Credential, ...] = ()
    # Files the service writes itself (its own logs); its stdout/stderr goes to the target's log.
    logs: tuple[Path, ...] = ()
    health: Health | None = None
    # Prometheus scrapes this path on the first listen port (job name = service name).
    metrics_path: str | None = None
    restart: Restart = Restart.ON_FAILURE
    # Bundle paths (prefixes) the service reads: a change restarts exactly the services that read it.
    reads: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    # Reads the rendered runtime env file (its path is passed as GPUGATE_ENV_FILE).
    env_file: bool = False
    # Started once these are running (ordering only: every service retries what it needs).
    after: tuple[str, ...] = ()
    # Directories it writes (a VM's ProtectSystem=strict leaves the rest read-only).
    writes: tuple[Path, ...] = ()
    # Binds ports below 1024 as a non-root user.
    binds_privileged: bool = False
    # Tells its supervisor when it is ready (sd_notify); Caddy does.
    notifies: bool = False
    # How to make it re-read its configuration without a restart.
    reload_argv: tuple[str, ...] | None = None
    reload_signal: str | None = None
    start_timeout_s: int = 90
    stop_timeout_s: int = 30
    # Run before every start (systemd ExecStartPre): builds what a fresh host lacks, quick when all is there.
    prepare_argv: tuple[str, ...] | None = None
    # Runs in the proxy pod on Kubernetes (Prometheus, Alertmanager and vLLM run elsewhere there).
    in_proxy_pod: bool = False
    # supervisord's umask=, systemd's UMask= (a container in a pod keeps its image's: see docs/security.md).
    umask: int = SERVICE_UMASK

    @property
    def port(self) -> int | None:
        return self.listens[0].port if self.listens else None

    @property
    def health_url(self) -> str | None:
        if self.health is None or self.port is None:
            return None
        return f"http://{LOOPBACK}:{self.port}{self.health.path}"


@dataclass(frozen=True)
class VllmProcess:
    """How this host runs vLLM: from a venv (`python`, the CPU build) or in the pinned container (GPU hosts)."""

    python: Path | None
    user: str
    env: Mapping[str, str] = field(default_factory=dict)
    # The host builds this venv from the bundle's lock (and the model from its pinned source) before each
    # start (`launch prepare`, at once when both are there); None: they are there already (a local stack).
    venv: Path | None = None


@dataclass(frozen=True)
class HostFacts:
    """What the table needs to know about one host: where things live and which variant it runs."""

    layout: HostLayout
    ports: Ports
    runtime_python: Path
    https_port: int
    http_port: int
    # Where Caddy's public ports bind: "" every interface (cloud hosts), LOOPBACK on a local stack.
    public_address: str
    vllm: VllmProcess | None
    alert_sink: bool = False
    alert_credential: bool = False
    # systemd credentials: a service reads its own copy of a secret (VM); else the host's file.
    service_credentials: bool = False
    # Where Caddy's metrics site listens: loopback on a host; every address in a pod, for Prometheus.
    metrics_address: str = LOOPBACK
    # Caddy's internal CA signs the public site (tls.mode internal): the prober trusts its root certificate.
    internal_ca: bool = False
    # A stack that routes: its extra local tiers (each a vLLM, sorted by name), its external providers (each
    # a key the router reads), and whether the router runs between Caddy and them.
    tiers: tuple[str, ...] = ()
    providers: tuple[str, ...] = ()
    router: bool = False


def dirname(bundle_file: str) -> str:
    """A bundle file's directory, as the prefix a service's `reads` names."""
    return bundle_file.rsplit("/", 1)[0] + "/"


def _runtime(facts: HostFacts, *command: str) -> tuple[str, ...]:
    return (str(facts.runtime_python), "-m", "gpugate_runtime", *command)


def _vllm(facts: HostFacts, name: str, spec_file: str, port: int) -> Service:
    """One vLLM process (the first model's, or an extra tier's) started by the launcher from its launch spec."""
    assert facts.vllm is not None
    layout, state = facts.layout, facts.layout.state
    launch = ["launch", "run", "--spec", str(layout.bundle_file(spec_file))]
    if facts.vllm.python is not None:
        # --no-check: the launcher's pre-flight parse of vLLM's flags imports vLLM once more (as long as
        # the server's own import, ~20 s on a CPU host); vLLM parses the same flags as it starts and its
        # error lands in its log, and tests/runtime/test_launcher.py checks the flags we build against
        # vLLM's real parser.
        launch += ["--python", str(facts.vllm.python), "--no-check"]
    return Service(
        name=name,
        description=f"gpugate vLLM model server{'' if name == VLLM else ', tier ' + name[len(VLLM) + 1 :]} (loopback only)",
        argv=_runtime(facts, *launch),
        user=facts.vllm.user,
        listens=(Listen("http", port),),
        credentials=(Credential("vllm_api_key", layout.vllm_key_file),),
        health=Health("/health"),
        metrics_path="/metrics",
        reads=(dirname(spec_file),),
        env=facts.vllm.env,
        writes=(state,) if facts.vllm.venv is None else (state, facts.vllm.venv),
        prepare_argv=None
        if facts.vllm.venv is None
        else _runtime(facts, "launch", "prepare", "--spec", str(layout.bundle_file(spec_file))),
        # A cold start downloads the weights (and on a CPU host builds vLLM's venv, ~1.5 GB from PyPI),
        # loads them and warms up.
        start_timeout_s=900 if facts.vllm.venv is None else 1800,
        stop_timeout_s=60,
    )


def _router(facts: HostFacts) -> Service:
    layout = facts.layout
    return Service(
        name=ROUTER,
        description="gpugate router (local tiers and external providers, loopback only)",
        argv=_runtime(facts, "router", "serve"),
        user=USER_GATEWAY,
        listens=(Listen("http", facts.ports.router),),
        # The local tiers take the internal vLLM key; each provider its own, which only the router reads.
        credentials=(
            Credential("vllm_api_key", layout.vllm_key_file),
            *(Credential(provider_key_name(name), layout.provider_key_file(name)) for name in facts.providers),
        ),
        logs=(layout.route_log,),
        health=Health("/health"),
        metrics_path="/metrics",
        reads=(dirname(RUNTIME_ENV), dirname(ROUTE_TABLE)),
        env_file=True,
        writes=(layout.logs,),
        after=(VLLM, *(tier_service(tier) for tier in facts.tiers)),
    )


def services(facts: HostFacts) -> tuple[Service, ...]:
    """The gateway's services on one host, in start order."""
    layout, ports = facts.layout, facts.ports
    state, logs = layout.state, layout.logs
    out: list[Service] = []
    if facts.vllm is not None:
        out.append(_vllm(facts, VLLM, LAUNCH_SPEC, ports.vllm))
        out += [_vllm(facts, tier_service(tier), tier_launch_spec(tier), ports.tier(i)) for i, tier in enumerate(facts.tiers)]
    out.append(
        Service(
            name=AUTHZ,
            description="gpugate auth service (forward_auth for Caddy, loopback only)",
            argv=_runtime(facts, "authz", "serve"),
            user=USER_GATEWAY,
            listens=(Listen("http", ports.authz),),
            logs=(layout.authz_log,),
            health=Health("/health"),
            metrics_path="/metrics",
            reads=(dirname(RUNTIME_ENV),),
            env_file=True,
            writes=(state, logs),
            in_proxy_pod=True,
        )
    )
    if facts.router:
        out.append(_router(facts))
    caddyfile = str(layout.bundle_file(CADDYFILE))
    caddy_run = (str(CADDY), "run", "--config", caddyfile, "--adapter", "caddyfile")
    out.append(
        Service(
            name=CADDY_SERVICE,
            description="gpugate TLS proxy (Caddy)",
            argv=caddy_run,
            user=USER_CADDY,
            listens=(
                Listen("metrics", ports.caddy_metrics, facts.metrics_address),
                Listen("https", facts.https_port, facts.public_address),
                Listen("http", facts.http_port, facts.public_address),
            ),
            # The internal vLLM key reaches Caddy through its environment: the Caddyfile sends it upstream.
            credentials=(Credential("vllm_api_key", layout.vllm_key_file, env=ENV_VLLM_KEY),),
            logs=(layout.access_log,),
            health=Health("/metrics"),
            metrics_path="/metrics",
            reads=(dirname(CADDYFILE),),
            # Go runtime settings: see CADDY_GO_ENV.
            env=CADDY_GO_ENV,
            after=(AUTHZ, ROUTER) if facts.router else (AUTHZ,),
            writes=(layout.caddy_storage, logs),
            binds_privileged=True,
            notifies=True,
            reload_argv=(str(CADDY), "reload", "--config", caddyfile, "--adapter", "caddyfile"),
            in_proxy_pod=True,
        )
    )
    out.append(
        Service(
            name=PROBER,
            description="gpugate health prober (synthetic checks through the public URL)",
            argv=_runtime(facts, "prober", "serve"),
            user=USER_GATEWAY,
            listens=(Listen("http", ports.prober),),
            # The root certificate is public, but it sits in Caddy's private storage: handed over like a secret.
            credentials=(
                Credential("prober_api_key", layout.prober_key_file),
                *((Credential(CADDY_ROOT_CA, layout.local_ca_file),) if facts.internal_ca else ()),
            ),
            health=Health("/metrics"),
            metrics_path="/metrics",
            reads=(dirname(RUNTIME_ENV),),
            env_file=True,
            after=(CADDY_SERVICE,),
            in_proxy_pod=True,
        )
    )
    if facts.alert_sink:
        out.append(
            Service(
                name=ALERTSINK,
                description="gpugate local alert channel (Alertmanager webhook -> alert log)",
                argv=_runtime(facts, "alertsink", "serve"),
                user=USER_GATEWAY,
                listens=(Listen("http", ports.alert_sink),),
                logs=(layout.alert_log,),
                health=Health("/health"),
                reads=(dirname(RUNTIME_ENV),),
                env_file=True,
                writes=(logs,),
            )
        )
    out.append(
        Service(
            name=PROMETHEUS_SERVICE,
            description="gpugate Prometheus (loopback only)",
            argv=(
                str(PROMETHEUS),
                f"--config.file={layout.bundle_file(PROMETHEUS_CONFIG)}",
                f"--storage.tsdb.path={state / 'prometheus'}",
                f"--web.listen-address={LOOPBACK}:{ports.prometheus}",
                f"--storage.tsdb.retention.time={PROMETHEUS_RETENTION}",
            ),
            user=USER_PROMETHEUS,
            listens=(Listen("http", ports.prometheus),),
            health=Health("/-/ready"),
            metrics_path="/metrics",
            reads=(dirname(PROMETHEUS_CONFIG),),
            writes=(state / "prometheus",),
            reload_signal="HUP",
        )
    )
    credential = (
        (Credential("alert_credential", layout.alert_secret_file),) if facts.alert_credential else ()
    )
    out.append(
        Service(
            name=ALERTMANAGER_SERVICE,
            description="gpugate Alertmanager (loopback only)",
            argv=(
                str(ALERTMANAGER),
                f"--config.file={layout.bundle_file(ALERTMANAGER_CONFIG)}",
                f"--storage.path={state / 'alertmanager'}",
                f"--web.listen-address={LOOPBACK}:{ports.alertmanager}",
                # One Alertmanager per host: no gossip port.
                "--cluster.listen-address=",
            ),
            user=USER_PROMETHEUS,
            listens=(Listen("http", ports.alertmanager),),
            credentials=credential,
            health=Health("/-/ready"),
            metrics_path="/metrics",
            reads=(dirname(ALERTMANAGER_CONFIG),),
            writes=(state / "alertmanager",),
            reload_signal="HUP",
        )
    )
    return tuple(out)


def by_name(table: tuple[Service, ...]) -> dict[str, Service]:
    return {service.name: service for service in table}


def credential_path(service: Service, credential: Credential, facts: HostFacts) -> Path:
    """Where `service` finds its copy of `credential` on this host."""
    if facts.service_credentials:
        return systemd_credential(service.name, credential.name)
    return credential.file


def unit_name(service: Service | str) -> str:
    """The systemd unit name of a service on a VM (without `.service`)."""
    return f"gpugate-{service if isinstance(service, str) else service.name}"


def systemd_credential(service: str, name: str) -> Path:
    """Where systemd's `LoadCredential=name:...` puts a secret for a service that runs as its own user:
    the secret file stays root-only, and only that unit can read its copy."""
    return Path("/run/credentials") / f"{unit_name(service)}.service" / name

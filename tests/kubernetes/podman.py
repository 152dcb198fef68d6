"""Podman for the Kubernetes tests: installs and configures it, builds images, runs pods from Kubernetes YAML.

Images are kept in podman's store and, with an `ImageCache`, as archives under ~/.cache/gpugate/podman
(tests/kubernetes/image_cache.py): a store that lacks an image of the same inputs loads it from there
before it builds anything.

Everything runs with CONTAINERS_CONF pointing at tests/kubernetes/containers.conf, in the harness's
own environment only. What podman adds to the host while the harness runs (CNI networks and their
bridges, CNI-* iptables chains, secrets, the named volumes `kube play` makes for ConfigMaps and
Secrets) is removed by `teardown()` when the harness was the one that added it.

Podman 4.3.1 (Debian 12) differs from a kubelet in ways `kube_play` makes up for, each on purpose
(see `_adapt_for_podman`); everything else in the YAML is played as written:
  - Secrets: a Secret in the YAML becomes a podman secret holding the YAML text, but an env
    `secretKeyRef` reads a podman secret as a JSON map of base64 values, and a Secret volume is
    written with its `data` still base64-encoded (`stringData` dropped; a panic when `optional`
    is unset). The harness creates each Secret as a podman secret in the form env refs read, and
    projects each Secret volume into a read-only host directory as a kubelet would (decoded
    files, `items`, `defaultMode`, group `fsGroup`).
  - Deployments are played with one replica: podman runs one pod whatever `replicas` says, and
    `kube down` would look for one pod per replica and stop at the first missing.
  - Pod `securityContext.sysctls` are ignored; the harness passes them to that one `kube play` as
    podman's default sysctls.
  - A `subPath` mount of a claim's named volume mounts the whole volume. For the claims a test binds to
    data of its own (`kube_play(claims=...)`), the harness mounts a copy of that data as hostPath
    volumes, one per subPath (made when missing, as a kubelet makes it).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import os
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

from tests.apt import ensure_packages
from tests.kubernetes.image_cache import ImageCache

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
CONTAINERS_CONF = HERE / "containers.conf"

# What podman needs here (FIELD-NOTES): CNI plugins rather than netavark (containers.conf pins the
# backend), runc rather than crun, debootstrap for the base image. Installed without recommends, so
# no DNS plugin (dnsmasq) joins the networks.
# Package -> a file that proves it is installed.
APT_PACKAGES: dict[str, str] = {
    "podman": "/usr/bin/podman",
    "buildah": "/usr/bin/buildah",
    "runc": "/usr/sbin/runc",
    "fuse-overlayfs": "/usr/bin/fuse-overlayfs",
    "slirp4netns": "/usr/bin/slirp4netns",
    "catatonit": "/usr/bin/catatonit",
    "uidmap": "/usr/bin/newuidmap",
    "iptables": "/usr/sbin/iptables",
    "containernetworking-plugins": "/usr/lib/cni/bridge",
    "debootstrap": "/usr/sbin/debootstrap",
}

BASE_IMAGE = "localhost/gpugate-debian:bookworm"
LABEL_RECIPE = "dev.gpugate.base-recipe-sha256"
LABEL_CONTEXT = "dev.gpugate.context-sha256"

CNI_LINK_PREFIX = "cni-podman"
CNI_CHAIN_PREFIX = "CNI-"
IPTABLES_TABLES = ("filter", "nat", "mangle", "raw")
CNI_STATE_DIR = Path("/var/lib/cni/networks")

PODMAN_TIMEOUT_S = 900  # a cold image build is the slowest call (a few minutes here)
DEBOOTSTRAP_TIMEOUT_S = 900


class PodmanError(RuntimeError):
    """A podman (or host tool) command failed; the message names the command and its stderr."""


def run_checked(argv: Sequence[str], *, env: Mapping[str, str] | None = None, input: bytes | None = None,
                timeout: float = PODMAN_TIMEOUT_S, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    proc = subprocess.run(list(argv), env=dict(env) if env is not None else None, input=input,
                          capture_output=True, timeout=timeout)
    if check and proc.returncode != 0:
        tail = proc.stderr.decode(errors="replace").strip()[-4000:]
        raise PodmanError(f"`{shlex.join(argv)}` exited {proc.returncode}:\n{tail}")
    return proc


def ensure_installed() -> None:
    """Install podman and its helpers from Debian when any is missing (idempotent; a second call costs nothing)."""
    ensure_packages(APT_PACKAGES)


# --- the base image ----------------------------------------------------------------------------------


def debian_mirrors(sources: Path = Path("/etc/apt/sources.list.d/debian.sources")) -> tuple[str, str]:
    """(archive, security) mirror URIs of this machine's apt, the only Debian mirror tests may use."""
    archive = security = ""
    for stanza in sources.read_text().split("\n\n"):
        fields = dict(line.split(":", 1) for line in stanza.splitlines() if ":" in line and not line.startswith("#"))
        uris = fields.get("URIs", "").split()
        suites = fields.get("Suites", "").split()
        if uris and "bookworm-security" in suites:
            security = uris[0]
        elif uris and "bookworm" in suites:
            archive = uris[0]
    if not archive or not security:
        raise PodmanError(f"{sources}: no URIs for the suites bookworm and bookworm-security")
    return archive, security


@dataclass(frozen=True)
class BaseRecipe:
    """How localhost/gpugate-debian:bookworm is made: debootstrap minbase, then made to look like
    the official debian:bookworm-slim image a release builds on (its apt sources, its slimming)."""

    archive: str
    security: str
    suite: str = "bookworm"
    variant: str = "minbase"

    def files(self) -> dict[str, str]:
        """Files written into the root file system after debootstrap (path -> content)."""
        return {
            "etc/apt/sources.list.d/debian.sources": (
                f"Types: deb\nURIs: {self.archive}\nSuites: {self.suite} {self.suite}-updates\n"
                "Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n"
                f"Types: deb\nURIs: {self.security}\nSuites: {self.suite}-security\n"
                "Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
            ),
            # As in the official image: no .deb or package cache stays in a layer after apt-get.
            "etc/apt/apt.conf.d/docker-clean": (
                'DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb '
                '/var/cache/apt/*.bin || true"; };\n'
                'APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb '
                '/var/cache/apt/*.bin || true"; };\n'
                'Dir::Cache::pkgcache ""; Dir::Cache::srcpkgcache "";\n'
            ),
            # The slim variant's dpkg filter: no documentation or translations in images.
            "etc/dpkg/dpkg.cfg.d/docker": (
                "path-exclude /usr/share/doc/*\npath-include /usr/share/doc/*/copyright\n"
                "path-exclude /usr/share/man/*\npath-exclude /usr/share/groff/*\npath-exclude /usr/share/info/*\n"
                "path-exclude /usr/share/lintian/*\npath-exclude /usr/share/linda/*\npath-exclude /usr/share/locale/*\n"
            ),
            "etc/resolv.conf": "",  # podman writes the container's own
            "etc/hostname": "",
        }

    # Removed after debootstrap: its package downloads and indexes, the host's sources.list, and
    # what the dpkg filter above would have kept out.
    removed: tuple[str, ...] = (
        "etc/apt/sources.list",
        "var/cache/apt/archives/*.deb",
        "var/cache/apt/*.bin",
        "var/lib/apt/lists/*",
        "var/log/*.log",
        "var/log/apt/*",
        "usr/share/man/*",
        "usr/share/info/*",
        "usr/share/locale/*",
    )

    def digest(self) -> str:
        payload = json.dumps(
            {"suite": self.suite, "variant": self.variant, "archive": self.archive, "files": self.files(),
             "removed": self.removed},
            sort_keys=True,
        )
        return hashlib.sha256(payload.encode()).hexdigest()


@dataclass(frozen=True)
class BuildResult:
    """An image in podman's store: its tag and id, whether this call built it or loaded it from the
    cache, and how long that took."""

    tag: str
    image_id: str
    built: bool
    seconds: float
    loaded: bool = False


def context_digest(containerfile: Path, context: Path, build_args: Mapping[str, str], base_id: str) -> str:
    """sha256 over the Containerfile, every file of the context (path, exec bit, bytes), the build
    arguments and the base image's id: the same inputs give the same image."""
    digest = hashlib.sha256()

    def add(*parts: bytes) -> None:
        for part in parts:
            digest.update(len(part).to_bytes(8, "big") + part)

    add(b"containerfile", containerfile.read_bytes(), b"base", base_id.encode())
    for name, value in sorted(build_args.items()):
        add(b"arg", name.encode(), value.encode())
    files = sorted(p for p in context.rglob("*") if p.is_file() or p.is_symlink())
    for path in files:
        rel = path.relative_to(context).as_posix().encode()
        if path.is_symlink():
            add(b"link", rel, os.readlink(path).encode())
        else:
            add(b"file", rel, b"x" if os.access(path, os.X_OK) else b"-", path.read_bytes())
    return digest.hexdigest()


# --- what runs ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Process:
    """One process of a container, as the kernel sees it (/proc/<host pid>/status on this machine)."""

    container: str
    host_pid: int
    argv: tuple[str, ...]
    uids: tuple[int, int, int, int]  # real, effective, saved, file-system
    gids: tuple[int, int, int, int]
    groups: tuple[int, ...]
    cap_effective: int
    no_new_privs: bool


@dataclass(frozen=True)
class Container:
    name: str
    id: str
    is_infra: bool
    state: str


@dataclass
class Played:
    """What one `kube_play` made: the YAML podman was given, its pods, and what to remove afterwards."""

    yaml_path: Path
    pods: list[str]
    projected: list[Path] = field(default_factory=list)
    secrets: set[str] = field(default_factory=set)
    volumes: set[str] = field(default_factory=set)
    down: bool = False


@dataclass(frozen=True)
class HostNetwork:
    """The host network state podman can change: CNI bridges, CNI-* iptables chains, CNI networks."""

    links: frozenset[str]
    chains: frozenset[tuple[str, str]]  # (table, chain)
    networks: frozenset[str]
    state_dirs: frozenset[str]


class Podman:
    """Podman as the tests use it. `workdir` holds the harness's own files (played YAML, projected
    Secret volumes, the debootstrap root); `teardown()` undoes what this instance added to the host.
    With `cache`, images missing from the store are loaded from it, and what is built is saved to it."""

    def __init__(self, workdir: Path, *, storage_conf: Path | None = None, cache: ImageCache | None = None) -> None:
        self.workdir = workdir
        self.cache = cache
        workdir.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}
        if storage_conf is not None:  # a store of its own (build timings from an empty store)
            self.env["CONTAINERS_STORAGE_CONF"] = str(storage_conf)
        self.played: list[Played] = []
        self.before = self.host_network()

    # --- plain commands -----------------------------------------------------------------------------

    def run(self, *args: str, input: bytes | None = None, timeout: float = PODMAN_TIMEOUT_S, check: bool = True,
            env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
        return run_checked(["podman", *args], env=env or self.env, input=input, timeout=timeout, check=check)

    def text(self, *args: str, **kwargs: Any) -> str:
        return self.run(*args, **kwargs).stdout.decode()

    def _names(self, *args: str) -> list[str]:
        return self.text(*args).split()

    def image_labels(self, tag: str) -> dict[str, str] | None:
        proc = self.run("image", "inspect", tag, "--format", "{{json .Labels}}", check=False)
        if proc.returncode != 0:
            return None
        return json.loads(proc.stdout) or {}

    def image_id(self, tag: str) -> str:
        return self.text("image", "inspect", tag, "--format", "{{.Id}}").strip()

    def image_size(self, tag: str) -> int:
        """Bytes of the image's layers, uncompressed, as `podman images` counts them."""
        return int(self.text("image", "inspect", tag, "--format", "{{.Size}}").strip())

    def remove_image(self, tag: str) -> None:
        self.run("rmi", "--force", tag, check=False)

    # --- images -------------------------------------------------------------------------------------

    def base_image(self, recipe: BaseRecipe | None = None) -> BuildResult:
        """localhost/gpugate-debian:bookworm from debootstrap (about 2 min), kept until its recipe changes."""
        recipe = recipe or BaseRecipe(*debian_mirrors())
        want = recipe.digest()
        labels = self.image_labels(BASE_IMAGE)
        if labels is not None and labels.get(LABEL_RECIPE) == want:
            self._keep_cached(BASE_IMAGE, want)
            return BuildResult(BASE_IMAGE, self.image_id(BASE_IMAGE), built=False, seconds=0.0)
        loaded = self._load_cached(BASE_IMAGE, LABEL_RECIPE, want)
        if loaded is not None:
            return loaded
        started = time.monotonic()
        rootfs = Path(tempfile.mkdtemp(prefix="debootstrap-", dir=self.workdir))
        try:
            log.info("debootstrap %s %s into %s", recipe.variant, recipe.suite, rootfs)
            run_checked(["debootstrap", f"--variant={recipe.variant}", recipe.suite, str(rootfs), recipe.archive],
                        timeout=DEBOOTSTRAP_TIMEOUT_S)
            for pattern in recipe.removed:
                for path in rootfs.glob(pattern):
                    shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
            for rel, content in recipe.files().items():
                target = rootfs / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(content)
            tar = subprocess.Popen(["tar", "-C", str(rootfs), "--numeric-owner", "-cf", "-", "."], stdout=subprocess.PIPE)
            try:
                imported = subprocess.run(
                    ["podman", "import", "--change", f"LABEL {LABEL_RECIPE}={want}", "--change", 'CMD ["bash"]',
                     "-", BASE_IMAGE],
                    stdin=tar.stdout, env=self.env, capture_output=True, timeout=PODMAN_TIMEOUT_S,
                )
            finally:
                assert tar.stdout is not None
                tar.stdout.close()
                tar.wait()
            if imported.returncode != 0 or tar.returncode != 0:
                raise PodmanError(f"podman import of {rootfs} failed: {imported.stderr.decode(errors='replace')[-2000:]}")
        finally:
            shutil.rmtree(rootfs, ignore_errors=True)
        if self.cache is not None:
            self.cache.save(self, BASE_IMAGE, want)
        return BuildResult(BASE_IMAGE, self.image_id(BASE_IMAGE), built=True, seconds=time.monotonic() - started)

    def _keep_cached(self, tag: str, want: str) -> None:
        """An image the store holds is in the cache too (a store filled before the cache existed)."""
        if self.cache is not None and not self.cache.archive(tag, want).is_file():
            self.cache.save(self, tag, want)

    def _load_cached(self, tag: str, label: str, want: str) -> BuildResult | None:
        """`tag` loaded from the cache's archive for inputs `want`, if there is one and it is what it says."""
        if self.cache is None:
            return None
        replaced = self.image_id(tag) if self.image_labels(tag) is not None else None
        seconds = self.cache.load(self, tag, want)
        if seconds is None:
            return None
        labels = self.image_labels(tag) or {}
        if labels.get(label) != want:
            log.warning("the cached archive of %s holds other inputs (%s): building instead", tag, labels.get(label))
            return None
        loaded = self.image_id(tag)
        if replaced and replaced != loaded:
            self.run("rmi", replaced, check=False)
        log.info("%s loaded from %s in %.1f s", tag, self.cache.directory, seconds)
        return BuildResult(tag, loaded, built=False, seconds=seconds, loaded=True)

    def build(self, containerfile: Path, context: Path, tag: str, *, build_args: Mapping[str, str] | None = None,
              secrets: Mapping[str, Path] | None = None, no_cache: bool = False) -> BuildResult:
        """`podman build` unless `tag` already holds an image of the same inputs (see `context_digest`).

        Secrets (`--secret id=NAME,src=PATH`) reach RUN steps that mount them and are not part of
        the inputs: they never change what is built. RUN steps share the host's network namespace
        (`--network host`), so a build adds no bridge or iptables rule to this machine.
        """
        build_args = dict(build_args or {})
        base = build_args.get("BASE")
        base_id = self.image_id(base) if base and base.startswith("localhost/") else (base or "")
        want = context_digest(containerfile, context, build_args, base_id)
        labels = self.image_labels(tag)
        if not no_cache and labels is not None and labels.get(LABEL_CONTEXT) == want:
            self._keep_cached(tag, want)
            return BuildResult(tag, self.image_id(tag), built=False, seconds=0.0)
        if not no_cache:
            loaded = self._load_cached(tag, LABEL_CONTEXT, want)
            if loaded is not None:
                return loaded
        argv = ["build", "--network", "host", "--file", str(containerfile), "--tag", tag,
                "--label", f"{LABEL_CONTEXT}={want}"]
        if no_cache:
            argv.append("--no-cache")
        for name, value in sorted(build_args.items()):
            argv += ["--build-arg", f"{name}={value}"]
        for name, path in sorted((secrets or {}).items()):
            argv += ["--secret", f"id={name},src={path}"]
        replaced = self.image_id(tag) if labels is not None else None
        started = time.monotonic()
        proc = self.run(*argv, str(context), check=False)
        seconds = time.monotonic() - started
        (self.workdir / f"build-{tag.replace('/', '_').replace(':', '_')}.log").write_bytes(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            output = (proc.stdout + proc.stderr).decode(errors="replace")[-6000:]
            raise PodmanError(f"podman build of {containerfile} (tag {tag}) exited {proc.returncode}:\n{output}")
        built = self.image_id(tag)
        if replaced and replaced != built:
            # The image the tag named before, now untagged: without this every change of a runtime
            # source would leave ~200 MB behind. Refused (and kept) while a container uses it.
            self.run("rmi", replaced, check=False)
        if self.cache is not None:
            self.cache.save(self, tag, want)
        return BuildResult(tag, built, built=True, seconds=seconds)

    # --- pods ---------------------------------------------------------------------------------------

    def kube_play(self, yaml_text: str, *, network: str | None = None, name: str = "play",
                  claims: Mapping[str, Path] | None = None) -> Played:
        """`podman kube play` of Kubernetes YAML (after `_adapt_for_podman`); returns what it started.

        `claims` binds PersistentVolumeClaims to volumes that already hold data, as a cluster binds a
        claim to an existing volume: claim name -> a directory (owners and modes as they should be in
        the pod). A copy of it is mounted as a hostPath, each `subPath` mount as its subdirectory (see
        `_bind_claims`). The YAML must then not hold the claim object itself."""
        docs = [doc for doc in YAML(typ="safe", pure=True).load_all(yaml_text) if doc]
        play_dir = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=self.workdir))
        claims = dict(claims or {})
        declared = {d["metadata"]["name"] for d in docs if d.get("kind") == "PersistentVolumeClaim"}
        if set(claims) & declared:
            raise PodmanError(f"claims {sorted(set(claims) & declared)} are both pre-filled and in the YAML")
        adapted = _adapt_for_podman(docs, play_dir, claims)
        yaml_path = play_dir / "play.yaml"
        out = io.StringIO()
        YAML(typ="safe", pure=True).dump_all(adapted.docs, out)
        yaml_path.write_text(out.getvalue())
        volumes_before = set(self._names("volume", "ls", "--format", "{{.Name}}"))
        held = set(self._names("secret", "ls", "--format", "{{.Name}}")) | volumes_before
        clash = (_claimed_names(adapted.docs) | set(adapted.secrets)) & held
        if clash:
            raise PodmanError(
                f"podman already holds secrets or volumes named {sorted(clash)}; kube play would use them "
                "as they are (stale content). Remove them with `podman secret rm` / `podman volume rm`."
            )
        # Named before anything is made, so that a play that fails half way is still removed in full.
        played = Played(yaml_path, _pod_names(adapted.docs), adapted.projected)
        self.played.append(played)
        for secret, content in sorted(adapted.secrets.items()):
            self.run("secret", "create", secret, "-", input=content)
            played.secrets.add(secret)
        env = self.env
        if adapted.sysctls:
            env = {**self.env, "CONTAINERS_CONF": str(self._conf_with_sysctls(play_dir, adapted.sysctls))}
        argv = ["kube", "play", "--quiet"]
        if network:
            argv += ["--network", network]
        proc = self.run(*argv, str(yaml_path), check=False, env=env)
        played.volumes = set(self._names("volume", "ls", "--format", "{{.Name}}")) - volumes_before
        if proc.returncode != 0:
            raise PodmanError(f"podman kube play {yaml_path} exited {proc.returncode}:\n{proc.stderr.decode(errors='replace')}")
        return played

    def kube_down(self, played: Played) -> None:
        """`podman kube down`, then the secrets and ConfigMap/Secret volumes that play created (down keeps them)."""
        if played.down:
            return
        self.run("kube", "down", str(played.yaml_path), check=False)
        for pod in played.pods:  # a pod whose start failed half way is not always known to kube down
            self.run("pod", "rm", "--force", "--ignore", pod, check=False)
        for volume in sorted(played.volumes):  # kube down keeps those of ConfigMaps and claims
            self.run("volume", "rm", "--force", volume, check=False)
        for secret in sorted(played.secrets):
            self.run("secret", "rm", secret, check=False)
        for path in played.projected:
            shutil.rmtree(path, ignore_errors=True)
        played.down = True

    def containers(self, pod: str) -> list[Container]:
        """The containers of a pod, infra container included (marked)."""
        info = json.loads(self.text("pod", "inspect", pod))
        infra = info.get("InfraContainerID", "")
        return [
            Container(c["Name"], c["Id"], c["Id"] == infra, c["State"])
            for c in info.get("Containers", [])
        ]

    def exec(self, container: str, argv: Sequence[str], *, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
        return self.run("exec", container, *argv, check=check, timeout=timeout)

    def logs(self, container: str) -> str:
        proc = self.run("logs", container, check=False)
        return (proc.stdout + proc.stderr).decode(errors="replace")

    def pod_logs(self, played: Played, tail: int = 3000) -> str:
        """The last `tail` characters of each container's log, for failure messages."""
        return "\n".join(
            f"--- {c.name} ({c.state}):\n{self.logs(c.name)[-tail:]}"
            for pod in played.pods for c in self.containers(pod) if not c.is_infra
        )

    def top(self, container: str) -> list[Process]:
        """Every process of a running container with its credentials, read from the kernel: `podman top`
        names the host pids, /proc/<pid>/status says who each runs as."""
        rows = self.text("top", container, "hpid").split()[1:]  # first word: the header
        if not rows:
            raise PodmanError(f"podman top {container}: no processes (is it running?)")
        return [p for p in (_process(container, int(pid)) for pid in rows) if p is not None]

    def wait_running(self, played: Played, *, timeout: float = 60) -> list[Container]:
        """Every container of the played pods is running (else PodmanError with their logs)."""
        deadline = time.monotonic() + timeout
        while True:
            containers = [c for pod in played.pods for c in self.containers(pod)]
            if containers and all(c.state == "running" for c in containers):
                return containers
            stopped = [c for c in containers if c.state in ("exited", "stopped", "dead")]
            if stopped or time.monotonic() > deadline:
                raise PodmanError(f"pods {played.pods} not running:\n{self.pod_logs(played)}")
            time.sleep(0.5)

    # --- teardown -----------------------------------------------------------------------------------

    def teardown(self) -> None:
        """Remove what this harness added: played pods, their secrets and volumes, and the CNI networks,
        bridges, iptables chains and IPAM state that appeared on the host since it started."""
        for played in self.played:
            self.kube_down(played)
        others = self.text("ps", "--all", "--quiet").split()
        if others:
            log.warning("podman still has containers %s: leaving the host network as it is", others)
            return
        now = self.host_network()
        for network in sorted(now.networks - self.before.networks):
            self.run("network", "rm", "--force", network, check=False)
        for link in sorted(now.links - self.before.links):
            run_checked(["ip", "link", "delete", link], check=False)
        _remove_chains(now.chains - self.before.chains)
        for name in sorted(now.state_dirs - self.before.state_dirs):
            shutil.rmtree(CNI_STATE_DIR / name, ignore_errors=True)

    def host_network(self) -> HostNetwork:
        links = json.loads(run_checked(["ip", "-json", "link", "show"]).stdout)
        chains = set()
        for table in IPTABLES_TABLES:
            proc = run_checked(["iptables", "-t", table, "-S"], check=False)
            for line in proc.stdout.decode().splitlines():
                if line.startswith(f"-N {CNI_CHAIN_PREFIX}"):
                    chains.add((table, line.split()[1]))
        return HostNetwork(
            links=frozenset(link["ifname"] for link in links if link["ifname"].startswith(CNI_LINK_PREFIX)),
            chains=frozenset(chains),
            networks=frozenset(self._names("network", "ls", "--format", "{{.Name}}")),
            state_dirs=frozenset(p.name for p in CNI_STATE_DIR.iterdir()) if CNI_STATE_DIR.is_dir() else frozenset(),
        )

    def _conf_with_sysctls(self, play_dir: Path, sysctls: Iterable[str]) -> Path:
        conf = play_dir / "containers.conf"
        text = CONTAINERS_CONF.read_text()
        # podman's own default plus the pod's; this file replaces (not extends) default_sysctls.
        line = "default_sysctls = " + json.dumps(["net.ipv4.ping_group_range=0 0", *sysctls])
        conf.write_text(text.replace("[containers]\n", f"[containers]\n{line}\n", 1))
        return conf


# --- adapting Kubernetes YAML to podman 4.3.1 -----------------------------------------------------------


def _pod_specs(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    specs = []
    for doc in docs:
        if doc.get("kind") == "Pod":
            specs.append(doc["spec"])
        elif doc.get("kind") == "Deployment":
            specs.append(doc["spec"]["template"]["spec"])
    return specs


def _secret_files(secret: dict[str, Any]) -> dict[str, bytes]:
    files = {key: base64.b64decode(value) for key, value in (secret.get("data") or {}).items()}
    files.update({key: str(value).encode() for key, value in (secret.get("stringData") or {}).items()})
    return files


@dataclass(frozen=True)
class Adapted:
    """Kubernetes documents as podman 4.3.1 plays them, and what the harness makes for them."""

    docs: list[dict[str, Any]]  # without the Secrets
    secrets: dict[str, bytes]  # podman secret name -> content (JSON: key -> base64 value)
    sysctls: list[str]  # "name=value"
    projected: list[Path]  # host directories standing in for Secret volumes and bound claims


def _bind_claims(spec: dict[str, Any], claims: Mapping[str, Path], play_dir: Path) -> list[Path]:
    """Each volume of `spec` that mounts one of `claims` -> hostPath volumes of a copy of its data: one for
    the whole claim, one per subPath a container mounts (podman 4.3.1 ignores subPath on named volumes)."""
    bound: list[Path] = []
    volumes = spec.get("volumes") or []
    for volume in list(volumes):
        claim = (volume.get("persistentVolumeClaim") or {}).get("claimName")
        if claim not in claims:
            continue
        root = play_dir / "claims" / volume["name"]
        if not root.exists():
            root.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(claims[claim], root, symlinks=True)
            for path in [root, *root.rglob("*")]:  # copytree keeps modes, not owners
                source = claims[claim] / path.relative_to(root)
                stat = source.lstat()
                os.lchown(path, stat.st_uid, stat.st_gid)
            bound.append(root)
        volumes.remove(volume)
        replacements: dict[str, str] = {}
        for container in spec.get("containers", []) + spec.get("initContainers", []):
            for mount in container.get("volumeMounts") or []:
                if mount["name"] != volume["name"]:
                    continue
                sub = mount.pop("subPath", "")
                name = f"{volume['name']}-{sub.replace('/', '-')}" if sub else volume["name"]
                if name not in replacements:
                    directory = root / sub
                    if not directory.exists():
                        directory.mkdir(parents=True)
                        shutil.copystat(root, directory)
                        stat = root.stat()
                        os.chown(directory, stat.st_uid, stat.st_gid)
                    replacements[name] = str(directory)
                mount["name"] = name
        volumes += [{"name": name, "hostPath": {"path": path, "type": "Directory"}} for name, path in sorted(replacements.items())]
    return bound


def _adapt_for_podman(docs: list[dict[str, Any]], play_dir: Path, claims: Mapping[str, Path] | None = None) -> Adapted:
    """Kubernetes YAML -> what podman 4.3.1's kube play runs the way a kubelet would (module docstring)."""
    docs = json.loads(json.dumps(docs))  # the caller's documents stay as they were
    secrets = {d["metadata"]["name"]: _secret_files(d) for d in docs if d.get("kind") == "Secret"}
    out = [d for d in docs if d.get("kind") != "Secret"]
    for doc in out:
        if doc.get("kind") == "Deployment":
            doc["spec"]["replicas"] = 1
    sysctls: list[str] = []
    projected: list[Path] = []
    for spec in _pod_specs(out):
        context = spec.get("securityContext") or {}
        sysctls += [f"{s['name']}={s['value']}" for s in context.pop("sysctls", None) or []]
        fs_group = context.get("fsGroup")
        projected += _bind_claims(spec, claims or {}, play_dir)
        for volume in spec.get("volumes") or []:
            source = volume.pop("secret", None)
            if source is None:
                continue
            name = source["secretName"]
            if name not in secrets:
                raise PodmanError(f"volume {volume['name']!r}: Secret {name!r} is not in the YAML")
            files = secrets[name]
            items = source.get("items") or [{"key": key, "path": key} for key in sorted(files)]
            mode = int(source.get("defaultMode", 0o644))
            directory = play_dir / "secrets" / volume["name"]
            directory.mkdir(parents=True)
            for item in items:
                target = directory / item["path"]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(files[item["key"]])
                target.chmod(int(item.get("mode", mode)))
                if fs_group is not None:  # a kubelet gives the files the pod's fsGroup
                    os.chown(target, 0, int(fs_group))
            projected.append(directory)
            volume["hostPath"] = {"path": str(directory), "type": "Directory"}
    podman_secrets = {
        name: json.dumps({key: base64.b64encode(value).decode() for key, value in files.items()}, sort_keys=True).encode()
        for name, files in secrets.items()
    }
    return Adapted(out, podman_secrets, sorted(set(sysctls)), projected)


def _claimed_names(docs: list[dict[str, Any]]) -> set[str]:
    """Names kube play gives named volumes for these documents (ConfigMap volumes, claims)."""
    names: set[str] = set()
    for spec in _pod_specs(docs):
        for volume in spec.get("volumes") or []:
            if "configMap" in volume:
                names.add(volume["configMap"]["name"])
            elif "persistentVolumeClaim" in volume:
                names.add(volume["persistentVolumeClaim"]["claimName"])
    return names


def _pod_names(docs: list[dict[str, Any]]) -> list[str]:
    """The pods kube play makes: a Pod by its name, a Deployment (one replica) as <name>-pod-0."""
    names = []
    for doc in docs:
        if doc.get("kind") == "Pod":
            names.append(doc["metadata"]["name"])
        elif doc.get("kind") == "Deployment":
            names.append(f"{doc['metadata']['name']}-pod-0")
    return names


def _process(container: str, host_pid: int) -> Process | None:
    try:
        status = Path(f"/proc/{host_pid}/status").read_text()
        argv = Path(f"/proc/{host_pid}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
    except FileNotFoundError:  # exited between `podman top` and now
        return None
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    uids = tuple(int(v) for v in fields["Uid"].split())
    gids = tuple(int(v) for v in fields["Gid"].split())
    return Process(
        container=container,
        host_pid=host_pid,
        argv=tuple(a.decode(errors="replace") for a in argv),
        uids=uids,  # type: ignore[arg-type]
        gids=gids,  # type: ignore[arg-type]
        groups=tuple(int(v) for v in fields.get("Groups", "").split()),
        cap_effective=int(fields["CapEff"], 16),
        no_new_privs=fields.get("NoNewPrivs", "0").strip() == "1",
    )


def _remove_chains(chains: Iterable[tuple[str, str]]) -> None:
    """Delete iptables chains: first every rule that jumps to one of them, then their rules, then them."""
    by_table: dict[str, set[str]] = {}
    for table, chain in chains:
        by_table.setdefault(table, set()).add(chain)
    for table, names in by_table.items():
        rules = run_checked(["iptables", "-t", table, "-S"]).stdout.decode().splitlines()
        for rule in rules:
            words = shlex.split(rule)
            if words[:1] == ["-A"] and words[1] not in names and "-j" in words and words[words.index("-j") + 1] in names:
                run_checked(["iptables", "-t", table, "-D", *words[1:]], check=False)
        for chain in sorted(names):
            run_checked(["iptables", "-t", table, "-F", chain], check=False)
        for chain in sorted(names):
            run_checked(["iptables", "-t", table, "-X", chain], check=False)

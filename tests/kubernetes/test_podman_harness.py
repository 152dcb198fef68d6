"""tests/kubernetes/podman.py: what the harness leaves on this machine after a pod on podman's default bridge."""

from __future__ import annotations

import pytest

from tests.e2e.conftest import find_free_port
from tests.kubernetes.podman import BuildResult, Podman

pytestmark = [pytest.mark.e2e, pytest.mark.podman]

BRIDGED_POD = """\
apiVersion: v1
kind: Pod
metadata:
  name: gpugate-harness-bridge
spec:
  containers:
  - name: sleeper
    image: {image}
    command: [python, -c, "import time; time.sleep(300)"]
    ports:
    - {{containerPort: 8080, hostPort: {port}, hostIP: 127.0.0.1}}
"""


def test_teardown_removes_the_bridge_and_iptables_chains_a_bridged_pod_added(
    podman: Podman, runtime_image: BuildResult, tmp_path
):
    # given a harness of its own, and a pod on kube play's default network (a CNI bridge) with a hostPort
    harness = Podman(tmp_path / "harness")
    before = harness.before
    played = harness.kube_play(BRIDGED_POD.format(image=runtime_image.tag, port=find_free_port()), name="bridge")
    harness.wait_running(played)
    during = harness.host_network()
    # (the pod did change the host: otherwise this test would prove nothing)
    assert during.links - before.links, "no new CNI bridge"
    assert {table for table, _ in during.chains - before.chains} >= {"nat"}, "no new CNI iptables chains"
    # when the harness is torn down
    harness.teardown()
    # then the host network is as the harness found it, and the pod is gone
    assert harness.host_network() == before
    assert podman.run("pod", "exists", played.pods[0], check=False).returncode == 1

"""Run this Pulumi program offline: under mocks that stand in for the clouds, recording every
resource's type, name, URN, options and inputs in wire form (secret markers intact).

`gpugate plan` and the tests use it; `pulumi up` never does.
"""

from __future__ import annotations

import contextvars
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import pulumi
from google.protobuf import json_format
from pulumi.runtime.mocks import MockMonitor
from pulumi.runtime.stack import run_pulumi_func
from pulumi.runtime.sync_await import _sync_await
from pulumi_policy.deserialize import deserialize_properties

from gpugate.spec import GatewaySpec
from gpugate.stackfile import NAMESPACE, Stack
from infra.program import gateway, stack_outputs

PROJECT = "gpugate"
# Stand-ins for values only the cloud knows; documentation address ranges (RFC 5737).
PLACEHOLDER_IPS = ("198.51.100.10", "198.51.100.11")
PLACEHOLDER_API_IP = "192.0.2.10"  # a cluster's API server (RFC 5737)
PLACEHOLDER_CA = "cGxhbm5lZC1jbHVzdGVyLWNh"  # base64 of "planned-cluster-ca"
# Secrets the plan feeds the program. Each is a recognisable canary as long as the longest real
# value it stands for, so the user-data size is measured honestly and any plain copy is found.
VLLM_KEY_CANARY_PREFIX = "gpugateplancanaryvllmkey"
ALERT_CANARY = ("gpugate-plan-canary-alert-credential-" + "x" * 128)[:128]  # a Slack webhook URL is ~80
CONFIG_KEY_CANARY = "gpugateplancanaryconfigvllmkey" + "y" * 18  # 48, like the generated key
HF_TOKEN_CANARY = "hf_gpugateplancanaryhftoken" + "z" * 10  # 37, like a Hugging Face token
PROVIDER_KEY_CANARY_PREFIX = "sk-gpugateplancanaryproviderkey-"  # + the provider's name, padded to 164 like a long API key


def provider_key_canary(provider: str) -> str:
    return (PROVIDER_KEY_CANARY_PREFIX + provider + "-" + "p" * 164)[:164]

GCP_API = "https://www.googleapis.com/compute/v1"


def vllm_key_canary(length: int) -> str:
    """What the mocked RandomPassword returns: a canary of the requested length."""
    return (VLLM_KEY_CANARY_PREFIX + "0" * length)[:length]


@dataclass
class Recorded:
    """One resource as the engine would receive it: type token, name, URN and wire-form inputs."""

    type: str
    name: str
    urn: str
    custom: bool
    wire: dict[str, Any]
    # Resource options that decide how a change lands (replace, in place, ignored).
    ignore_changes: tuple[str, ...] = ()
    replace_on_changes: tuple[str, ...] = ()
    delete_before_replace: bool = False
    # URNs of the resources this one waits for (depends_on and the Outputs its inputs use).
    dependencies: tuple[str, ...] = ()

    @property
    def props(self) -> dict[str, Any]:
        """Inputs with secrets unwrapped, as a validation policy sees them under `pulumi up`."""
        return deserialize_properties(self.wire)

    def policy_props(self) -> Any:
        """Inputs behind pulumi-policy's secrets-preserving proxy: plain on access, Secret-marked inside."""
        return deserialize_properties(self.wire, proxy_secrets=True)


@dataclass
class Run:
    resources: list[Recorded] = field(default_factory=list)
    outputs: dict[str, tuple[Any, bool]] = field(default_factory=dict)  # name -> (value, is_secret)
    canaries: tuple[str, ...] = ()


class _RecordingMonitor(MockMonitor):
    """The mock resource monitor, keeping each registration's inputs in wire form (secret markers intact)."""

    def __init__(self, mocks: pulumi.runtime.Mocks, run: Run):
        super().__init__(mocks)
        self.run = run

    def RegisterResource(self, request):
        self.run.resources.append(
            Recorded(
                type=request.type,
                name=request.name,
                urn=self.make_urn(request.parent, request.type, request.name),
                custom=bool(request.custom),
                wire=json_format.MessageToDict(request.object),
                ignore_changes=tuple(request.ignoreChanges),
                replace_on_changes=tuple(request.replaceOnChanges),
                delete_before_replace=bool(request.deleteBeforeReplace),
                dependencies=tuple(request.dependencies),
            )
        )
        return super().RegisterResource(request)


class PlanMocks(pulumi.runtime.Mocks):
    """Answers for what only the cloud knows: ids, addresses, generated secrets, and data-source lookups."""

    def __init__(self, spec: GatewaySpec):
        self.spec = spec
        self._ips = iter(PLACEHOLDER_IPS * 8)

    def new_resource(self, args: pulumi.runtime.MockResourceArgs) -> tuple[str, dict]:
        state = dict(args.inputs)
        short = hashlib.sha256(args.name.encode()).hexdigest()[:8]
        project = self.spec.project or "plan-project"
        if args.typ == "random:index/randomPassword:RandomPassword":
            length = int(args.inputs.get("length", 32))
            state["result"] = vllm_key_canary(length)
        elif args.typ == "aws:ec2/eip:Eip":
            state.update(publicIp=next(self._ips), allocationId=f"eipalloc-{short}")
        elif args.typ == "gcp:compute/address:Address":
            state.update(address=next(self._ips), name=args.name)
        elif args.typ == "gcp:container/cluster:Cluster":
            state.update(endpoint=PLACEHOLDER_API_IP, masterAuth={"clusterCaCertificate": PLACEHOLDER_CA})
        elif args.typ == "aws:eks/cluster:Cluster":
            endpoint = f"https://{short.upper()}.gr7.{self.spec.region}.eks.amazonaws.com"
            state.update(
                endpoint=endpoint,
                certificateAuthority={"data": PLACEHOLDER_CA},
                arn=f"arn:aws:eks::000000000000:cluster/{args.name}",
                identities=[{"oidcs": [{"issuer": f"https://oidc.eks.{self.spec.region}.amazonaws.com/id/{short.upper()}"}]}],
            )
        elif args.typ == "gcp:serviceaccount/account:Account":
            state["email"] = f"{args.inputs['accountId']}@{project}.iam.gserviceaccount.com"
        elif args.typ.startswith("gcp:compute/"):
            kind = args.typ.split("/")[1].split(":")[0]
            state.setdefault("name", args.name)
            state["selfLink"] = f"{GCP_API}/projects/{project}/{kind}s/{args.name}"
        elif args.typ.startswith("aws:"):
            state.setdefault("name", args.name)
            state["arn"] = f"arn:aws:{args.typ.split(':')[1].split('/')[0]}::000000000000:{args.name}"
        return f"{args.name}-{short}", state

    def gke_channel_version(self) -> str:
        """The REGULAR channel's default as a plan assumes it: the minor the stack validates its objects against
        (only the live lookup at `pulumi up` can say otherwise)."""
        kube = self.spec.kubernetes
        return f"{kube.version if kube else '1.30'}.0-gke.planned"

    def call(self, args: pulumi.runtime.MockCallArgs) -> dict:
        region = self.spec.region or ""
        token, given = args.token, args.args
        if token == "aws:ec2/getAmi:getAmi":
            return {
                "id": "ami-0planned00000000",
                "imageId": "ami-0planned00000000",
                "architecture": "x86_64",
                "name": "debian-12-amd64-(newest at pulumi up)",
            }
        if token == "aws:ec2/getInstanceTypeOfferings:getInstanceTypeOfferings":
            itype = given["filters"][0]["values"][0]
            zones = [f"{region}a", f"{region}b"]
            return {
                "id": region,
                "instanceTypes": [itype] * 2,
                "locations": zones,
                "locationTypes": ["availability-zone"] * 2,
            }
        if token == "aws:route53/getZone:getZone":
            return {"id": "Z0PLANNED", "zoneId": "Z0PLANNED", "name": given.get("name")}
        if token == "aws:ec2/getVpc:getVpc":
            return {"id": "vpc-0planned", "cidrBlock": "10.0.0.0/16"}
        if token == "aws:ec2/getSubnets:getSubnets":
            return {"id": region, "ids": ["subnet-0planned"]}
        if token == "gcp:compute/getImage:getImage":
            family, project = given.get("family"), given.get("project")
            return {
                "name": family,
                "family": family,
                "selfLink": f"{GCP_API}/projects/{project}/global/images/family/{family}",
            }
        if token == "gcp:container/getEngineVersions:getEngineVersions":
            return {"releaseChannelDefaultVersion": {"REGULAR": self.gke_channel_version()}, "location": given.get("location")}
        if token == "gcp:dns/getManagedZone:getManagedZone":
            return {"id": given.get("name"), "name": given.get("name"), "dnsName": "planned.example."}
        if token == "gcp:compute/getNetwork:getNetwork":
            return {
                "name": given["name"],
                "selfLink": f"{GCP_API}/projects/{self.spec.project}/global/networks/{given['name']}",
            }
        if token == "gcp:compute/getSubnetwork:getSubnetwork":
            return {
                "name": given["name"],
                "selfLink": f"{GCP_API}/projects/{self.spec.project}/regions/{region}/subnetworks/{given['name']}",
            }
        raise NotImplementedError(
            f"the offline plan has no answer for data source {token}; teach infra/offline.py PlanMocks.call"
        )


def record(stack: Stack, build: Any = None) -> Run:
    """Run the Pulumi program for `stack` under mocks, in a context of its own (so it can run again
    in the same process). `build(stack)` returns the gateway component; default: infra.program.gateway."""
    return contextvars.Context().run(_record, stack, build or gateway)


def use_mocks(stack: Stack, run: Run) -> None:
    """Point the current context's Pulumi runtime at the plan's mocks, recording into `run`; the
    secrets the program reads from config are canaries (see ALERT_CANARY)."""
    config = {f"{NAMESPACE}:alert_credential": ALERT_CANARY}
    if "vllm_api_key" in stack.secrets:
        config[f"{NAMESPACE}:vllm_api_key"] = CONFIG_KEY_CANARY
    if "hf_token" in stack.secrets:
        config[f"{NAMESPACE}:hf_token"] = HF_TOKEN_CANARY
    keys = {p: {"api_key": provider_key_canary(p)} for p in stack.spec.providers if f"providers.{p}.api_key" in stack.secrets}
    if keys:
        # Pulumi hands structured config over as JSON, the whole object secret when a value in it is.
        config[f"{NAMESPACE}:providers"] = json.dumps(keys)
    pulumi.runtime.set_all_config(config, list(config))
    mocks = PlanMocks(stack.spec)
    pulumi.runtime.set_mocks(mocks, project=PROJECT, stack=stack.name, preview=False, monitor=_RecordingMonitor(mocks, run))


def _record(stack: Stack, build: Any) -> Run:
    run = Run()
    use_mocks(stack, run)

    def program() -> Any:
        outputs = stack_outputs(build(stack))

        async def settle() -> None:
            for name, output in outputs.items():
                run.outputs[name] = (await output.future(), await output.is_secret())

        return settle()

    _sync_await(run_pulumi_func(program))
    result = next((r for r in run.resources if r.type == "random:index/randomPassword:RandomPassword"), None)
    canaries = [ALERT_CANARY, CONFIG_KEY_CANARY, HF_TOKEN_CANARY, *(provider_key_canary(p) for p in sorted(stack.spec.providers))]
    if result is not None:
        length = int(result.props.get("length", 32))
        canaries.append(vllm_key_canary(length))
    run.canaries = tuple(canaries)
    return run

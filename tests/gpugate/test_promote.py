"""`gpugate promote`: gates read from a real Prometheus and Alertmanager, pin edits that keep every comment, rollback byte for byte."""

from __future__ import annotations

import difflib
import json
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import typer
from typer.testing import CliRunner

from gpugate.cli.promote import promote_command
from gpugate.images import PLACEHOLDER_DIGEST
from gpugate.release import PIN_KEYS, Pins, ReleaseError, read_log, release_of, with_pins
from gpugate.smoke import SmokeCheck, SmokeReport
from gpugate.stackfile import load_stack
from tests.conftest import STACKS, edit_stack
from tests.e2e.conftest import find_free_port

app = typer.Typer()
app.callback()(lambda: None)  # a group, so `promote` is a subcommand as under `gpugate`
app.command("promote")(promote_command)

NEW_REVISION = "0123456789abcdef0123456789abcdef01234567"
NEW_IMAGE = "vllm/vllm-openai@sha256:" + "ab" * 32
PINNED = "sha256:" + "0123456789abcdef" * 4  # stands in for the digest of a published image
SOAK_SECONDS = 4
SOAK = f"{SOAK_SECONDS}s"
STARTUP_TIMEOUT_S = 30


def gpugate_promote(*args: str):
    return CliRunner().invoke(app, ["promote", *args])


# ---- a staging whose Prometheus and Alertmanager are real processes on loopback --------------


class Exporter:
    """A /metrics endpoint serving fixed prober series, as staging's prober would."""

    def __init__(self, text: str):
        body = text.encode()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def _probe_series(completion: int) -> str:
    return "".join(
        f'gpugate_probe_success{{check="{check}"}} {value}\n'
        for check, value in (("vllm_health", 1), ("models", 1), ("completion", completion), ("tls", 1))
    )


@dataclass
class Monitoring:
    prometheus: str
    alertmanager: str


def _wait_ready(url: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{proc.args[0]} exited with {proc.returncode}:\n{log.read_text()[-2000:]}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url} not ready after {STARTUP_TIMEOUT_S} s")


@pytest.fixture(scope="module")
def staging_monitoring(tmp_path_factory) -> Iterator[dict[str, Monitoring]]:
    """Two stagings: `clean` (every probe at 1, no alert) and `troubled` (completion probe at 0 and an alert
    firing through Prometheus into Alertmanager). Each has its own real Prometheus and Alertmanager."""
    root = tmp_path_factory.mktemp("monitoring")
    procs: list[subprocess.Popen] = []
    exporters = {"clean": Exporter(_probe_series(1)), "troubled": Exporter(_probe_series(0))}
    found: dict[str, Monitoring] = {}
    try:
        for name, exporter in exporters.items():
            work = root / name
            work.mkdir()
            am_port, prom_port = find_free_port(), find_free_port()
            (work / "alertmanager.yml").write_text("route: {receiver: none}\nreceivers: [{name: none}]\n")
            am_log = work / "alertmanager.log"
            procs.append(
                subprocess.Popen(
                    ["prometheus-alertmanager", f"--config.file={work / 'alertmanager.yml'}", f"--storage.path={work / 'am'}",
                     f"--web.listen-address=127.0.0.1:{am_port}", "--cluster.listen-address="],
                    stdout=am_log.open("wb"), stderr=subprocess.STDOUT,
                )
            )
            rules = (
                "groups:\n- name: staging\n  rules:\n  - alert: VllmDown\n    expr: vector(1)\n"
                "    labels: {severity: page}\n    annotations: {summary: vLLM is down}\n"
                if name == "troubled"
                else "groups: []\n"
            )
            (work / "rules.yml").write_text(rules)
            (work / "prometheus.yml").write_text(
                "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
                "rule_files: [rules.yml]\n"
                f"alerting: {{alertmanagers: [{{static_configs: [{{targets: ['127.0.0.1:{am_port}']}}]}}]}}\n"
                f"scrape_configs: [{{job_name: prober, static_configs: [{{targets: ['127.0.0.1:{exporter.port}']}}]}}]\n"
            )
            prom_log = work / "prometheus.log"
            procs.append(
                subprocess.Popen(
                    ["prometheus", f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={work / 'data'}",
                     f"--web.listen-address=127.0.0.1:{prom_port}", "--rules.alert.resend-delay=1s"],
                    stdout=prom_log.open("wb"), stderr=subprocess.STDOUT,
                )
            )
            found[name] = Monitoring(f"http://127.0.0.1:{prom_port}", f"http://127.0.0.1:{am_port}")
            _wait_ready(f"{found[name].alertmanager}/-/ready", procs[-2], am_log)
            _wait_ready(f"{found[name].prometheus}/-/ready", procs[-1], prom_log)
        # Wait until both hold samples from further back than the soak window, and the alert reached Alertmanager.
        deadline = time.monotonic() + STARTUP_TIMEOUT_S

        def soaked(monitoring: Monitoring) -> bool:
            query = {"query": f"gpugate_probe_success offset {SOAK_SECONDS + 2}s"}
            return bool(httpx.get(f"{monitoring.prometheus}/api/v1/query", params=query, timeout=2).json()["data"]["result"])

        while not all(soaked(m) for m in found.values()) or not httpx.get(f"{found['troubled'].alertmanager}/api/v2/alerts", timeout=2).json():
            assert time.monotonic() < deadline, f"no {SOAK_SECONDS + 2} s of samples, or no alert in Alertmanager"
            time.sleep(0.5)
        yield found
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for exporter in exporters.values():
            exporter.server.shutdown()


# ---- stack copies ------------------------------------------------------------------------------


@dataclass
class Repo:
    """Byte-exact copies of staging and prod, a staging that carries a new release, and a log."""

    staging: Path
    prod: Path
    log: Path
    smoke: Path
    prod_original: bytes


def _new_release_in_staging(path: Path) -> None:
    spec = load_stack(path).spec
    text = path.read_text()
    text = text.replace(spec.model.revision, NEW_REVISION).replace(spec.vllm.image, NEW_IMAGE)
    path.write_text(text)


def write_smoke_record(staging: Path, dest: Path, passed: bool = True) -> Path:
    """The record `gpugate smoke --stack staging --record` leaves for the release staging runs."""
    checks = [
        SmokeCheck(check="tls-hsts", ok=True, evidence="certificate valid"),
        SmokeCheck(check="chat", ok=passed, evidence="12.40 s" if not passed else "1.10 s", threshold="within 10 s"),
    ]
    report = SmokeReport(
        url="https://llm.staging.gpugate.example.com", at="2025-01-01T00:00:00Z", stack="staging",
        release=release_of(load_stack(staging)), checks=checks,
    )
    dest.write_text(report.model_dump_json())
    return dest


@pytest.fixture
def repo(tmp_path) -> Repo:
    stacks = tmp_path / "stacks"
    stacks.mkdir()
    staging = Path(shutil.copy(STACKS / "Pulumi.staging.yaml", stacks))
    prod = Path(shutil.copy(STACKS / "Pulumi.prod.yaml", stacks))
    # prod's other images pinned, as they must be before anything is promoted to it (the committed ones are placeholders)
    prod.write_text(prod.read_text().replace(
        f"@{PLACEHOLDER_DIGEST}           # placeholder", f"@{PINNED}           #").replace(
        f"@{PLACEHOLDER_DIGEST} # placeholder", f"@{PINNED} #"))
    _new_release_in_staging(staging)
    smoke = write_smoke_record(staging, tmp_path / "smoke-staging.json")
    return Repo(staging, prod, stacks / "promotions.jsonl", smoke, prod.read_bytes())


def promote(repo: Repo, monitoring: Monitoring, *extra: str, source: Path | None = None, target: Path | None = None):
    return gpugate_promote(
        "--from", str(source or repo.staging), "--to", str(target or repo.prod), "--soak", SOAK,
        "--smoke-record", str(repo.smoke), "--prometheus-url", monitoring.prometheus,
        "--alertmanager-url", monitoring.alertmanager, "--log", str(repo.log), "--who", "test", *extra,
    )


# ---- pin edits ---------------------------------------------------------------------------------


def test_writing_pins_changes_exactly_the_pin_lines_and_keeps_every_comment():
    # given prod's stack file and a new release
    text = (STACKS / "Pulumi.prod.yaml").read_text()
    pins = Pins(model_id="Qwen/Qwen2.5-7B-Instruct", model_revision=NEW_REVISION, vllm_image=NEW_IMAGE)
    # when the pins are written
    edit = with_pins(text, pins)
    # then the diff is the revision and image lines, nothing else
    diff = [line for line in difflib.unified_diff(text.splitlines(), edit.text.splitlines(), n=0, lineterm="") if line[:1] in "+-" and line[:3] not in ("+++", "---")]
    assert diff == [
        "-    revision: a09a35458c702b33eeacc393d103063234e8bc28",
        f"+    revision: {NEW_REVISION}",
        f"-    image: vllm/vllm-openai@{PLACEHOLDER_DIGEST}",
        f"+    image: {NEW_IMAGE}",
    ]
    assert [line for line in edit.text.splitlines() if "#" in line] == [line for line in text.splitlines() if "#" in line]
    assert len(edit.changed_lines) == 2


def test_a_quoted_pin_stays_quoted_so_a_rollback_can_restore_its_bytes():
    # given a stack file whose image pin is double-quoted
    text = (STACKS / "Pulumi.prod.yaml").read_text()
    original = load_stack(STACKS / "Pulumi.prod.yaml").spec.vllm.image
    quoted = text.replace(f"image: {original}", f'image: "{original}"')
    # when a new image is written and then the old one again
    there = with_pins(quoted, Pins(model_id="Qwen/Qwen2.5-7B-Instruct", model_revision=NEW_REVISION, vllm_image=NEW_IMAGE))
    back = with_pins(there.text, Pins(model_id="Qwen/Qwen2.5-7B-Instruct", model_revision="a09a35458c702b33eeacc393d103063234e8bc28", vllm_image=original))
    # then both keep the quotes, and the round trip is byte for byte
    assert f'image: "{NEW_IMAGE}"' in there.text
    assert back.text == quoted


def test_a_stack_file_the_yaml_writer_would_reformat_is_refused_not_rewritten(tmp_path):
    # given prod's file re-indented (sequences flush with their key), a layout ruamel would change back
    relaid = edit_stack("prod", tmp_path / "Pulumi.prod.yaml", lambda c: None).read_text()
    # when pins are written, then the edit is refused and says to edit by hand
    with pytest.raises(ReleaseError, match="would change more than the pin lines"):
        with_pins(relaid, Pins(model_id="Qwen/Qwen2.5-7B-Instruct", model_revision=NEW_REVISION, vllm_image=NEW_IMAGE))


def test_pins_are_the_model_id_revision_and_vllm_image():
    assert PIN_KEYS == (("gpugate:model", "id"), ("gpugate:model", "revision"), ("gpugate:vllm", "image"))


# ---- gates -------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_promotion_with_every_gate_green_writes_only_the_pin_lines_and_logs_who_what_and_why(repo, staging_monitoring):
    # given a staging release that passed its smoke and soaked clean, and prod on the previous release
    before = release_of(load_stack(repo.prod))
    # when promoted with --apply
    result = promote(repo, staging_monitoring["clean"], "--apply")
    # then every gate passed, and prod's file differs from before in exactly the two pin lines
    assert result.exit_code == 0, result.output
    old, new = repo.prod_original.decode().splitlines(), repo.prod.read_text().splitlines()
    changed = [(a, b) for a, b in zip(old, new, strict=True) if a != b]
    assert changed == [
        (f"    revision: {before.pins.model_revision}", f"    revision: {NEW_REVISION}"),
        (f"    image: {before.pins.vllm_image}", f"    image: {NEW_IMAGE}"),
    ]
    # and one record says who, from which release to which, and the gates' evidence
    [entry] = read_log(repo.log)
    assert (entry.action, entry.stack, entry.source, entry.who) == ("promote", "prod", "staging", "test")
    assert entry.from_release.pins == before.pins
    assert entry.to_release.pins.vllm_image == NEW_IMAGE
    assert entry.to_release.bundle_sha256 != before.bundle_sha256
    assert [(g.gate, g.ok) for g in entry.gates] == [
        ("staging-smoke", True), ("staging-prober-soak", True), ("staging-alerts-soak", True), ("prod-images", True),
        ("prod-plan", True),
    ]


@pytest.mark.e2e
def test_without_apply_nothing_is_written_but_the_pin_and_bundle_diff_are_shown(repo, staging_monitoring):
    result = promote(repo, staging_monitoring["clean"])
    assert result.exit_code == 0, result.output
    assert repo.prod.read_bytes() == repo.prod_original and not repo.log.exists()
    assert "dry run" in result.output
    assert "gpugate:vllm.image" in result.output  # the pins table
    # on the Kubernetes target: the vLLM Deployment that carries the pins
    assert "bundle diff (1 files):" in result.output
    assert "b/kubernetes/gpugate/deployment-vllm.yaml" in result.output
    assert f"+        - {NEW_REVISION}" in result.output


@pytest.mark.e2e
def test_a_red_staging_smoke_blocks_and_names_the_failed_check(repo, staging_monitoring):
    # given staging's smoke record for this release failed its chat check
    write_smoke_record(repo.staging, repo.smoke, passed=False)
    # when promoted with --apply
    result = promote(repo, staging_monitoring["clean"], "--apply")
    # then the smoke gate blocks with the evidence, and nothing is written
    assert result.exit_code == 1, result.output
    assert "BLOCKED by staging-smoke: smoke at 2025-01-01T00:00:00Z failed: chat (12.40 s)" in result.output
    assert "what to do:" in result.output
    assert repo.prod.read_bytes() == repo.prod_original and not repo.log.exists()


@pytest.mark.e2e
def test_a_placeholder_image_in_the_target_or_the_release_blocks_and_names_the_field(repo, staging_monitoring):
    # given prod's Caddy image still the committed placeholder
    caddy = next(line for line in repo.prod.read_text().splitlines() if line.strip().startswith("caddy:"))
    repo.prod.write_text(repo.prod.read_text().replace(caddy, f"      caddy: docker.io/library/caddy@{PLACEHOLDER_DIGEST}"))
    before = repo.prod.read_bytes()
    # when promoted with --apply
    result = promote(repo, staging_monitoring["clean"], "--apply")
    # then the images gate blocks, naming the field and what is allowed, and nothing is written
    assert result.exit_code == 1, result.output
    assert "BLOCKED by prod-images: gpugate:kubernetes.images.caddy: docker.io/library/caddy@sha256:000" in result.output
    assert "has a placeholder digest" in result.output and "crane digest" in result.output
    assert repo.prod.read_bytes() == before and not repo.log.exists()


@pytest.mark.e2e
def test_a_release_whose_vllm_image_is_a_placeholder_is_not_promoted(repo, staging_monitoring):
    # given staging's release pins the placeholder vLLM image (and its smoke passed for that release)
    repo.staging.write_text(repo.staging.read_text().replace(NEW_IMAGE, f"vllm/vllm-openai@{PLACEHOLDER_DIGEST}"))
    write_smoke_record(repo.staging, repo.smoke)
    # when promoted, then the images gate names the pin that would carry it to prod
    result = promote(repo, staging_monitoring["clean"], "--apply")
    assert result.exit_code == 1, result.output
    assert "BLOCKED by prod-images: gpugate:vllm.image: vllm/vllm-openai@sha256:000" in result.output
    assert not repo.log.exists()


@pytest.mark.e2e
def test_a_smoke_record_of_an_older_release_does_not_count(repo, staging_monitoring):
    # given a passing smoke record, and then staging moved on to another image
    repo.staging.write_text(repo.staging.read_text().replace(NEW_IMAGE, "vllm/vllm-openai@sha256:" + "cd" * 32))
    # when promoted
    result = promote(repo, staging_monitoring["clean"], "--apply")
    # then the smoke gate names both releases
    assert result.exit_code == 1
    assert "BLOCKED by staging-smoke: the record is of release" in result.output
    assert "but staging is now release" in result.output


@pytest.mark.e2e
def test_a_firing_alert_on_staging_blocks_with_its_name(repo, staging_monitoring):
    # given staging's Prometheus fires VllmDown into its Alertmanager
    result = promote(repo, staging_monitoring["troubled"], "--apply")
    # then the alerts gate names the alert, what it needs, and the runbook to follow
    assert result.exit_code == 1
    line = next(line for line in result.output.splitlines() if line.startswith("BLOCKED by staging-alerts-soak"))
    assert "VllmDown (severity page) fired in the window" in line
    assert "VllmDown active in Alertmanager since" in line
    assert f"(needs: no alert firing in the last {SOAK}, none active in Alertmanager)" in line
    assert repo.prod.read_bytes() == repo.prod_original


@pytest.mark.e2e
def test_a_failing_prober_check_during_the_soak_blocks_with_the_check_and_threshold(repo, staging_monitoring):
    result = promote(repo, staging_monitoring["troubled"])
    assert result.exit_code == 1
    line = next(line for line in result.output.splitlines() if line.startswith("BLOCKED by staging-prober-soak"))
    assert "check completion failed at" in line
    assert f"needs: gpugate_probe_success = 1 for every check over the whole last {SOAK}" in line


@pytest.mark.e2e
def test_a_soak_window_longer_than_staging_has_run_blocks_and_says_how_long_to_wait(repo, staging_monitoring):
    result = promote(repo, staging_monitoring["clean"], "--soak", "1h")
    assert result.exit_code == 1
    assert "BLOCKED by staging-prober-soak: prober data covers only" in result.output
    assert "of the 1h00m window" in result.output
    assert "what to do: wait " in result.output


@pytest.mark.e2e
def test_an_unreachable_prometheus_blocks_and_says_how_to_reach_it(repo, staging_monitoring):
    dead = f"http://127.0.0.1:{find_free_port()}"
    result = gpugate_promote(
        "--from", str(repo.staging), "--to", str(repo.prod), "--smoke-record", str(repo.smoke),
        "--prometheus-url", dead, "--alertmanager-url", staging_monitoring["clean"].alertmanager, "--log", str(repo.log),
    )
    assert result.exit_code == 1
    assert f"BLOCKED by staging-prober-soak: cannot read Prometheus at {dead}" in result.output
    assert "SSM port-forwarding" in result.output


@pytest.mark.e2e
def test_a_policy_violation_in_the_targets_plan_blocks_with_the_rule(repo, staging_monitoring, tmp_path):
    # given a target on AWS whose admin networks together open SSH to the world (the spec allows each half)
    target = tmp_path / "Pulumi.prodaws.yaml"
    office = "    - 203.0.113.0/24                        # office VPN egress\n"
    target.write_text((STACKS / "Pulumi.staging.yaml").read_text().replace(office, "    - 0.0.0.0/1\n    - 128.0.0.0/1\n"))
    # when staging's release is promoted to it
    result = promote(repo, staging_monitoring["clean"], "--apply", target=target)
    # then the plan gate blocks and names the policy
    assert result.exit_code == 1, result.output
    line = next(line for line in result.output.splitlines() if line.startswith("BLOCKED by prodaws-plan"))
    assert "no-world-ssh:" in line and "opens SSH to 0.0.0.0/1" in line
    assert not repo.log.exists()


# ---- rollback ----------------------------------------------------------------------------------


@pytest.mark.e2e
def test_rollback_restores_the_previous_pins_byte_for_byte_and_logs_it(repo, staging_monitoring):
    # given a promotion applied to prod
    assert promote(repo, staging_monitoring["clean"], "--apply").exit_code == 0
    assert repo.prod.read_bytes() != repo.prod_original
    # when rolled back
    result = gpugate_promote("--rollback", "--stack", str(repo.prod), "--log", str(repo.log), "--who", "oncall", "--apply")
    # then prod's file is what it was before the promotion, byte for byte, and the log says so
    assert result.exit_code == 0, result.output
    assert repo.prod.read_bytes() == repo.prod_original
    promoted, rolled_back = read_log(repo.log)
    assert (rolled_back.action, rolled_back.reverts, rolled_back.who) == ("rollback", promoted.id, "oncall")
    assert rolled_back.to_release.pins == promoted.from_release.pins
    # and a second rollback has nothing left to undo
    again = gpugate_promote("--rollback", "--stack", str(repo.prod), "--log", str(repo.log), "--apply")
    assert again.exit_code == 2
    assert "no promotion of prod left to roll back" in again.output


@pytest.mark.e2e
def test_rollback_refuses_when_the_pins_were_changed_by_hand_since_the_promotion(repo, staging_monitoring):
    assert promote(repo, staging_monitoring["clean"], "--apply").exit_code == 0
    repo.prod.write_text(repo.prod.read_text().replace(NEW_REVISION, "f" * 40))
    result = gpugate_promote("--rollback", "--stack", str(repo.prod), "--log", str(repo.log), "--apply")
    assert result.exit_code == 2
    assert "the file was changed outside `gpugate promote`" in result.output
    assert "f" * 40 in repo.prod.read_text()


@pytest.mark.e2e
def test_the_json_output_carries_every_gate_with_evidence_and_threshold(repo, staging_monitoring):
    result = promote(repo, staging_monitoring["troubled"], "--json")
    report = json.loads(result.output)
    gates = {g["gate"]: g for g in report["gates"]}
    assert not gates["staging-alerts-soak"]["ok"] and gates["staging-alerts-soak"]["todo"]
    assert gates["staging-smoke"]["ok"] and gates["prod-plan"]["ok"]
    assert report["applied"] is False and report["changed_lines"]

"""Runbooks: one per alert and per procedure, each with the same sections, and every command in them a real command of this project."""

from __future__ import annotations

import functools
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from gpugate.render.alerts import alerts, routing_alerts, rule_groups
from gpugate.oncall import RUNBOOKS_DIR, mitigation_steps, runbook_sections
from gpugate.stackfile import REPO_ROOT, load_stack, stack_names

SECTIONS = ("Meaning", "Impact", "Diagnosis", "Mitigation", "Escalation")
PROCEDURES = (
    "rotate-key",
    "revoke-leaked-key",
    "restart",
    "drain",
    "scale",
    "rollback-model",
    "renew-tls",
    "incident-response",
)
ON_CALL = REPO_ROOT / "docs" / "on-call.md"
HELP_TIMEOUT_S = 60
# Wide enough that typer's help never folds or cuts an option name.
WIDE = {**os.environ, "COLUMNS": "200", "TERMINAL_WIDTH": "200", "NO_COLOR": "1"}

_FENCE = re.compile(r"^\s*```")
_INLINE = re.compile(r"`([^`\n]+)`")
_ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


def runbook_files() -> list[Path]:
    return sorted(p for p in RUNBOOKS_DIR.glob("*.md") if p.name != "README.md")


def alert_slugs() -> set[str]:
    """Every stack's alerts, and the router's (rendered only for a stack with tiers or providers)."""
    slugs = {a.slug for stack in stack_names() for a in alerts(load_stack(stack).spec)}
    return slugs | {a.slug for a in routing_alerts(load_stack("local").spec)}


def code_lines(text: str) -> list[str]:
    """Lines of fenced code blocks and the contents of inline code spans."""
    lines, in_code = [], False
    for line in text.splitlines():
        if _FENCE.match(line):
            in_code = not in_code
        elif in_code:
            lines.append(line.strip())
        else:
            lines.extend(span.strip() for span in _INLINE.findall(line))
    return lines


def project_commands(line: str) -> list[list[str]]:
    """Every gpugate / gpugate-runtime / `python -m gpugate_runtime` command in a shell line, as tokens
    (one per pipeline or list segment; leading `$`, environment assignments and `sudo [-u USER]` skipped)."""
    commands = []
    for segment in re.split(r"\|\||&&|[|;]", line):
        try:
            tokens = shlex.split(segment)
        except ValueError:
            continue
        while tokens and (tokens[0] == "$" or _ENV_ASSIGNMENT.match(tokens[0])):
            tokens = tokens[1:]
        if tokens[:1] == ["sudo"]:
            tokens = tokens[3:] if tokens[1:2] == ["-u"] else tokens[1:]
        if not tokens:
            continue
        program = Path(tokens[0]).name
        if program in ("gpugate", "gpugate-runtime"):
            commands.append([program, *tokens[1:]])
        elif re.fullmatch(r"python[0-9.]*", program) and tokens[1:3] == ["-m", "gpugate_runtime"]:
            commands.append(["gpugate-runtime", *tokens[3:]])
    return commands


def all_commands() -> dict[tuple[str, ...], set[str]]:
    """Command path (the words before its first option) -> the long options it is used with, over every
    runbook and the on-call checklist."""
    found: dict[tuple[str, ...], set[str]] = {}
    for path in [*sorted(RUNBOOKS_DIR.glob("*.md")), ON_CALL]:
        for line in code_lines(path.read_text()):
            for tokens in project_commands(line):
                words = []
                for token in tokens:
                    if token.startswith("-"):
                        break
                    words.append(token)
                options = {t.split("=", 1)[0] for t in tokens if t.startswith("--")}
                found.setdefault(tuple(words), set()).update(options)
    return found


@functools.cache
def help_of(path: tuple[str, ...]) -> subprocess.CompletedProcess[str]:
    module = "gpugate" if path[0] == "gpugate" else "gpugate_runtime"
    return subprocess.run(
        [sys.executable, "-m", module, *path[1:], "--help"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=HELP_TIMEOUT_S, env=WIDE,
    )


@pytest.mark.parametrize("slug", sorted(alert_slugs()))
def test_every_alert_has_its_runbook(slug):
    assert (RUNBOOKS_DIR / f"{slug}.md").is_file(), f"runbooks/{slug}.md is missing"


@pytest.mark.parametrize("stack", stack_names())
def test_every_runbook_url_points_to_an_existing_runbook(stack):
    # given the rules a stack renders, then each runbook_url names a file of runbooks/
    rules = rule_groups(load_stack(stack).spec)["groups"][0]["rules"]
    assert len(rules) >= 5, "the stack renders its alert rules"
    for rule in rules:
        name = rule["annotations"]["runbook_url"].rsplit("/", 1)[-1]
        assert (RUNBOOKS_DIR / name).is_file(), f"{rule['alert']} links {name}, which runbooks/ lacks"


@pytest.mark.parametrize("procedure", PROCEDURES)
def test_every_procedure_has_its_runbook(procedure):
    assert (RUNBOOKS_DIR / f"{procedure}.md").is_file()


def test_every_runbook_is_an_alerts_or_a_procedures_and_is_listed_in_the_readme():
    readme = (RUNBOOKS_DIR / "README.md").read_text()
    known = alert_slugs() | set(PROCEDURES)
    files = runbook_files()
    assert len(files) >= len(PROCEDURES) + 5, "runbooks/ holds the runbooks"
    for path in files:
        assert path.stem in known, f"{path.name} belongs to no alert and no procedure"
        assert f"]({path.name})" in readme, f"runbooks/README.md does not link {path.name}"


@pytest.mark.parametrize("runbook", runbook_files(), ids=lambda p: p.name)
def test_every_runbook_has_the_sections_in_order_and_numbered_mitigation_steps(runbook):
    sections = runbook_sections(runbook.read_text())
    present = [name for name in sections if name in SECTIONS]
    assert present == list(SECTIONS), f"{runbook.name}: sections {list(sections)}; needed, in order: {SECTIONS}"
    assert all(sections[name].strip() for name in SECTIONS), f"{runbook.name} has an empty section"
    assert mitigation_steps(runbook.read_text()), f"{runbook.name}: Mitigation has no numbered steps"


def test_incident_response_states_the_no_content_logs_policy_and_how_to_find_a_request():
    text = (RUNBOOKS_DIR / "incident-response.md").read_text()
    assert "**What we can see**" in text and "**What we cannot see, by design:**" in text
    assert "X-Request-Id" in text and "grep REQUEST_ID" in text


@pytest.mark.parametrize("stack", stack_names())
def test_the_on_call_checklist_names_each_stacks_alert_channel(stack):
    channel = load_stack(stack).spec.alerts.channel
    row = next((line for line in ON_CALL.read_text().splitlines() if line.startswith(f"| `{stack}` |")), "")
    assert f"`{channel.kind}`" in row, f"docs/on-call.md has no row for {stack} naming its {channel.kind} channel"
    if channel.kind == "slack":
        assert channel.channel in row


def test_runbooks_name_project_commands_at_all():
    # guards the extraction itself: a parser that finds nothing would make the next test vacuous
    paths = all_commands()
    assert ("gpugate", "run", "restart") in paths
    assert ("gpugate", "alerts") in paths
    assert ("gpugate-runtime", "keys", "list") in paths
    assert len(paths) >= 20


@pytest.mark.parametrize("path", sorted(all_commands()), ids=" ".join)
def test_every_command_in_the_runbooks_exists_with_its_options(path):
    # given a command a runbook tells on call to run, when its --help runs
    result = help_of(path)
    # then it exists, and so does every option the runbooks use with it
    assert result.returncode == 0, f"`{' '.join(path)} --help` exited {result.returncode}:\n{result.stdout}{result.stderr}"
    texts = [result.stdout] + [help_of(path[:n]).stdout for n in range(len(path) - 1, 1, -1)]
    for option in sorted(all_commands()[path]):
        assert any(re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text) for text in texts), (
            f"`{' '.join(path)}` has no option {option} (used in a runbook)"
        )

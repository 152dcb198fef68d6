"""Reads `stacks/Pulumi.<stack>.yaml` into a GatewaySpec, with errors that name file, key path and what is allowed."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError
from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from gpugate.spec import CHANNEL_KINDS, GatewaySpec

NAMESPACE = "gpugate"
# Namespaces other programs own; their keys are Pulumi's business, not the spec's.
FOREIGN_NAMESPACES = ("aws", "gcp", "kubernetes", "pulumi", "random", "tls")
# Top-level keys of a Pulumi stack file besides `config`.
PULUMI_STACK_KEYS = ("config", "secretsprovider", "encryptedkey", "encryptionsalt", "environment")
# Pulumi config secrets a stack may hold under gpugate: (`pulumi config set --secret gpugate:<name>`).
SECRET_KEYS = ("alert_credential", "vllm_api_key", "kubeconfig", "hf_token")

# This checkout of gpugate: its templates, runbooks and Pulumi program (not the operator's stacks).
REPO_ROOT = Path(__file__).resolve().parent.parent
PROJECT_FILES = ("Pulumi.yaml", "Pulumi.yml")


class ProjectNotFound(Exception):
    """No Pulumi project around the working directory: there is nowhere to find stacks by name."""

    def __init__(self, start: Path):
        self.todo = (
            "run gpugate inside a Pulumi project (a directory with Pulumi.yaml, e.g. a clone of gpugate), "
            "or pass the stack file's path: --stack path/to/Pulumi.<name>.yaml"
        )
        super().__init__(
            f"no Pulumi project here: looked for {' or '.join(PROJECT_FILES)} in {start} and every parent directory"
        )


@dataclass(frozen=True)
class Project:
    """A Pulumi project: where its Pulumi.yaml is and where its stack files are (`stackConfigDir`)."""

    root: Path
    stacks_dir: Path


def find_project(start: Path | None = None) -> Project:
    """The Pulumi project `pulumi` itself would use: the Pulumi.yaml of `start` (the working directory)
    or its nearest parent, with its `stackConfigDir` (default: the project directory)."""
    here = (start or Path.cwd()).resolve()
    for directory in (here, *here.parents):
        for name in PROJECT_FILES:
            project_file = directory / name
            if project_file.is_file():
                try:
                    document = YAML(typ="safe").load(project_file.read_text()) or {}
                except YAMLError as err:
                    raise SpecError([Problem(str(project_file), "(yaml)", _MISSING, f"not valid YAML: {err}".replace("\n", " "))]) from None
                config_dir = document.get("stackConfigDir") if isinstance(document, dict) else None
                return Project(root=directory, stacks_dir=directory / config_dir if config_dir else directory)
    raise ProjectNotFound(here)


@dataclass(frozen=True)
class Problem:
    file: str
    key_path: str
    value: Any
    message: str

    def __str__(self) -> str:
        shown = "" if self.value is _MISSING else f" = {_short(self.value)}"
        return f"{self.file}: {self.key_path}{shown}: {self.message}"


class SpecError(Exception):
    """A stack file that cannot become a GatewaySpec; carries every problem found."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


@dataclass(frozen=True)
class Stack:
    name: str
    path: Path
    spec: GatewaySpec
    secrets: tuple[str, ...]  # names of the gpugate secrets the file holds (values stay encrypted)

    @property
    def spec_sha256(self) -> str:
        return spec_digest(self.spec)


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


_MISSING = _Missing()


def _short(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def stack_path(name: str, stacks_dir: Path | None = None) -> Path:
    return (stacks_dir or find_project().stacks_dir) / f"Pulumi.{name}.yaml"


def stack_names(stacks_dir: Path | None = None) -> list[str]:
    directory = stacks_dir or find_project().stacks_dir
    return sorted(p.name[len("Pulumi.") : -len(".yaml")] for p in directory.glob("Pulumi.*.yaml"))


# Fields added after stacks were first hashed: left out of the digest while they hold their default, so a
# stack that does not use them keeps its digest (and its bundle, byte for byte).
_DIGEST_OPTIONAL = ("tiers", "providers", "routing")


def spec_digest(spec: GatewaySpec) -> str:
    fields = GatewaySpec.model_fields
    unused = {name for name in _DIGEST_OPTIONAL if getattr(spec, name) == fields[name].get_default(call_default_factory=True)}
    canonical = json.dumps(spec.model_dump(mode="json", exclude=unused), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def load_stack(name_or_path: str | Path, stacks_dir: Path | None = None) -> Stack:
    """Load a stack by name (`staging`) or by the path of its stack file."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = stack_path(str(name_or_path), stacks_dir)
    shown = _display(path)
    if not path.is_file():
        known = ", ".join(stack_names(path.parent)) or "none"
        raise SpecError([Problem(shown, "(file)", _MISSING, f"no such stack file; stacks here: {known}")])
    name = path.name.removeprefix("Pulumi.").removesuffix(".yaml").removesuffix(".yml")
    try:
        document = YAML(typ="safe").load(path.read_text())
    except YAMLError as err:
        raise SpecError([Problem(shown, "(yaml)", _MISSING, f"not valid YAML: {err}".replace("\n", " "))]) from None
    config, secrets = _gpugate_config(shown, document)
    try:
        spec = GatewaySpec.model_validate(config)
    except ValidationError as err:
        raise SpecError([_problem(shown, e, config) for e in err.errors()]) from None
    return Stack(name=name, path=path, spec=spec, secrets=secrets)


def _display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _gpugate_config(shown: str, document: Any) -> tuple[dict[str, Any], tuple[str, ...]]:
    if not isinstance(document, dict) or "config" not in document:
        raise SpecError([Problem(shown, "config", _MISSING, "a stack file is a mapping with a `config:` section")])
    problems = [
        Problem(shown, str(key), _MISSING, f"unknown top-level key; allowed: {', '.join(PULUMI_STACK_KEYS)}")
        for key in document
        if key not in PULUMI_STACK_KEYS
    ]
    raw = document["config"]
    if not isinstance(raw, dict):
        raise SpecError([Problem(shown, "config", raw, "must be a mapping of `namespace:key` to values")])
    config: dict[str, Any] = {}
    secrets: list[str] = []
    for key, value in raw.items():
        namespace, _, name = str(key).partition(":")
        if not name:
            problems.append(Problem(shown, str(key), _MISSING, "config keys need a namespace, e.g. gpugate:domain"))
        elif namespace == NAMESPACE and isinstance(value, dict) and set(value) == {"secure"}:
            if name not in SECRET_KEYS:
                problems.append(
                    Problem(shown, str(key), "<secret>", f"not a known secret; allowed secrets: {', '.join(SECRET_KEYS)}")
                )
            secrets.append(name)
        elif namespace == NAMESPACE and name == "providers" and isinstance(value, dict):
            config[name] = _provider_secrets(value, secrets)
        elif namespace == NAMESPACE:
            config[name] = value
        elif namespace not in FOREIGN_NAMESPACES:
            problems.append(
                Problem(shown, str(key), _MISSING, f"unknown namespace {namespace!r}; allowed: gpugate, {', '.join(FOREIGN_NAMESPACES)}")
            )
    if problems:
        raise SpecError(problems)
    return config, tuple(sorted(secrets))


def _provider_secrets(providers: dict[str, Any], secrets: list[str]) -> dict[str, Any]:
    """Each provider's `api_key` is a Pulumi secret (`pulumi config set --secret --path gpugate:providers.<name>.api_key`):
    its name is recorded and its encrypted value kept out of the spec."""
    out: dict[str, Any] = {}
    for name, provider in providers.items():
        if isinstance(provider, dict) and isinstance(provider.get("api_key"), dict) and set(provider["api_key"]) == {"secure"}:
            secrets.append(f"providers.{name}.api_key")
            provider = {k: v for k, v in provider.items() if k != "api_key"}
        out[name] = provider
    return out


def _problem(shown: str, error: dict[str, Any], config: dict[str, Any]) -> Problem:
    loc = _clean_loc(error["loc"])
    key_path = f"{NAMESPACE}:" + ".".join(str(p) for p in loc) if loc else f"{NAMESPACE}:"
    value = _lookup(config, loc)
    kind = error["type"]
    message = error["msg"].removeprefix("Value error, ")
    # Cross-field checks name the key they are about: "gpu.count: AWS has no machine ...", or below a named
    # entry "routing.models.<model>.tier: ...".
    scoped = re.match(r"^([a-z_]+(?:\.[a-z0-9_-]+)*): (.*)$", message, re.DOTALL)
    if kind == "value_error" and scoped:
        loc = loc + tuple(scoped.group(1).split("."))
        key_path = f"{NAMESPACE}:" + ".".join(str(p) for p in loc)
        value = _lookup(config, loc)
        message = scoped.group(2)
    if kind == "extra_forbidden":
        allowed = _allowed_keys(loc[:-1])
        message = f"unknown key; allowed here: {', '.join(allowed)}"
    elif kind == "missing":
        message = "required key is missing"
        value = _MISSING
    elif kind == "union_tag_invalid":
        message = f"unknown kind; allowed: {', '.join(CHANNEL_KINDS)}"
    elif kind == "string_pattern_mismatch":
        message = f"does not match the allowed form {error['ctx']['pattern']}"
    if loc and loc[0] in SECRET_KEYS:
        value = "<redacted>"
    return Problem(shown, key_path, value, message)


def _clean_loc(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """Drop the discriminator tag pydantic inserts into the path of a tagged union."""
    out: list[Any] = []
    for i, part in enumerate(loc):
        if i > 0 and loc[i - 1] == "channel" and part in CHANNEL_KINDS:
            continue
        out.append(part)
    return tuple(out)


def _lookup(config: Any, loc: tuple[Any, ...]) -> Any:
    node = config
    for part in loc:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
        else:
            return _MISSING
    return node


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    model: type[BaseModel] | None = GatewaySpec
    for part in loc:
        if model is None or not isinstance(part, str) or part not in model.model_fields:
            return ["(see docs/reference.md)"]
        annotation = model.model_fields[part].annotation
        model = _model_in(annotation)
    return sorted(model.model_fields) if model else ["(see docs/reference.md)"]


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_in(arg)
        if found:
            return found
    return None

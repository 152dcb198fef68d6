"""The per-stack Grafana dashboard, built with grafana-foundation-sdk from the spec and the runtime's metric names."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any, Literal, get_args

from gpugate_runtime.authz import Outcome
from gpugate_runtime.contract import metrics as m
from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import dashboard as dash
from grafana_foundation_sdk.builders import prometheus, stat, timeseries
from grafana_foundation_sdk.cog import runtime as cogruntime
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.cog.plugins import register_default_plugins
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as model

# The alerts' own definitions, so that the dashboard's lines are where the alerts fire.
from gpugate.render.alerts import INTERNAL_CA_ALERT_SECONDS, _gpu_memory_ratio, error_ratio
from gpugate.spec import GatewaySpec

DASHBOARD_DIR = "grafana"
DATASOURCE_VARIABLE = "datasource"
DATASOURCE = model.DataSourceRef(type_val="prometheus", uid=f"${{{DATASOURCE_VARIABLE}}}")
# Grafana picks the rate window from the scrape interval and the zoom; Prometheus itself
# needs a literal window, so queries run outside Grafana substitute one.
RATE_INTERVAL = "$__rate_interval"
DEFAULT_WINDOW = "5m"
GRID_COLUMNS = 24
UID_MAX = 40  # Grafana's limit on a dashboard uid
_UID_PATTERN = re.compile(rf"^[A-Za-z0-9_-]{{1,{UID_MAX}}}$")

# The authz outcomes behind each refusal the dashboard counts per key.
UNAUTHORIZED = (Outcome.MISSING_KEY, Outcome.MALFORMED_KEY, Outcome.UNKNOWN_KEY, Outcome.EXPIRED_KEY, Outcome.REVOKED_KEY)
THROTTLED = (Outcome.RATE_LIMITED, Outcome.CONCURRENCY_LIMITED)
# The `code` shown for requests Caddy counts as handler errors, which carry no status label.
HANDLER_ERROR = "handler error"

Row = Literal["Traffic", "Latency", "Errors and keys", "vLLM capacity", "GPU", "Health", "Routing"]
ROWS: tuple[Row, ...] = get_args(Row)


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str


@dataclass(frozen=True)
class PanelDef:
    """One panel as data: what it shows, in which row, and the SLO line drawn on it (if any)."""

    row: Row
    title: str
    description: str
    queries: tuple[Query, ...]
    unit: str
    kind: Literal["timeseries", "stat"] = "timeseries"
    threshold: float | None = None  # from the stack's SLOs: a dashed red line on a graph
    below_is_bad: bool = False  # a stat turns red under its threshold (days left) instead of over it
    status_text: tuple[str, str] | None = None  # a 0/1 stat's words for 0 and 1
    width: int = 8
    no_value: str | None = None


def _outcomes(outcomes: tuple[Outcome, ...]) -> str:
    return "|".join(o.value for o in outcomes)


def _rate(selector: str) -> str:
    return f"rate({selector}[{RATE_INTERVAL}])"


def _by_status(answered: str) -> str:
    """Requests per second by status code, with the failed ones (no status in Caddy's histogram) as HANDLER_ERROR."""
    failed = f'label_replace(sum({_rate(m.CADDY_REQUEST_ERRORS)}), "code", "{HANDLER_ERROR}", "", "")'
    return f"sum by (code) ({_rate(answered)}) or {failed}"


def _quantiles(histogram: str) -> tuple[Query, ...]:
    return tuple(
        Query(f"histogram_quantile({q}, sum by (le) ({_rate(histogram + '_bucket')}))", f"p{round(q * 100)}")
        for q in (0.5, 0.95, 0.99)
    )


def routing_panels(spec: GatewaySpec) -> list[PanelDef]:
    """A stack that routes: per tier and provider, what the router sent where, how fast, and what fell back."""
    if not spec.routes:
        return []
    ttft = f"{m.GENAI_TTFT}_bucket"
    return [
        PanelDef(
            "Routing", "Requests by route",
            "Requests per second each tier (`tier:<name>`) or provider (`provider:<name>`) answered, "
            "and the router's own refusals (`none`).",
            (Query(f"sum by (route) ({_rate(m.ROUTE_REQUESTS)})", "{{route}}"),), "reqps",
        ),
        PanelDef(
            "Routing", "Time to first token by route (p95)",
            f"p95 time to the first byte of each route's answers. Dashed line: the SLO at {spec.slo.ttft_p95_seconds:g} s.",
            (Query(f"histogram_quantile(0.95, sum by (le, route) ({_rate(ttft)}))", "{{route}}"),), "s",
            threshold=spec.slo.ttft_p95_seconds,
        ),
        PanelDef(
            "Routing", "Fallbacks",
            "Requests answered by another route than their policy's first choice, per second, by direction.",
            (Query(f"sum by (from_route, to_route) ({_rate(m.ROUTE_FALLBACKS)})", "{{from_route}} → {{to_route}}"),), "reqps",
        ),
        PanelDef(
            "Routing", "Tokens by route",
            "Input and output tokens per second through each route (gen_ai.client.token.usage).",
            (Query(
                f"sum by (route, gen_ai_token_type) ({_rate(m.GENAI_TOKEN_USAGE + '_sum')})", "{{route}} {{gen_ai_token_type}}"
            ),),
            "short",
        ),
        PanelDef(
            "Routing", "Route errors",
            "Failed attempts per second by route and reason (connect, timeout, status_5xx, status_429, no_key).",
            (Query(f"sum by (route, reason) ({_rate(m.ROUTE_ERRORS)})", "{{route}} {{reason}}"),), "reqps",
        ),
        PanelDef(
            "Routing", "Tiers",
            "Whether the router sends to each local tier (down: held down after a refused connection until its /health answers).",
            (Query(f"min by (tier) ({m.ROUTE_TIER_UP})", "{{tier}}"),), "none", kind="stat", status_text=("down", "up"),
        ),
    ]  # fmt: skip


def panels(spec: GatewaySpec) -> list[PanelDef]:
    """Every panel of the stack's dashboard, in order; thresholds come from the stack's SLOs and key policy."""
    slo = spec.slo
    answered = f"{m.CADDY_REQUEST_DURATION}_count"
    decisions = m.AUTHZ_DECISIONS
    refused = f'{decisions}{{outcome=~"{_outcomes(UNAUTHORIZED)}"}}'
    throttled = f'{decisions}{{outcome=~"{_outcomes(THROTTLED)}"}}'
    cpu = spec.gpu.type == "cpu"
    # Caddy's internal CA issues 12-hour certificates: its alert counts hours, a public CA's days.
    internal_ca = spec.tls.mode == "internal"
    cert_days = INTERNAL_CA_ALERT_SECONDS / 86400 if internal_ca else slo.cert_expiry_days
    cert_words = f"{INTERNAL_CA_ALERT_SECONDS // 3600} hours" if internal_ca else f"{slo.cert_expiry_days} days"
    return [
        PanelDef(
            "Traffic", "Request rate by status",
            f"Requests answered by the TLS proxy per second, by HTTP status; `{HANDLER_ERROR}`: Caddy could not "
            "reach authz or vLLM (a 502, or the 503 its error handler sends instead).",
            (Query(_by_status(answered), "{{code}}"),), "reqps",
        ),
        PanelDef(
            "Traffic", "Requests by auth outcome",
            "Decisions of the auth service per second: every public API request gets exactly one.",
            (Query(f"sum by (outcome) ({_rate(decisions)})", "{{outcome}}"),), "reqps",
        ),
        PanelDef(
            "Traffic", "Tokens per second",
            "Prompt tokens read and completion tokens generated by vLLM.",
            (
                Query(f"sum({_rate(m.VLLM_PROMPT_TOKENS)})", "prompt"),
                Query(f"sum({_rate(m.VLLM_GENERATION_TOKENS)})", "generated"),
            ),
            "short",
        ),
        PanelDef(
            "Latency", "End-to-end latency p50 / p95 / p99",
            f"vLLM's request latency, arrival to last token. Dashed line: the p95 SLO of {slo.latency_p95_seconds:g} s.",
            _quantiles(m.VLLM_E2E_LATENCY), "s", threshold=slo.latency_p95_seconds, width=12,
        ),
        PanelDef(
            "Latency", "Time to first token p50 / p95 / p99",
            f"How long clients wait for the first token. Dashed line: the p95 SLO of {slo.ttft_p95_seconds:g} s.",
            _quantiles(m.VLLM_TTFT), "s", threshold=slo.ttft_p95_seconds, width=12,
        ),
        PanelDef(
            "Errors and keys", "5xx ratio",
            "Share of requests that failed with a 5xx, counted as the burn-rate alerts count them. "
            f"Dashed line: the error budget of the {slo.availability:.3%} availability SLO.",
            (Query(error_ratio(RATE_INTERVAL), "5xx"),),
            "percentunit", threshold=round(1 - slo.availability, 6), width=6,
        ),
        PanelDef(
            "Errors and keys", "5xx rate by status",
            f"Server errors per second by status; `{HANDLER_ERROR}`: Caddy could not reach authz or vLLM.",
            (Query(_by_status(answered + '{code=~"5.."}'), "{{code}}"),), "reqps",
            width=6, no_value="0",
        ),
        PanelDef(
            "Errors and keys", "401 rate by key id",
            "Requests refused for a missing, malformed, unknown, expired or revoked key; key id `-` is a key "
            "nobody holds. A burst suggests a leaked or guessed key.",
            (Query(f"sum by (key_id, outcome) ({_rate(refused)})", "{{key_id}} {{outcome}}"),),
            "reqps", width=6, no_value="0",
        ),
        PanelDef(
            "Errors and keys", "429 rate by key id",
            "Requests refused because a key is over its requests-per-minute or concurrency limit.",
            (Query(f"sum by (key_id, outcome) ({_rate(throttled)})", "{{key_id}} {{outcome}}"),),
            "reqps", width=6, no_value="0",
        ),
        PanelDef(
            "Errors and keys", "Key age",
            f"Age of each active client key. Dashed line: the rotation policy of {spec.limits.rotation_days} days.",
            (Query(f"max by (key_id, name) ({m.KEY_AGE_SECONDS}) / 86400", "{{name}} ({{key_id}})"),),
            "d", threshold=spec.limits.rotation_days, width=24,
        ),
        PanelDef(
            "vLLM capacity", "Queue depth",
            f"Requests waiting for a slot and running in vLLM. Dashed line: the backlog alert at {slo.queue_backlog}.",
            (Query(f"sum({m.VLLM_WAITING})", "waiting"), Query(f"sum({m.VLLM_RUNNING})", "running")),
            "short", threshold=slo.queue_backlog,
        ),
        PanelDef(
            "vLLM capacity", "KV-cache usage",
            f"Share of the KV cache in use, fullest replica. Dashed line: the alert at {slo.kv_cache_usage:.0%}.",
            (Query(f"max({m.VLLM_KV_USAGE})", "usage"),), "percentunit", threshold=slo.kv_cache_usage,
        ),
        PanelDef(
            "vLLM capacity", "Preemptions",
            "Sequences vLLM evicted per second to free KV cache; above zero, the cache is too small for the load.",
            (Query(f"sum({_rate(m.VLLM_PREEMPTIONS)})", "preemptions/s"),), "short",
        ),
        PanelDef(
            "GPU", "GPU memory used",
            "Used share of each GPU's memory, read as the GPU memory alert reads it (NVML through the prober on "
            f"a VM, the DCGM exporter on Kubernetes). Dashed line: the alert at {slo.gpu_memory_usage:.0%}.",
            (Query(f"max by (Hostname, gpu) ({_gpu_memory_ratio(spec)})", "{{Hostname}} GPU {{gpu}}"),),
            "percentunit", threshold=slo.gpu_memory_usage, width=24,
            no_value="no GPU on this stack" if cpu else None,
        ),
        PanelDef(
            "Health", "Synthetic checks",
            "The prober's last result for each check, end to end through the public URL.",
            (Query(f"min by (check) ({m.PROBE_SUCCESS})", "{{check}}"),), "none",
            kind="stat", status_text=("fail", "pass"), width=6,
        ),
        PanelDef(
            "Health", "Probe duration",
            "How long each synthetic check took on its last run.",
            (Query(f"max by (check) ({m.PROBE_DURATION})", "{{check}}"),), "s", width=6,
        ),
        PanelDef(
            "Health", "Certificate days left",
            f"Time until the public URL's TLS certificate expires; red under {cert_words}, where its alert fires.",
            (Query(f"min({m.TLS_CERT_NOT_AFTER} - time()) / 86400", "days left"),), "d",
            kind="stat", threshold=cert_days, below_is_bad=True, width=6,
        ),
        PanelDef(
            "Health", "Services up",
            "Whether Prometheus can scrape each service of the gateway.",
            (Query("min by (job) (up)", "{{job}}"),), "none", kind="stat", status_text=("down", "up"), width=6,
        ),
    ]


def panel_queries(spec: GatewaySpec) -> list[tuple[str, str]]:
    """(panel title, PromQL) for every query of every panel, exactly as the dashboard holds it."""
    return [(p.title, q.expr) for p in panels(spec) + routing_panels(spec) for q in p.queries]


def executable(expr: str, window: str = DEFAULT_WINDOW) -> str:
    """A panel's PromQL as Prometheus takes it: Grafana's rate window replaced by a literal one."""
    return expr.replace(RATE_INTERVAL, window)


def dashboard_uid(stack: str) -> str:
    """`gpugate-<stack>`, or a shortened, hash-suffixed form of it where Grafana's 40-character,
    [A-Za-z0-9_-] limit would not take the name as it is."""
    uid = f"gpugate-{stack}"
    if _UID_PATTERN.match(uid):
        return uid
    digest = hashlib.sha256(stack.encode()).hexdigest()[:8]
    cleaned = re.sub(r"[^A-Za-z0-9_-]+", "-", stack)[: UID_MAX - len("gpugate--") - len(digest)]
    return f"gpugate-{cleaned}-{digest}"


def _thresholds(panel: PanelDef) -> dash.ThresholdsConfig:
    good, bad = model.Threshold(color="green"), model.Threshold(color="red")
    steps = [good]
    if panel.threshold is not None:
        steps = [bad, model.Threshold(value=panel.threshold, color="green")] if panel.below_is_bad else [
            good, model.Threshold(value=panel.threshold, color="red"),
        ]
    return dash.ThresholdsConfig().mode(model.ThresholdsMode.ABSOLUTE).steps(steps)


def _status_mappings(words: tuple[str, str]) -> list[model.ValueMap]:
    down, up = words
    return [
        model.ValueMap(
            options={
                "0": model.ValueMappingResult(text=down, color="red", index=0),
                "1": model.ValueMappingResult(text=up, color="green", index=1),
            }
        )
    ]


def _build_panel(panel: PanelDef, panel_id: int) -> timeseries.Panel | stat.Panel:
    builder: Any = stat.Panel() if panel.kind == "stat" else timeseries.Panel()
    builder = (
        builder.id(panel_id)
        .title(panel.title)
        .description(panel.description)
        .datasource(DATASOURCE)
        .unit(panel.unit)
        .span(panel.width)
        .height(8)
        .thresholds(_thresholds(panel))
    )
    for ref, query in zip("ABCDEFGH", panel.queries, strict=False):
        target = prometheus.Dataquery().ref_id(ref).datasource(DATASOURCE).expr(query.expr).legend_format(query.legend)
        builder = builder.with_target(target.instant() if panel.kind == "stat" else target.range())
    if panel.no_value is not None:
        builder = builder.no_value(panel.no_value)
    if panel.kind == "stat":
        builder = builder.color_mode(common.BigValueColorMode.BACKGROUND).graph_mode(common.BigValueGraphMode.NONE)
        if panel.status_text:
            builder = builder.mappings(_status_mappings(panel.status_text))
    else:
        builder = (
            builder.legend(
                common_builders.VizLegendOptions()
                .display_mode(common.LegendDisplayMode.LIST)
                .placement(common.LegendPlacement.BOTTOM)
                .show_legend(True)
            )
            .tooltip(common_builders.VizTooltipOptions().mode(common.TooltipDisplayMode.MULTI).sort(common.SortOrder.DESCENDING))
            .fill_opacity(10)
            .min(0)
        )
        if panel.threshold is not None:
            builder = builder.thresholds_style(
                common_builders.GraphThresholdsStyleConfig().mode(common.GraphThresholdsStyleMode.DASHED)
            )
    return builder


def dashboard(spec: GatewaySpec, stack: str) -> model.Dashboard:
    """The stack's dashboard as the SDK's model: rows of panels over a Prometheus picked by variable."""
    builder = (
        dash.Dashboard(f"gpugate · {stack}")
        .uid(dashboard_uid(stack))
        .description(
            f"Generated by gpugate from stacks/Pulumi.{stack}.yaml ({spec.target}, {spec.domain}) — do not edit; "
            "change the stack file or gpugate/render/dashboards.py and render again."
        )
        .tags(["gpugate", f"stack:{stack}", f"target:{spec.target}"])
        .timezone("utc")
        .time("now-3h", "now")
        .refresh("30s")
        .tooltip(model.DashboardCursorSync.CROSSHAIR)
        .with_variable(
            dash.DatasourceVariable(DATASOURCE_VARIABLE).label("Prometheus").type("prometheus")
        )
        .link(
            dash.DashboardLink("Runbooks")
            .type(model.DashboardLinkType.LINK)
            .url(str(spec.alerts.runbook_base_url))
            .icon("doc")
            .target_blank(True)
        )
    )
    next_id = 1
    defs = panels(spec) + routing_panels(spec)
    for row in ROWS:
        if not any(p.row == row for p in defs):
            continue  # the Routing row, on a stack that does not route
        builder = builder.with_row(dash.Row(row).id(next_id))
        next_id += 1
        for panel in (p for p in defs if p.row == row):
            builder = builder.with_panel(_build_panel(panel, next_id))
            next_id += 1
    return builder.build()


def _encode(value: Any) -> bytes:
    return (JSONEncoder(sort_keys=True, indent=2, ensure_ascii=False).encode(value) + "\n").encode()


def dashboard_files(spec: GatewaySpec, stack: str) -> dict[str, bytes]:
    """{"grafana/<uid>.json": the dashboard as sorted, indented JSON} for the bundle."""
    return {f"{DASHBOARD_DIR}/{dashboard_uid(stack)}.json": _encode(dashboard(spec, stack))}


# -- checks ----------------------------------------------------------------------------------------


def _sdk_round_trip(data: dict[str, Any]) -> list[str]:
    """The SDK reads the JSON into its typed model and writes it back unchanged: no unknown or mistyped field."""
    register_default_plugins()
    try:
        parsed = model.Dashboard.from_json(data)
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        return [f"grafana-foundation-sdk cannot read it: {err!r}"]
    again = json.loads(JSONEncoder().encode(parsed))
    if again != data:
        changed = sorted(k for k in set(again) | set(data) if again.get(k) != data.get(k))
        return [f"grafana-foundation-sdk reads it differently (unknown or mistyped field under: {', '.join(changed)})"]
    return []


def _overlaps(a: dict[str, int], b: dict[str, int]) -> bool:
    return a["x"] < b["x"] + b["w"] and b["x"] < a["x"] + a["w"] and a["y"] < b["y"] + b["h"] and b["y"] < a["y"] + a["h"]


def dashboard_problems(data: Any) -> list[str]:
    """What Grafana would refuse or show broken in a dashboard JSON document; empty when it is sound."""
    if not isinstance(data, dict):
        return ["not a JSON object"]
    problems = _sdk_round_trip(data)
    if not _UID_PATTERN.match(str(data.get("uid", ""))):
        problems.append(f"uid {data.get('uid')!r}: Grafana takes 1-40 characters of [A-Za-z0-9_-]")
    if not data.get("title") or not isinstance(data.get("title"), str):
        problems.append("title is not a non-empty string")
    if not isinstance(data.get("refresh", ""), str):
        problems.append(f"refresh {data['refresh']!r} is not an interval string such as 30s")
    variables = {v.get("name"): v for v in (data.get("templating") or {}).get("list", [])}
    source = variables.get(DATASOURCE_VARIABLE)
    if not source or source.get("type") != "datasource" or source.get("query") != "prometheus":
        problems.append(f"no `{DATASOURCE_VARIABLE}` variable choosing a Prometheus data source")
    ids: set[int] = set()
    placed: list[tuple[str, dict[str, int]]] = []
    for panel in data.get("panels", []):
        name = f"panel {panel.get('id')} {panel.get('title')!r}"
        if panel.get("id") in ids:
            problems.append(f"{name}: id used twice")
        ids.add(panel.get("id"))
        grid = panel.get("gridPos")
        if not isinstance(grid, dict) or not all(isinstance(grid.get(k), int) for k in "xywh"):
            problems.append(f"{name}: gridPos needs integer x, y, w, h")
            continue
        if grid["x"] < 0 or grid["w"] < 1 or grid["h"] < 1 or grid["x"] + grid["w"] > GRID_COLUMNS:
            problems.append(f"{name}: gridPos {grid} does not fit the {GRID_COLUMNS}-column grid")
        problems += [f"{name}: overlaps {other}" for other, box in placed if _overlaps(grid, box)]
        placed.append((name, grid))
        if panel.get("type") == "row":
            continue
        if cogruntime.panelcfg_config(str(panel.get("type"))) is None:
            problems.append(f"{name}: panel type {panel.get('type')!r} is not one Grafana ships")
        unit = ((panel.get("fieldConfig") or {}).get("defaults") or {}).get("unit", "")
        if not isinstance(unit, str):
            problems.append(f"{name}: unit {unit!r} is not a string")
        targets = panel.get("targets") or []
        if not targets:
            problems.append(f"{name}: no query")
        refs = [t.get("refId") for t in targets]
        if len(set(refs)) != len(refs):
            problems.append(f"{name}: refIds repeat {refs}")
        for target in targets:
            if not str(target.get("expr", "")).strip():
                problems.append(f"{name}: query {target.get('refId')} has no PromQL")
        for ref in [panel.get("datasource")] + [t.get("datasource") for t in targets]:
            if ref != DATASOURCE.to_json():
                problems.append(f"{name}: data source {ref} is not the `{DATASOURCE_VARIABLE}` variable")
    return problems


def dashboard_exprs(data: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every query in a dashboard JSON document."""
    return [
        (panel.get("title", ""), target["expr"])
        for panel in data.get("panels", [])
        for target in panel.get("targets") or []
        if "expr" in target
    ]


def recording_rules(exprs: list[tuple[str, str]]) -> dict[str, Any]:
    """The queries as Prometheus recording rules, so that `promtool check rules` parses every one."""
    rules = [{"record": f"gpugate_dashboard:query_{i}", "expr": executable(expr)} for i, (_, expr) in enumerate(exprs)]
    return {"groups": [{"name": "gpugate-dashboard-queries", "rules": rules}]}

"""The deploy files: ``deploy/prometheus/alerts.yml`` and ``deploy/grafana/stockledger.json``.

* The alert file passes ``promtool check rules`` (which also parses the annotation templates),
  and ``promtool test rules`` fires each alert on made-up series and not below its threshold.
  Both skip with the reason when ``promtool`` is not on PATH (Debian: ``apt-get install
  prometheus``).
* Every query of both files (alert ``expr``, panel target ``expr``, template variable query)
  names only series that ``GET /metrics`` exposes, with labels those series carry. Series
  names come from the served app's own exposition (histograms with ``_bucket``, ``_sum`` and
  ``_count``, counters with ``_total``); the metric names of a query come from a small PromQL
  scanner whose own test below shows it reports a misspelt name.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from conftest import make_settings
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

from stockledger.app.serving import create_served_app
from stockledger.observability import metrics as stockledger_metrics

ROOT = Path(__file__).resolve().parents[1]
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "stockledger.json"

# The rules the issue asks for (13, part 5), under honest names.
EXPECTED_ALERTS = {
    "StockledgerUnexpectedErrors",
    "StockledgerGraphQLErrors",
    "StockledgerRedisDegraded",
    "StockledgerTransactionRetries",
    "StockledgerLockTimeouts",
    "StockledgerExpiryBacklog",
    "StockledgerCartsRefusedInsufficientStock",
}
SEVERITIES = {"critical", "warning", "info"}
# Labels Prometheus adds to every scraped series.
TARGET_LABELS = frozenset({"job", "instance"})

# ----------------------------------------------------------------------------- PromQL scanner

FUNCTIONS = frozenset(
    """abs absent absent_over_time acos acosh asin asinh atan atanh avg_over_time ceil changes
    clamp clamp_max clamp_min cos cosh count_over_time day_of_month day_of_week day_of_year
    days_in_month deg delta deriv exp floor histogram_avg histogram_count histogram_fraction
    histogram_quantile histogram_stddev histogram_stdvar histogram_sum holt_winters hour idelta
    increase irate label_join label_replace last_over_time ln log10 log2 mad_over_time
    max_over_time min_over_time minute month pi predict_linear present_over_time
    quantile_over_time rad rate resets round scalar sgn sin sinh sort sort_desc sqrt
    stddev_over_time stdvar_over_time sum_over_time tan tanh time timestamp vector year""".split()
)
AGGREGATIONS = frozenset(
    "sum min max avg group stddev stdvar count count_values bottomk topk quantile".split()
)
KEYWORDS = frozenset("and or unless bool offset atan2 inf nan".split())
# Functions whose argument is a counter's range: the only way to read a counter.
RATE_FUNCTIONS = frozenset({"rate", "irate", "increase"})

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_SELECTOR = re.compile(r"([A-Za-z_:][\w:]*)?\s*\{([^{}]*)\}")
_MATCHER = re.compile(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)")
_GRAFANA_VARIABLE = re.compile(r"\$\{[^}]*\}|\$\w+")
_IDENTIFIER = re.compile(r"(?<![\w.:$])[A-Za-z_:][\w:]*(?![\w:])")


@dataclass
class Query:
    """What a PromQL expression names: each metric with the labels its selectors match on,
    the labels of its ``by``/``without``/``on``/``ignoring``/``group_*`` clauses, the functions
    it calls, and metrics that are read other than through rate/irate/increase."""

    metrics: dict[str, set[str]] = field(default_factory=dict)
    grouping: set[str] = field(default_factory=set)
    functions: set[str] = field(default_factory=set)
    not_rated: set[str] = field(default_factory=set)
    nameless_selectors: int = 0


def scan(expr: str) -> Query:
    """Scan ``expr`` (Grafana variables allowed) for the names it uses."""
    query = Query()
    text = _STRING.sub('""', expr)  # label values and regexes name nothing
    for match in _SELECTOR.finditer(text):
        name, body = match.group(1), match.group(2)
        if name is None:
            query.nameless_selectors += 1
            continue
        query.metrics.setdefault(name, set()).update(_MATCHER.findall(body))
    text = _SELECTOR.sub(lambda m: f" {m.group(1) or ''} ", text)
    text = _RANGE.sub(" ", text)
    for labels in _GROUPING.findall(text):
        query.grouping.update(label.strip() for label in labels.split(",") if label.strip())
    text = _GROUPING.sub(" ", text)
    text = _GRAFANA_VARIABLE.sub(" ", text)
    for match in _IDENTIFIER.finditer(text):
        word = match.group(0)
        if text[match.end() :].lstrip().startswith("("):
            query.functions.add(word)
        elif word.lower() not in KEYWORDS:
            query.metrics.setdefault(word, set())
            before = text[: match.start()].rstrip()
            caller = re.search(r"([A-Za-z_]\w*)\s*\($", before)
            if caller is None or caller.group(1) not in RATE_FUNCTIONS:
                query.not_rated.add(word)
    return query


def test_scanner_reports_what_an_expression_names() -> None:
    query = scan(
        "histogram_quantile(0.99, sum by (le, field) (rate(inventory_graphql_request_seconds"
        '_bucket{job=~"$job", outcome!="ok"}[$__rate_interval]))) / ignoring (reason) '
        "group_left () sum(rate(inventory_reserve_totl[5m] offset 1h)) > 1e3 and "
        "process_resident_memory_bytes"
    )
    assert query.metrics == {
        "inventory_graphql_request_seconds_bucket": {"job", "outcome"},
        "inventory_reserve_totl": set(),  # misspelt, and reported as named
        "process_resident_memory_bytes": set(),
    }
    assert query.grouping == {"le", "field", "reason"}
    assert query.functions == {"histogram_quantile", "sum", "rate"}
    assert query.not_rated == {"process_resident_memory_bytes"}
    assert scan('{__name__="x"}').nameless_selectors == 1


# ----------------------------------------------------------------------------- /metrics


@dataclass(frozen=True)
class Series:
    """One series name ``/metrics`` exposes: its family's type and label names."""

    family_type: str
    labels: frozenset[str]


_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
}


def _declared_labels() -> dict[str, frozenset[str]]:
    """Family name -> label names of stockledger's own collectors. A labelled family without
    children yet exposes only its HELP and TYPE lines, so its labels come from here."""
    out: dict[str, frozenset[str]] = {}
    for value in vars(stockledger_metrics).values():
        if isinstance(value, MetricWrapperBase):
            family = value._name  # the exposed family name (a counter's without ``_total``)
            out[family] = frozenset(value._labelnames)
    return out


async def _get_metrics() -> httpx.Response:
    app = create_served_app(make_settings())
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://stockledger") as http:
        return await http.get("/metrics")


@pytest.fixture(scope="module")
def exposed() -> Iterator[dict[str, Series]]:
    """Every series name ``GET /metrics`` of the served app (embedded default, no lifespan)
    exposes, in single-process mode as ``--workers 1`` runs it."""
    declared = _declared_labels()
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
        response = asyncio.run(_get_metrics())
    assert response.status_code == 200, response.text
    series: dict[str, Series] = {}
    for family in text_string_to_metric_families(response.text):
        labels = {k for s in family.samples for k in s.labels if k not in ("le", "quantile")}
        labels |= declared.get(family.name, frozenset())
        names = {family.name + suffix for suffix in _SUFFIXES.get(family.type, ("",))}
        names |= {s.name for s in family.samples}
        for name in names:
            series[name] = Series(family.type, frozenset(labels))
    assert "inventory_reserve_total" in series  # the app's collectors are registered
    yield series


def check_query(expr: str, exposed: dict[str, Series], *, selector: bool = False) -> list[str]:
    """Every problem of ``expr`` against what ``/metrics`` exposes (empty when none).
    ``selector``: a bare series selector (a variable's), which need not rate counters."""
    query = scan(expr)
    problems: list[str] = []
    if not query.metrics:
        problems.append("names no metric")
    if query.nameless_selectors:
        problems.append("has a selector without a metric name")
    unknown_functions = query.functions - FUNCTIONS - AGGREGATIONS
    if unknown_functions:
        problems.append(f"calls unknown functions {sorted(unknown_functions)}")
    known_labels = set(TARGET_LABELS)
    for name, labels in sorted(query.metrics.items()):
        series = exposed.get(name)
        if series is None:
            problems.append(f"names {name!r}, which /metrics does not expose")
            continue
        allowed = series.labels | TARGET_LABELS | ({"le"} if name.endswith("_bucket") else set())
        known_labels |= allowed
        if labels - allowed:
            problems.append(f"matches {name!r} on labels it lacks: {sorted(labels - allowed)}")
        rated = selector or name not in query.not_rated
        if series.family_type in ("counter", "histogram") and not rated:
            problems.append(f"reads the {series.family_type} series {name!r} without rate()")
    if query.grouping - known_labels:
        problems.append(f"groups by labels no series has: {sorted(query.grouping - known_labels)}")
    if "histogram_quantile" in query.functions and "le" not in query.grouping:
        problems.append("histogram_quantile over buckets not kept apart by le")
    return problems


# ----------------------------------------------------------------------------- alerts


def _alert_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(ALERTS.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def test_alert_rules_have_the_expected_names_and_fields() -> None:
    rules = _alert_rules()
    names = [rule.get("alert") for rule in rules]
    assert sorted(names) == sorted(EXPECTED_ALERTS)  # each once, no recording rules
    assert not any("oversell" in str(name).lower() for name in names)
    for rule in rules:
        assert set(rule) == {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]
        assert rule["labels"]["severity"] in SEVERITIES, rule["alert"]
        assert set(rule["annotations"]) == {"summary", "description"}, rule["alert"]
        assert all(str(text).strip() for text in rule["annotations"].values()), rule["alert"]


@pytest.mark.parametrize("rule", _alert_rules(), ids=lambda rule: str(rule["alert"]))
def test_alert_expr_names_only_exposed_metrics(
    rule: dict[str, Any], exposed: dict[str, Series]
) -> None:
    assert check_query(rule["expr"], exposed) == []


def _promtool() -> str:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip(
            "promtool is not on PATH: install Prometheus's promtool (Debian/Ubuntu: "
            "apt-get install prometheus) to check deploy/prometheus/alerts.yml"
        )
    return promtool


def _run(command: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NO_COLOR": "1"}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=60)


def test_promtool_check_rules() -> None:
    done = _run([_promtool(), "check", "rules", str(ALERTS)], ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(EXPECTED_ALERTS)} rules found" in done.stdout


JOB = 'job="stockledger", instance="stockledger-1:8000"'


def _histogram(name: str, per_minute: dict[str, int], minutes: int) -> list[dict[str, str]]:
    """Buckets of ``name`` growing by ``per_minute[le]`` observations each minute."""
    return [
        {"series": f'{name}_bucket{{{JOB}, le="{le}"}}', "values": f"0+{step}x{minutes}"}
        for le, step in per_minute.items()
    ]


def _counter(name: str, per_minute: int, minutes: int, **labels: str) -> dict[str, str]:
    extra = "".join(f', {k}="{v}"' for k, v in labels.items())
    return {"series": f"{name}{{{JOB}{extra}}}", "values": f"0+{per_minute}x{minutes}"}


# (alert, input series, eval time, fires?, labels of the alert beyond job and severity)
PROMTOOL_CASES: list[tuple[str, list[dict[str, str]], str, bool, dict[str, str]]] = [
    (
        "StockledgerUnexpectedErrors",
        [{"series": f"inventory_unexpected_errors_total{{{JOB}}}", "values": "0 1x20"}],
        "5m",  # one error, at minute 1
        True,
        {},
    ),
    (
        "StockledgerUnexpectedErrors",
        [_counter("inventory_unexpected_errors_total", 0, 20)],
        "10m",
        False,
        {},
    ),
    (
        "StockledgerGraphQLErrors",  # 6 of 66 requests a minute: 9%
        [
            _counter("inventory_graphql_request_seconds_count", 60, 30, outcome="ok"),
            _counter("inventory_graphql_request_seconds_count", 6, 30, outcome="error"),
        ],
        "20m",
        True,
        {},
    ),
    (
        "StockledgerGraphQLErrors",  # 1 of 61: 1.6%
        [
            _counter("inventory_graphql_request_seconds_count", 60, 30, outcome="ok"),
            _counter("inventory_graphql_request_seconds_count", 1, 30, outcome="error"),
        ],
        "20m",
        False,
        {},
    ),
    (
        "StockledgerRedisDegraded",
        [_counter("inventory_redis_degraded_total", 10, 20)],
        "10m",
        True,
        {},
    ),
    (
        "StockledgerRedisDegraded",
        [_counter("inventory_redis_degraded_total", 0, 20)],
        "10m",
        False,
        {},
    ),
    (
        "StockledgerTransactionRetries",  # 6 deadlock retries per 60 batches: 10%
        [
            _counter("inventory_transaction_retries_total", 6, 30, reason="deadlock"),
            _counter("inventory_transaction_retries_total", 1, 30, reason="duplicate_key"),
            {"series": f"inventory_batch_size_count{{{JOB}}}", "values": "0+60x30"},
        ],
        "20m",
        True,
        {"reason": "deadlock"},
    ),
    (
        "StockledgerLockTimeouts",  # 0.2/s
        [_counter("inventory_lock_timeouts_total", 12, 20)],
        "15m",
        True,
        {},
    ),
    (
        "StockledgerLockTimeouts",  # 0.05/s
        [_counter("inventory_lock_timeouts_total", 3, 20)],
        "15m",
        False,
        {},
    ),
    (
        "StockledgerExpiryBacklog",  # every reservation expired 30-60 s late
        _histogram(
            "inventory_expiry_lag_seconds",
            {"1.0": 0, "30.0": 0, "60.0": 10, "300.0": 10, "+Inf": 10},
            40,
        ),
        "30m",
        True,
        {},
    ),
    (
        "StockledgerExpiryBacklog",  # every reservation expired within 1 s
        _histogram(
            "inventory_expiry_lag_seconds",
            {"1.0": 10, "30.0": 10, "60.0": 10, "300.0": 10, "+Inf": 10},
            40,
        ),
        "30m",
        False,
        {},
    ),
    (
        "StockledgerCartsRefusedInsufficientStock",  # 12 of 60 reserves a minute: 20%
        [
            _counter("inventory_reserve_total", 48, 40, status="success"),
            _counter("inventory_reserve_total", 12, 40, status="insufficient_stock"),
        ],
        "30m",
        True,
        {},
    ),
    (
        "StockledgerCartsRefusedInsufficientStock",  # 3 of 51: 5.9%
        [
            _counter("inventory_reserve_total", 48, 40, status="success"),
            _counter("inventory_reserve_total", 3, 40, status="insufficient_stock"),
        ],
        "30m",
        False,
        {},
    ),
]


def test_promtool_cases_cover_every_alert() -> None:
    assert {case[0] for case in PROMTOOL_CASES if case[3]} == EXPECTED_ALERTS


def test_promtool_test_rules_fire_each_alert(tmp_path: Path) -> None:
    """``promtool test rules``: each alert fires on series past its threshold, with its
    labels, and stays silent below it. The annotations are left out of the rules file under
    test because promtool compares them verbatim; ``promtool check rules`` parses them."""
    promtool = _promtool()
    document = yaml.safe_load(ALERTS.read_text())
    severity = {rule["alert"]: rule["labels"]["severity"] for rule in _alert_rules()}
    for group in document["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations")
    rules = tmp_path / "alerts.yml"
    rules.write_text(yaml.safe_dump(document))
    tests = []
    for alert, series, eval_time, fires, labels in PROMTOOL_CASES:
        expected = {"job": "stockledger", "severity": severity[alert], **labels}
        tests.append(
            {
                "interval": "1m",
                "input_series": series,
                "alert_rule_test": [
                    {
                        "eval_time": eval_time,
                        "alertname": alert,
                        "exp_alerts": [{"exp_labels": expected}] if fires else [],
                    }
                ],
            }
        )
    unit = tmp_path / "alerts_test.yml"
    unit.write_text(yaml.safe_dump({"rule_files": [rules.name], "tests": tests}))
    done = _run([promtool, "test", "rules", unit.name], tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


# ----------------------------------------------------------------------------- dashboard


def _dashboard() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return document


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))  # a collapsed row holds its panels


def _datasources(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        if isinstance(node.get("datasource"), dict):
            yield node["datasource"]
        for value in node.values():
            yield from _datasources(value)
    elif isinstance(node, list):
        for value in node:
            yield from _datasources(value)


def _dashboard_queries() -> list[tuple[str, str, bool]]:
    """(where, PromQL, is a bare selector) for every panel target and every query variable's
    series selector."""
    document = _dashboard()
    queries: list[tuple[str, str, bool]] = []
    for panel in _panels(document["panels"]):
        for target in panel.get("targets", []):
            queries.append((f"{panel['title']} {target['refId']}", target["expr"], False))
    for variable in document["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = variable["query"]
        text = query["query"] if isinstance(query, dict) else query
        assert text == variable["definition"], variable["name"]
        label_values = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", text.strip())
        assert label_values is not None, f"${variable['name']}: {text}"
        # The selector alone is PromQL; the label must be one its series carry.
        selector, label = label_values.groups()
        queries.append((f"${variable['name']}", f"sum by ({label}) ({selector})", True))
    return queries


def test_dashboard_is_a_grafana_dashboard_on_a_datasource_variable() -> None:
    document = _dashboard()
    assert document["uid"] == "stockledger" and document["title"]
    assert 36 <= document["schemaVersion"] <= 41
    assert document.get("id") is None  # importable anywhere
    variables = {v["name"]: v for v in document["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    # No hard-coded datasource: every reference is the variable, bar Grafana's own
    # built-in annotation source.
    for datasource in _datasources(document):
        if datasource.get("type") == "grafana":
            assert datasource["uid"] == "-- Grafana --"
        else:
            assert datasource == {"type": "prometheus", "uid": "${datasource}"}
    panels = list(_panels(document["panels"]))
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        position = panel["gridPos"]
        assert position["x"] + position["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        refs = [target["refId"] for target in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]


@pytest.mark.parametrize(
    ("expr", "selector"),
    [pytest.param(expr, selector, id=where) for where, expr, selector in _dashboard_queries()],
)
def test_dashboard_query_names_only_exposed_metrics(
    expr: str, selector: bool, exposed: dict[str, Series]
) -> None:
    assert check_query(expr, exposed, selector=selector) == []


def test_dashboard_has_the_panels_the_issue_asks_for() -> None:
    named = set().union(*(scan(expr).metrics for _, expr, _ in _dashboard_queries()))
    assert named >= {
        "inventory_graphql_request_seconds_count",  # request rate by operation
        "inventory_graphql_request_seconds_bucket",  # latency by operation
        "inventory_reserve_total",  # reserve outcomes
        "inventory_lock_wait_seconds_bucket",  # lock waits
        "inventory_lock_timeouts_total",  # lock timeouts
        "inventory_redis_degraded_total",
        "inventory_transaction_retries_total",
        "inventory_expiry_lag_seconds_bucket",
        "inventory_batch_size_bucket",
        "inventory_batch_seconds_bucket",
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
    }

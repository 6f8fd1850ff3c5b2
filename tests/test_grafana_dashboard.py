"""k8s/grafana/pdserve-dashboard.json: a Grafana dashboard whose every query reads metrics pdserve exports.

* shape: the datasource is a variable (``${datasource}``) used by every panel and query, panel
  ids are unique, every panel has a grid position;
* every PromQL expression parses (``promtool check rules`` on the expressions with Grafana's
  variables substituted);
* every metric name an expression reads is one that ``ServingMetrics`` and ``RouterMetrics``
  register (read from their registries, not listed here), or is declared in ``PLANNED`` *and*
  the panel says so ("Planned:" in its description) -- and a planned name that the code now
  registers fails the test, so the mark goes when the metric lands;
* histograms are read as quantiles (``histogram_quantile`` over ``sum by (le ...)``), and the
  topics the dashboard exists for each have a panel.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from engine.outputs import EngineStats
from router.experts import ExpertBalancer
from router.metrics import RouterMetrics
from serving.metrics import ServingMetrics

DASHBOARD = Path(__file__).resolve().parent.parent / "k8s" / "grafana" / "pdserve-dashboard.json"
# Metrics a panel may show before the code exports them: name -> the work that adds it.
PLANNED: dict[str, str] = {}
# What the dashboard is for: each needs a panel reading it.
REQUIRED = ["pdserve_time_to_first_token_seconds_bucket", "pdserve_inter_token_latency_seconds_bucket",
            "pdserve_e2e_request_latency_seconds_bucket", "pdserve_num_requests_waiting",
            "pdserve_kv_cache_usage_perc", "pdserve_spec_decode_num_accepted_tokens_total",
            "pdserve_router_kv_transfer_bytes_total", "pdserve_router_kv_transfer_seconds_bucket",
            "pdserve_router_retries_total", "pdserve_router_failures_total", "pdserve_expert_balancedness",
            "pdserve_eplb_rebalances_total", "pdserve_eplb_layer_pause_seconds_bucket"]
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$instance": ".*"}
PROMTOOL_HELP = "promtool is needed to parse the dashboard's PromQL (Debian package 'prometheus'; tools/dev.sh installs it)"


def exported_metric_names() -> set[str]:
    """Sample names the serving and router registries expose (a histogram: _bucket/_sum/_count, a counter: _total)."""
    stats = EngineStats(spec_drafts=1, spec_draft_tokens=1, spec_accepted_per_position=[1])  # spec metrics on
    metrics = ServingMetrics(stats=lambda: stats)
    RouterMetrics(lambda: {"prefill": (1, 1)}).attach(metrics.registry)
    ExpertBalancer(registry=None).attach(metrics.registry)
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
                "gauge": ("",), "summary": ("", "_sum", "_count", "_created")}
    return {family.name + s for family in metrics.registry.collect() for s in suffixes[family.type]}


def panels(dashboard: dict) -> list[dict]:
    out = []
    for p in dashboard["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))  # panels inside a collapsed row
    return out


def expressions(dashboard: dict) -> list[tuple[dict, str]]:
    """(panel, expr) for every query: panel targets and query variables."""
    exprs = [(p, t["expr"]) for p in panels(dashboard) for t in p.get("targets", [])]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            exprs.append(({"title": f"variable {var['name']}", "description": ""}, var["query"]["query"]))
    return exprs


_AGGREGATIONS = {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk", "topk",
                 "quantile", "limitk", "limit_ratio"}  # may take "by (...)" before their "("
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
             "offset", "atan2", "inf", "nan"} | _AGGREGATIONS
_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|\{[^}]*\}|\[[^\]]*\]|[A-Za-z_:][A-Za-z0-9_:]*|\S')


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: identifiers that are not functions, keywords or label lists."""
    if expr.startswith("label_values("):  # Grafana's variable query: label_values(metric, label)
        return {expr[len("label_values("):].split(",")[0].strip()}
    tokens = _TOKEN.findall(expr)
    names, i = set(), 0
    while i < len(tokens):
        t = tokens[i]
        nxt = tokens[i + 1] if i + 1 < len(tokens) else ""
        if t in ("by", "without", "on", "ignoring", "group_left", "group_right") and nxt == "(":
            i = tokens.index(")", i)  # a label list
        elif re.fullmatch(r"[A-Za-z_:][A-Za-z0-9_:]*", t) and t not in _KEYWORDS and nxt != "(":
            names.add(t)
        i += 1
    return names


def problems(dashboard: dict, exported: set[str]) -> list[str]:
    found = []
    for panel, expr in expressions(dashboard):
        for name in sorted(metric_names(expr)):
            if name in exported:
                continue
            if name in PLANNED and "Planned:" in panel.get("description", ""):
                continue
            found.append(f"{panel['title']!r}: {name} is not a metric pdserve exports ({expr})")
        for m in re.finditer(r"(\w+)_bucket\b", expr):
            if not re.search(r"histogram_quantile\([^,]+,\s*sum by \(le\b", expr):
                found.append(f"{panel['title']!r}: {m.group(0)} read without histogram_quantile over sum by (le)")
    return found


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def test_shape_and_datasource_variable(dashboard):
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids))
    for p in panels(dashboard):
        assert {"h", "w", "x", "y"} <= set(p["gridPos"]) and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24
        if p["type"] != "row":
            assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
            assert p["targets"] and all(t["datasource"]["uid"] == "${datasource}" for t in p["targets"])


def test_every_query_reads_metrics_pdserve_exports(dashboard):
    exported = exported_metric_names()
    assert "pdserve_router_kv_transfer_bytes_total" in exported and "pdserve_spec_decode_num_drafts_total" in exported
    assert problems(dashboard, exported) == []
    still_planned = sorted(set(PLANNED) & exported)
    assert not still_planned, f"{still_planned} are exported now: drop them from PLANNED and the 'Planned:' note"
    read = set().union(*(metric_names(e) for _, e in expressions(dashboard)))
    assert [name for name in REQUIRED if name not in read] == []


def test_the_check_catches_a_wrong_metric_name(dashboard, monkeypatch):
    broken = json.loads(json.dumps(dashboard))
    target = next(p for p in panels(broken) if p.get("targets"))
    target["targets"][0]["expr"] = target["targets"][0]["expr"].replace("pdserve_", "pdserv_", 1)
    assert len(problems(broken, exported_metric_names())) == 1
    # a metric still to come passes only while its panel says "Planned:"
    future = next(p for p in panels(broken) if p.get("title") == "Expert balance")
    future["targets"][0]["expr"] = "min(pdserve_future_metric)"
    monkeypatch.setitem(PLANNED, "pdserve_future_metric", "some later work")
    assert any("pdserve_future_metric" in p for p in problems(broken, exported_metric_names()))
    future["description"] = "Planned: " + future["description"]
    assert not any("pdserve_future_metric" in p for p in problems(broken, exported_metric_names()))
    assert metric_names('sum by (le, stage) (rate(a_b{x="y"}[5m])) / ignoring(position) group_left c') == {"a_b", "c"}


def test_every_expression_parses(dashboard, tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail(PROMTOOL_HELP)
    rules = []
    for i, (_, expr) in enumerate(expressions(dashboard)):
        if expr.startswith("label_values("):
            continue
        for var, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(var, value)
        assert "$" not in expr, expr
        rules.append({"record": f"dashboard:expr_{i}", "expr": expr})
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    r = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr

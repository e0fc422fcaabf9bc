"""The Grafana dashboard ``server/grafana/scalellm.json`` queries only what the server exports.

The exported names and labels come from a live scrape of a test server that has served requests (so the
labelled series exist), never from a list kept by hand: a metric renamed in the server fails here. Each
PromQL query is taken apart into the metric names and the label names it uses; ``histogram_quantile`` must
read ``_bucket`` series aggregated by ``le``; every query is scoped by the dashboard's replica variable.
The load balancer's panel reads HAProxy's own series (``tests/server/test_deploy_configs.py`` checks them
against a live HAProxy).
"""

from __future__ import annotations

import json
import pathlib
import re

import pytest
from prometheus_client.parser import text_string_to_metric_families
from server_helpers import ROOT, call

DASHBOARD = pathlib.Path(ROOT) / "server" / "grafana" / "scalellm.json"
# added to every scraped series by server/prometheus.yml (the scrape job, the replica's address or pod)
TARGET_LABELS = {"job", "replica"}
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset"}


@pytest.fixture(scope="module")
def exported(server) -> dict[str, set[str]]:
    """Sample name → its label names, from /metrics after a served request, a refused one and an unknown path."""
    assert call(server.url + "/v1/completions", {"model": "tiny-test", "prompt": "Hi", "max_tokens": 3})[0] == 200
    assert call(server.url + "/v1/completions", {"model": "tiny-test", "prompt": "Hi", "top_p": 7})[0] == 400
    assert call(server.url + "/no/such/path")[0] == 404
    status, _, text = call(server.url + "/metrics")
    assert status == 200
    names: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            names.setdefault(sample.name, set()).update(sample.labels)
    return names


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def server_panels(board: dict) -> list[dict]:
    """The panels over the server's series (all but the load balancer's, which reads HAProxy's)."""
    return [panel for panel in board["panels"]
            if not any("haproxy_" in target["expr"] for target in panel.get("targets", []))]


def queries(board: dict) -> list[str]:
    found = [target["expr"] for panel in server_panels(board) for target in panel.get("targets", [])]
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            found.append(variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"])
    return found


def parse(expr: str) -> tuple[set[str], set[str]]:
    """(metric names, label names) an expression uses. ``label_values(selector, label)`` reads its selector."""
    labels: set[str] = set()
    values = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", expr)
    if values:
        expr = values.group(1)
        labels.add(values.group(2))
    for block in re.findall(r"\{([^}]*)\}", expr):  # matchers: label=~"value"
        labels |= set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)\s*\"", block))
    for group in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", expr):
        labels |= {name.strip() for name in group.split(",") if name.strip()}
    bare = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\"[^\"]*\"|\b(?:by|without|on|ignoring)\s*\([^)]*\)", " ", expr)
    metrics = {name for name in re.findall(r"\b([a-zA-Z_:][\w:]*)\b(?!\s*\()", bare)
               if name not in KEYWORDS and not re.fullmatch(r"[\d.e]+", name)}
    return metrics, labels


def quantile_arguments(expr: str) -> list[str]:
    """The second argument of each histogram_quantile(q, ...) call (balanced parentheses)."""
    arguments = []
    for match in re.finditer(r"histogram_quantile\(", expr):
        depth, start = 1, match.end()
        for i in range(start, len(expr)):
            depth += {"(": 1, ")": -1}.get(expr[i], 0)
            if depth == 0:
                arguments.append(expr[start:i].split(",", 1)[1])
                break
    return arguments


def test_the_parser_sees_metrics_and_labels():
    metrics, labels = parse('histogram_quantile(0.9, sum by (replica, le) (rate(x_bucket{job=~"$job", a="1"}'
                            '[$__rate_interval]))) / sum(y_total{replica=~"$replica"})')
    assert metrics == {"x_bucket", "y_total"} and labels == {"replica", "le", "job", "a"}
    assert quantile_arguments("histogram_quantile(0.5, sum by (le) (rate(a_bucket[5m]))) + b") == [
        " sum by (le) (rate(a_bucket[5m]))"]
    assert parse('label_values(m{job=~"$job"}, replica)') == ({"m"}, {"job", "replica"})


def test_the_dashboard_is_an_importable_grafana_dashboard():
    board = dashboard()
    assert board["title"] and board["uid"] and board["schemaVersion"] >= 36
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["replica"]["multi"] and variables["replica"]["includeAll"]  # one replica, several or all
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in board["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["h"] > 0, panel["title"]


def test_every_query_names_only_exported_metrics_and_labels(exported):
    for expr in queries(dashboard()):
        metrics, labels = parse(expr)
        assert metrics, expr
        missing = metrics - set(exported)
        assert not missing, f"{expr}\n  names metrics the server does not export: {sorted(missing)}"
        known = TARGET_LABELS.union(*(exported[m] for m in metrics))
        assert labels <= known, f"{expr}\n  uses labels its metrics do not have: {sorted(labels - known)}"


def test_histogram_quantile_reads_buckets_by_le(exported):
    exprs = [e for e in queries(dashboard()) if "histogram_quantile" in e]
    assert exprs
    for expr in exprs:
        for argument in quantile_arguments(expr):
            metrics, labels = parse(argument)
            assert metrics and all(m.endswith("_bucket") for m in metrics), expr
            assert "le" in labels, f"{expr}: the buckets must be aggregated by le"
    for expr in queries(dashboard()):  # and buckets are read nowhere else
        outside = re.sub(r"histogram_quantile\(.*", "", expr)
        assert "_bucket" not in outside, expr


def test_every_panel_query_is_scoped_to_the_selected_replicas():
    for panel in server_panels(dashboard()):
        for target in panel.get("targets", []):
            selectors = re.findall(r"[a-zA-Z_:][\w:]*\{([^}]*)\}", target["expr"])
            assert selectors, target["expr"]
            assert all('replica=~"$replica"' in s for s in selectors), target["expr"]


def test_the_dashboard_covers_serving_operations():
    """Request rate, latency percentiles, tokens/s, queues, KV, preemptions and swaps, prefix cache, error rates."""
    used = set().union(*(parse(e)[0] for e in queries(dashboard())))
    for needed in ("scalellm_http_responses_total", "scalellm_time_to_first_token_seconds_bucket",
                   "scalellm_inter_token_latency_seconds_bucket", "scalellm_e2e_request_latency_seconds_bucket",
                   "scalellm_generation_tokens_total", "scalellm_num_requests_running",
                   "scalellm_num_requests_waiting", "scalellm_num_requests_swapped", "scalellm_kv_cache_usage_ratio",
                   "scalellm_num_preemptions_total", "scalellm_prefix_cache_hits_total",
                   "scalellm_prefix_cache_queries_total"):
        assert needed in used, needed
    exprs = queries(dashboard())
    for code in ('code=~"4.."', 'code=~"5.."', 'code="429"'):
        assert any(code in e for e in exprs), code

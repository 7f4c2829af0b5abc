#!/usr/bin/env python3
"""Checks the chart's Grafana dashboard and PrometheusRule against the metrics the code exports.

    monitoring.py DIR        (DIR: what render_all.py wrote)

The exported names are read from the code, never from a list kept here: the filter's Envoy stats
from the string literals of filter/src/metrics.rs ("hevlayer.x.y" becomes the Prometheus name
hevlayer_x_y: Envoy's /stats/prometheus strips its custom "wasmcustom." namespace and adds no
"envoy_" prefix to it; envoy_check.py confirms that on a running Envoy), the sidecar's from the
"# TYPE" lines of sidecar/src/metrics.rs (a histogram adds _bucket, _sum and _count). Every metric
an expression names must be one of them, every function a PromQL function, brackets must balance,
and the dashboard must be well-formed JSON with the panels an operator needs.
"""

import json
import os
import re
import sys

from manifests import ROOT, value_sets


def read(path):
    with open(os.path.join(ROOT, path)) as f:
        return f.read()


def prometheus_name(envoy_stat):
    """The Prometheus name of a filter stat (its Envoy name without the wasmcustom. namespace)."""
    return re.sub(r"[^a-zA-Z0-9_]", "_", envoy_stat)


def filter_metrics():
    stats = set(re.findall(r'"(hevlayer\.[a-z0-9_.]+)"', read("filter/src/metrics.rs")))
    return {prometheus_name(s) for s in stats}


def sidecar_metrics():
    names = set()
    for name, kind in re.findall(r"# TYPE (hevlayer_sidecar_\w+) (\w+)", read("sidecar/src/metrics.rs")):
        names |= {name + s for s in ("_bucket", "_sum", "_count")} if kind == "histogram" else {name}
    return names


FILTER = filter_metrics()
SIDECAR = sidecar_metrics()
EXPORTED = FILTER | SIDECAR
# A parser that stopped finding names would make every check pass: fail loudly instead.
if len(FILTER) < 40 or len(SIDECAR) < 8:
    sys.exit(f"monitoring.py: found {len(FILTER)} filter and {len(SIDECAR)} sidecar metrics; the parsing is broken")

FUNCTIONS = {
    "abs", "absent", "absent_over_time", "avg_over_time", "ceil", "changes", "clamp", "clamp_max", "clamp_min",
    "count_over_time", "day_of_month", "day_of_week", "delta", "deriv", "exp", "floor", "histogram_quantile",
    "idelta", "increase", "irate", "label_replace", "label_join", "last_over_time", "ln", "log2", "log10",
    "max_over_time", "min_over_time", "predict_linear", "quantile_over_time", "rate", "resets", "round",
    "scalar", "sort", "sort_desc", "sqrt", "stddev_over_time", "sum_over_time", "time", "timestamp", "vector",
}
AGGREGATIONS = {"sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk", "quantile",
                "count_values", "group"}
KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left", "group_right"}
GRAFANA_VARIABLES = re.compile(r"\$__rate_interval|\$__interval|\$__range")


def promql_problems(expr):
    """What is wrong with one expression: unbalanced brackets, unknown functions or metrics."""
    problems = []
    text = GRAFANA_VARIABLES.sub("5m", expr)
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', text)  # label values may hold anything
    stack, pairs = [], {")": "(", "]": "[", "}": "{"}
    for c in text:
        if c in "([{":
            stack.append(c)
        elif c in pairs and (not stack or stack.pop() != pairs[c]):
            return [f"unbalanced {c!r} in {expr!r}"]
    if stack:
        return [f"unclosed {stack[-1]!r} in {expr!r}"]
    text = re.sub(r"\{[^{}]*\}", "", text)                                        # label matchers
    text = re.sub(r"\[[^\[\]]*\]", "", text)                                      # ranges
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", " ", text)  # label lists
    text = re.sub(r"\b\d+(\.\d+)?(e-?\d+)?\b", " ", text)                        # numbers
    metrics = 0
    for found in re.finditer(r"[A-Za-z_][A-Za-z0-9_:]*", text):
        name = found.group(0)
        called = text[found.end():].lstrip().startswith("(")
        if called:
            if name not in FUNCTIONS | AGGREGATIONS:
                problems.append(f"unknown function {name}() in {expr!r}")
        elif name in KEYWORDS:
            continue
        elif name in EXPORTED:
            metrics += 1
        else:
            problems.append(f"metric {name} is exported by neither filter/src/metrics.rs nor sidecar/src/metrics.rs")
    if metrics == 0:
        problems.append(f"no metric in {expr!r}")
    return problems


def self_test():
    """The checker must refuse what it is meant to refuse."""
    good = 'sum by (pod) (rate(hevlayer_mirror_ok[5m])) / clamp_min(max(hevlayer_sidecar_cache_connected{a="("}), 1)'
    bad = {
        "sum(rate(hevlayer_mirror_ok[5m])": "unclosed",
        "sum(rate(hevlayer_mirror_ok[5m)))": "unbalanced",
        "sum(rat(hevlayer_mirror_ok[5m]))": "unknown function",
        "sum(rate(envoy_wasmcustom_hevlayer_mirror_ok[5m]))": "exported by neither",
        "vector(1)": "no metric",
    }
    assert promql_problems(good) == [], promql_problems(good)
    for expr, expected in bad.items():
        found = promql_problems(expr)
        assert found and expected in found[0], (expr, found)


NEEDED_PANELS = {
    "writes accepted and rejected": {"hevlayer_writes_accepted", "hevlayer_writes_rejected_shape"},
    "upstream 502/504": {"hevlayer_upstream_error", "hevlayer_gateway_timeout"},
    "mirror outcomes": {"hevlayer_mirror_ok", "hevlayer_mirror_failed", "hevlayer_mirror_timeout"},
    "evictions pending": {"hevlayer_evictions_pending"},
    "evictions ahead and their grouping": {"hevlayer_evict_ahead_failed", "hevlayer_evict_ahead_grouped",
                                           "hevlayer_eviction_groups", "hevlayer_mirror_rode"},
    "cache hit ratio": {"hevlayer_sidecar_mirror_total"},
    "pipeline stages": {"hevlayer_sidecar_pipeline_documents"},
    "sidecar latency": {"hevlayer_sidecar_cache_op_seconds_bucket"},
}
NEEDED_ALERTS = {"HevlayerMirrorFailures", "HevlayerCacheUnavailable", "HevlayerEvictionsPending",
                 "HevlayerPipelineLeasesExpiring"}


def check_dashboard(text, problems):
    dashboard = json.loads(text)  # well-formed, or this raises
    panels = dashboard["panels"]
    ids = [p["id"] for p in panels]
    if len(set(ids)) != len(ids):
        problems.append("dashboard panel ids repeat")
    exprs = []
    for p in panels:
        if not p.get("title") or not p.get("targets"):
            problems.append(f"panel {p.get('id')} lacks a title or targets")
        exprs += [t["expr"] for t in p.get("targets", [])]
    for expr in exprs:
        problems += promql_problems(expr)
    used = " ".join(exprs)
    for purpose, metrics in NEEDED_PANELS.items():
        missing = [m for m in metrics if not re.search(rf"\b{m}\b", used)]
        if missing:
            problems.append(f"no dashboard panel for {purpose} ({', '.join(missing)})")
    return len(panels), len(exprs)


def check_rules(rule, problems):
    alerts = {}
    for group in rule["spec"]["groups"]:
        for r in group["rules"]:
            alerts[r["alert"]] = r
            problems += promql_problems(r["expr"])
            if not re.fullmatch(r"\d+[smh]", str(r.get("for", ""))):
                problems.append(f"{r['alert']}: 'for' is not a duration")
            if r.get("labels", {}).get("severity") not in ("warning", "critical"):
                problems.append(f"{r['alert']}: severity must be warning or critical")
            if not r.get("annotations", {}).get("summary"):
                problems.append(f"{r['alert']}: no summary")
    missing = NEEDED_ALERTS - set(alerts)
    if missing:
        problems.append(f"alerts missing: {sorted(missing)}")
    return len(alerts)


def main():
    self_test()
    # The dashboard file itself, whether or not a values set turns it on.
    problems = []
    check_dashboard(read("envoy/kubernetes/chart/files/dashboard.json"), problems)
    checked = 0
    for vs in value_sets(sys.argv[1]):
        dashboards = [d for d in vs.objects("ConfigMap") if d["metadata"].get("labels", {}).get("grafana_dashboard") == "1"]
        with open(os.path.join(sys.argv[1], vs.name, "monitoring.json")) as f:
            rules = [d for d in json.load(f) if d["kind"] == "PrometheusRule"]
        if not dashboards and not rules:
            continue
        checked += 1
        summary = []
        for d in dashboards:
            panels, exprs = check_dashboard(next(iter(d["data"].values())), problems)
            summary.append(f"dashboard: {panels} panels, {exprs} queries")
        for rule in rules:
            summary.append(f"PrometheusRule: {check_rules(rule, problems)} alerts")
        if not problems:
            print(f"monitoring {vs.name}: {'; '.join(summary)}; every metric exported by the filter or the sidecar")
    if problems:
        sys.exit("monitoring drift:\n  " + "\n  ".join(problems))
    if checked == 0:
        sys.exit("monitoring.py: no values set turns on the dashboard or the PrometheusRule")
    print(f"monitoring: {len(FILTER)} filter and {len(SIDECAR)} sidecar metric names read from the code; PromQL checker self-test passed")


if __name__ == "__main__":
    main()

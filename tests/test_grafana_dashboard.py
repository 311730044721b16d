"""ops/grafana/tessera.json and ops/prometheus.yml: a loadable dashboard whose queries name only metrics
that something exports.

Known metrics are discovered from the source (``ray.util.metrics`` Counter / Gauge / Histogram definitions
under platform/ and serve_apps/, mapped to the names Ray exports), plus the Serve app's metric contract
and a short allowlist of Ray built-ins, each of which must appear in the dashboards Ray itself ships.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import ray
import yaml
from ray._private import ray_constants

REPO_ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = REPO_ROOT / "ops" / "grafana" / "tessera.json"
PROMETHEUS_YML = REPO_ROOT / "ops" / "prometheus.yml"
SOURCE_DIRS = [REPO_ROOT / "platform", REPO_ROOT / "serve_apps"]

# The Serve app's metrics (its contract with this dashboard): ray.util.metrics kind -> names.
SERVE_METRICS = {
    ("histogram", "tessera_serve_stage_latency_ms"),  # tags: route, stage in {encode, retrieve, rank, total}
    ("counter", "tessera_serve_requests_total"),  # tags: route, status (HTTP code as a string)
    ("counter", "tessera_serve_cold_start_total"),  # tag: route
}
# Ray's own metrics used by the dashboard (exported names, as in Ray's bundled Grafana dashboards).
RAY_BUILTINS = {
    "ray_node_cpu_utilization",
    "ray_node_mem_used",
    "ray_node_mem_total",
    "ray_node_gpus_utilization",
}
# What the dashboard must cover (exported names): the panels issue 7 asks for.
REQUIRED = {
    "ray_tessera_embed_items_total", "ray_tessera_embed_failures_total",
    "ray_tessera_train_loss", "ray_tessera_train_samples_per_second",
    "ray_tessera_serve_stage_latency_ms_bucket", "ray_tessera_serve_requests_total",
    "ray_tessera_serve_cold_start_total", "ray_tessera_index_recall",
    "ray_node_cpu_utilization", "ray_node_mem_used",
}

METRIC_DEF = re.compile(r"\b(Counter|Gauge|Histogram)\(\s*[\"']([a-zA-Z_:][a-zA-Z0-9_:]*)[\"']")
PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool",
                   "and", "or", "unless", "inf", "nan"}


def exported_names(kind: str, name: str) -> set[str]:
    """Prometheus series names Ray exports for a ``ray.util.metrics`` metric: ``ray_`` prefix; counters
    end in ``_total`` (added unless present); histograms as ``_bucket`` / ``_sum`` / ``_count``."""
    base = f"ray_{name}"
    if kind == "counter":
        return {base if base.endswith("_total") else f"{base}_total"}
    if kind == "histogram":
        return {f"{base}_bucket", f"{base}_sum", f"{base}_count"}
    return {base}


def defined_metrics() -> set[tuple[str, str]]:
    """``(kind, name)`` of every Counter/Gauge/Histogram created with a literal name in the source."""
    found = set()
    for folder in SOURCE_DIRS:
        for path in folder.rglob("*.py"):
            for kind, name in METRIC_DEF.findall(path.read_text(encoding="utf-8")):
                found.add((kind.lower(), name))
    return found


def known_metrics() -> set[str]:
    names = set(RAY_BUILTINS)
    for kind, name in defined_metrics() | SERVE_METRICS:
        names |= exported_names(kind, name)
    return names


def promql_metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that are not functions, keywords, label names
    (in ``{...}`` or ``by (...)``), durations or numbers."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    s = re.sub(r"\{[^}]*\}", " ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)
    s = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    names = set()
    for m in re.finditer(r"(?<![\w.$])[A-Za-z_:][A-Za-z0-9_:]*", s):
        if s[m.end():].lstrip().startswith("(") or m.group(0).lower() in PROMQL_KEYWORDS:
            continue
        names.add(m.group(0))
    return names


def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def all_panels(dashboard: dict) -> list[dict]:
    out = []
    for p in dashboard["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))  # panels inside collapsed rows
    return out


def queries(dashboard: dict) -> list[tuple[str, str]]:
    """``(where, PromQL)`` for every panel target and every query variable."""
    out = [(f"panel {p['id']} {p['title']!r}", t["expr"]) for p in all_panels(dashboard) for t in p.get("targets", [])]
    for v in dashboard["templating"]["list"]:
        if v["type"] == "query":
            q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            m = re.fullmatch(r"\s*label_values\(\s*(.+?)\s*,\s*\w+\s*\)\s*", q)
            assert m, f"variable {v['name']}: expected label_values(<metric>, <label>), got {q!r}"
            out.append((f"variable {v['name']}", m.group(1)))
    return out


def unknown_metrics(dashboard: dict) -> dict[str, set[str]]:
    known = known_metrics()
    bad = {}
    for where, expr in queries(dashboard):
        missing = promql_metric_names(expr) - known
        if missing:
            bad[where] = missing
    return bad


# --- the helpers themselves -----------------------------------------------------------------------------


def test_promql_metric_names():
    expr = ('histogram_quantile(0.95, sum by (le, route) (rate(ray_a_bucket{route=~"$route", x="y{z}"}'
            '[$__rate_interval]))) / on (route) group_left sum(ray_b_total offset 5m) > bool 1e3')
    assert promql_metric_names(expr) == {"ray_a_bucket", "ray_b_total"}
    assert promql_metric_names("max by (stage) (ray_c) or vector(0)") == {"ray_c"}


def test_source_discovery_finds_the_embed_metrics():
    defined = defined_metrics()
    assert ("counter", "tessera_embed_items_total") in defined
    assert ("histogram", "tessera_embed_batch_seconds") in defined
    assert exported_names("counter", "tessera_embed_items_total") == {"ray_tessera_embed_items_total"}
    assert exported_names("counter", "serve_num_http_requests") == {"ray_serve_num_http_requests_total"}


def test_ray_builtins_exist_in_the_installed_ray():
    shipped = "".join(p.read_text() for p in
                      (Path(ray.__file__).parent / "dashboard" / "modules" / "metrics" / "dashboards").glob("*.py"))
    assert {name for name in RAY_BUILTINS if not re.search(rf"\b{name}\b", shipped)} == set()


# --- the dashboard ----------------------------------------------------------------------------------------


def test_dashboard_structure():
    d = load_dashboard()
    assert d["title"] and d["uid"] and isinstance(d["schemaVersion"], int)
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"

    panels = all_panels(d)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    graphs = [p for p in panels if p["type"] != "row"]
    assert len(graphs) >= 10
    for p in graphs:
        where = f"panel {p['id']} {p['title']!r}"
        assert p["title"] and p["targets"], where
        assert p["datasource"]["uid"] == "${datasource}", f"{where}: not on the templated datasource"
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), where
        for t in p["targets"]:
            assert t["expr"].strip() and t.get("datasource", p["datasource"])["uid"] == "${datasource}", where
            assert t["expr"].count("(") == t["expr"].count(")"), f"{where}: unbalanced parentheses"
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, where


def test_dashboard_covers_each_area():
    used = set().union(*(promql_metric_names(expr) for _, expr in queries(load_dashboard())))
    assert REQUIRED - used == set()
    exprs = " ".join(expr for _, expr in queries(load_dashboard()))
    for q in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({q}, sum by (le, route) (rate(ray_tessera_serve_stage_latency_ms_bucket" in exprs
    for stage in ("encode", "retrieve", "rank", "total"):
        assert f'stage="{stage}"' in exprs


def test_dashboard_names_only_known_metrics():
    assert unknown_metrics(load_dashboard()) == {}


def test_unknown_metric_is_caught():
    d = copy.deepcopy(load_dashboard())
    panel = next(p for p in all_panels(d) if p["type"] != "row")
    panel["targets"][0]["expr"] = "sum(rate(ray_tessera_embed_itemz_total[5m]))"  # a typo
    assert list(unknown_metrics(d).values()) == [{"ray_tessera_embed_itemz_total"}]


@pytest.mark.parametrize("bare", ["ray_tessera_embed_items_total_total", "tessera_embed_items_total",
                                  "ray_tessera_train_loss_total", "ray_tessera_embed_batch_seconds"])
def test_names_ray_does_not_export_are_unknown(bare):
    assert bare not in known_metrics()


# --- prometheus.yml -----------------------------------------------------------------------------------------


def test_prometheus_scrapes_rays_service_discovery_file():
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    files = [f for job in config["scrape_configs"] for sd in job.get("file_sd_configs", []) for f in sd["files"]]
    assert any(f.startswith("/tmp/ray/") and f.endswith("/prom_metrics_service_discovery.json") for f in files)
    assert ray_constants.PROMETHEUS_SERVICE_DISCOVERY_FILE == "prom_metrics_service_discovery.json"

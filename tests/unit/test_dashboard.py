"""deploy/grafana/epserve-dashboard.json against a real /metrics: every metric a panel queries is exported by the
server (the REAL engine at world size 1 on the bundled default model), the dashboard has the panels it promises,
and the exposition follows Prometheus' naming conventions (counters ``_total``, ``_seconds``, ``_bytes``)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from epserve.server import ServerConfig
from tests.unit._live_server import MODEL_DIR, LiveServer, make_engine, wait_for

pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "epserve-dashboard.json"
DS = "${DS_PROMETHEUS}"
# What the server exposes (family name as on its # TYPE line -> type); prometheus-client adds the *_created gauges.
EXPOSED = {
    "epserve_requests_total": "counter", "epserve_prompt_tokens_total": "counter",
    "epserve_generation_tokens_total": "counter", "epserve_time_to_first_token_seconds": "histogram",
    "epserve_time_per_output_token_seconds": "histogram", "epserve_engine_healthy": "gauge",
    "epserve_queue_waiting_requests": "gauge", "epserve_running_batch_sequences": "gauge",
    "epserve_kv_used_tokens": "gauge", "epserve_kv_capacity_tokens": "gauge", "epserve_world_size": "gauge",
    "epserve_engine_steps_total": "counter", "epserve_engine_prompt_tokens_total": "counter",
    "epserve_engine_generation_tokens_total": "counter", "epserve_a2a_calls_total": "counter",
    "epserve_a2a_bytes_total": "counter", "epserve_transfers_total": "counter",
    "epserve_kv_coherence_bytes_total": "counter", "epserve_cross_node_bytes_total": "counter",
    "epserve_activations_total": "counter", "epserve_local_activations_total": "counter",
    "epserve_local_activation_ratio": "gauge", "epserve_expert_load_imbalance_ratio": "gauge",
    "epserve_gpu_activations_total": "counter", "epserve_placement_version": "gauge",
    "epserve_placement_changed_timestamp_seconds": "gauge", "epserve_placement_swap_in_progress": "gauge",
    "epserve_placement_last_swap_longest_step_seconds": "gauge", "epserve_placement_swaps_total": "counter",
}
PANELS = [
    "Engine health", "EP world size", "Engine steps per second", "Request rate by endpoint and status",
    "Time to first token", "Time per output token", "Token throughput", "Queue depth and running batch",
    "KV cache use vs capacity", "All-to-all bytes rate per MoE layer", "Transfers rate per MoE layer",
    "Local activation rate (LAR) per MoE layer", "Expert-load imbalance per MoE layer",
    "Expert load per GPU and MoE layer", "K/V coherence bytes rate per MoE layer",
    "Cross-node bytes rate per MoE layer", "Placement version", "Placement swaps", "Placement swap in progress",
    "Placement changed", "Last swap's longest step", "Placement version and swaps",
]
_NOT_METRICS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "and", "or",
                "unless", "inf", "nan"}
_NAME = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)")


def promql_metric_names(expr: str) -> set[str]:
    """Metric names an expression selects: its identifiers, less strings, label matchers, ranges, label lists,
    functions, keywords and numbers."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    s = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", s)
    s = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    names = set()
    for m in re.finditer(r"(?<![\w.$])[A-Za-z_:][A-Za-z0-9_:]*", s):
        if not s[m.end():].lstrip().startswith("(") and m.group().lower() not in _NOT_METRICS:
            names.add(m.group())
    return names


def families(text: str) -> dict[str, tuple[str, set[str]]]:
    """Exposition text -> {family name on its # TYPE line: (type, the names of its samples)}."""
    out, current = {}, None
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, current, kind = line.split(" ")
            out[current] = (kind, set())
        elif line and not line.startswith("#"):
            out[current][1].add(_NAME.match(line).group(1))
    return out


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


@pytest.fixture(scope="module")
def scraped() -> str:
    """One real /metrics after one completion (so the histograms and per-layer series have samples)."""
    engine = make_engine()
    server = LiveServer(engine, ServerConfig(model_dir=MODEL_DIR))
    try:
        with server.client() as c:
            body = {"model": "default_model", "prompt": "def ", "max_tokens": 4, "temperature": 0}
            assert c.post("/v1/completions", json=body).status_code == 200
            last_layer = 'epserve_gpu_activations_total{gpu="0",moe_layer="5"}'
            yield wait_for(lambda: (lambda t: t if last_layer in t else None)(c.get("/metrics").text),
                           "per-layer series in /metrics")
    finally:
        server.stop()
        engine.shutdown()


def _panels(dashboard: dict) -> list[dict]:
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def _exprs(dashboard: dict) -> dict[str, list[str]]:
    return {p["title"]: [t["expr"] for t in p["targets"]] for p in _panels(dashboard)}


def test_promql_metric_names_skips_functions_labels_and_numbers():
    expr = ('sum by (moe_layer, gpu) (rate(a_total{gpu=~"$g", x="y(z)"}[$__rate_interval])) / ignoring (gpu) '
            'group_left sum by (moe_layer) (rate(b_total[5m])) * 1e3 + histogram_quantile(0.99, sum by (le) '
            '(rate(c_seconds_bucket[1m]))) and on (instance) d offset 5m')
    assert promql_metric_names(expr) == {"a_total", "b_total", "c_seconds_bucket", "d"}


def test_dashboard_has_the_promised_panels_on_the_prometheus_input(dashboard):
    assert [p["title"] for p in _panels(dashboard)] == PANELS
    assert [p["title"] for p in dashboard["panels"] if p["type"] == "row"] == [
        "Serving", "MoE traffic (per MoE layer)", "Placement"]
    assert [(i["name"], i["type"], i["pluginId"]) for i in dashboard["__inputs"]] == [
        ("DS_PROMETHEUS", "datasource", "prometheus")]
    assert dashboard["schemaVersion"] >= 38 and dashboard["uid"] == "epserve-overview"
    for p in _panels(dashboard):
        assert p["datasource"]["uid"] == DS and all(t["datasource"]["uid"] == DS for t in p["targets"]), p["title"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    assert [v["name"] for v in dashboard["templating"]["list"]] == ["instance", "moe_layer"]


def test_panels_query_the_expected_series_and_labels(dashboard):
    exprs = _exprs(dashboard)
    for title in ("Time to first token", "Time per output token"):
        assert [re.match(r"histogram_quantile\(([\d.]+), sum by \(le\) \(rate\((\w+)_bucket", e).group(1)
                for e in exprs[title]] == ["0.5", "0.9", "0.99"]
    assert "sum by (endpoint, status)" in exprs["Request rate by endpoint and status"][0]
    for title in ("All-to-all bytes rate per MoE layer", "Transfers rate per MoE layer",
                  "K/V coherence bytes rate per MoE layer", "Cross-node bytes rate per MoE layer"):
        assert exprs[title][0].startswith("sum by (moe_layer) (rate(epserve_"), title
    heat = next(p for p in _panels(dashboard) if p["title"] == "Expert load per GPU and MoE layer")
    assert heat["type"] == "heatmap" and "sum by (moe_layer, gpu)" in heat["targets"][0]["expr"]
    assert promql_metric_names(heat["targets"][0]["expr"]) == {"epserve_gpu_activations_total"}
    used = {n for es in exprs.values() for e in es for n in promql_metric_names(e)}
    assert {n for n in used if n.startswith("epserve_placement_")} == {
        "epserve_placement_version", "epserve_placement_swaps_total", "epserve_placement_swap_in_progress",
        "epserve_placement_changed_timestamp_seconds", "epserve_placement_last_swap_longest_step_seconds"}


def test_every_metric_a_panel_queries_is_exported(dashboard, scraped):
    fams = families(scraped)
    histograms = {name for name, (kind, _) in fams.items() if kind == "histogram"}
    exported = {n for _, names in fams.values() for n in names} | set(fams)
    for title, exprs in _exprs(dashboard).items():
        for expr in exprs:
            for name in promql_metric_names(expr):
                base = re.sub(r"_(bucket|sum|count)$", "", name)
                assert (base if base in histograms else name) in exported, (title, name)
    used = {re.sub(r"_(bucket|sum|count)$", "", n) for es in _exprs(dashboard).values() for e in es
            for n in promql_metric_names(e)}
    assert set(EXPOSED) - used == {"epserve_a2a_calls_total", "epserve_activations_total",
                                   "epserve_local_activations_total", "epserve_engine_prompt_tokens_total",
                                   "epserve_engine_generation_tokens_total"}
    assert 'epserve_gpu_activations_total{gpu="0",moe_layer="5"}' in scraped


def test_exposition_follows_prometheus_naming(scraped):
    fams = families(scraped)
    created = {n for n, (kind, _) in fams.items() if n.endswith("_created") and kind == "gauge"}
    assert {n: kind for n, (kind, _) in fams.items() if n not in created} == EXPOSED
    for name, (kind, samples) in fams.items():
        if kind == "counter":
            assert name.endswith("_total") and samples == {name}, name
        if kind == "gauge":
            assert not name.endswith("_total"), name
        if kind == "histogram":
            assert samples == {f"{name}_bucket", f"{name}_sum", f"{name}_count"}, name
    # prometheus-client's own *_created gauges (OpenMetrics' creation timestamps) are left out of the unit rules
    names = {n for n, (_, s) in fams.items() if n not in created for n in {n} | s}
    for name in names:
        base = re.sub(r"_(total|bucket|sum|count)$", "", name)
        assert not re.search(r"_(ms|millis\w*|micro\w*|minutes?|hours?|kb|mb|gb|kib|mib|gib|percent|rate)$",
                             base), name
        if re.search(r"time|latency|duration|timestamp|_seconds", base):
            assert base.endswith("_seconds"), name
        if "byte" in base:
            assert base.endswith("_bytes"), name

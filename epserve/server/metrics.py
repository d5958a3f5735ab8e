"""Prometheus metrics of one app, in a registry the app owns (never prometheus-client's global default).

    server events (request done, tokens in/out, first token, last token) --> counters / histograms
    scrape --> EngineCollector reads engine.snapshot() --> queue depth, running batch, KV, per-MoE-layer
               all-to-all calls and bytes, transfers, K/V copy bytes, LAR, expert-load imbalance, per-GPU load
           --> and engine.placement_status() --> placement version, when it changed, swaps, swap in progress,
               the last swap's longest step

Names start with ``epserve_`` and follow Prometheus' conventions: base units (``_seconds``, ``_bytes``), ``_ratio``
for ratios, counters exposed with ``_total`` (prometheus-client appends it to the names below). Per-layer series
carry a ``moe_layer`` label, per-GPU ones a ``gpu`` label too.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from epserve.engine.api import EngineClient
from epserve.server.streaming import Timing

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class EngineCollector:
    """Engine figures read at scrape time from ``engine.snapshot()``."""

    def __init__(self, engine: EngineClient) -> None:
        self._engine = engine

    def collect(self):
        healthy = GaugeMetricFamily("epserve_engine_healthy", "1 when the engine is healthy")
        healthy.add_metric([], 1.0 if self._engine.health().ok else 0.0)
        yield healthy
        try:
            snap = self._engine.snapshot()
        except Exception:   # a dead engine must not break /metrics; epserve_engine_healthy says it
            return
        for name, doc, value in (("epserve_queue_waiting_requests", "requests waiting to be admitted", snap.waiting),
                                 ("epserve_running_batch_sequences", "sequences in the running batch", snap.running),
                                 ("epserve_kv_used_tokens", "KV cache tokens in use (busiest rank)",
                                  snap.kv_used_tokens),
                                 ("epserve_kv_capacity_tokens", "KV cache capacity per rank (tokens)",
                                  snap.kv_capacity_tokens),
                                 ("epserve_world_size", "ranks in the EP group", snap.world_size)):
            g = GaugeMetricFamily(name, doc)
            g.add_metric([], float(value))
            yield g
        for name, doc, value in (("epserve_engine_steps", "engine steps executed", snap.steps),
                                 ("epserve_engine_prompt_tokens", "prompt tokens the engine prefilled",
                                  snap.prompt_tokens),
                                 ("epserve_engine_generation_tokens", "tokens the engine generated",
                                  snap.generation_tokens)):
            c = CounterMetricFamily(name, doc)
            c.add_metric([], float(value))
            yield c
        yield from _layer_families(snap)
        yield from _placement_families(self._engine.placement_status())


def _placement_families(status: dict):
    last = status.get("last_swap") or {}
    for name, doc, value in (
            ("epserve_placement_version", "version of the expert placement in use (1 at start, +1 per swap)",
             status["version"]),
            ("epserve_placement_changed_timestamp_seconds", "unix time the placement in use was swapped in "
                                                            "(or the server started)", status["changed_at"]),
            ("epserve_placement_swap_in_progress", "1 while a placement is being solved or swapped in",
             0.0 if status["state"] == "idle" else 1.0),
            ("epserve_placement_last_swap_longest_step_seconds", "the longest engine step of the last swap "
                                                                 "(0 before the first)",
             last.get("longest_step_s", 0.0))):
        g = GaugeMetricFamily(name, doc)
        g.add_metric([], float(value))
        yield g
    c = CounterMetricFamily("epserve_placement_swaps", "placements swapped in while serving")
    c.add_metric([], float(status["swaps"]))
    yield c


def _layer_families(snap):
    counters = {
        "epserve_a2a_calls": ("all-to-all calls per MoE layer (per rank)", lambda t: t.a2a_calls),
        "epserve_a2a_bytes": ("bytes sent by all ranks in all-to-alls per MoE layer", lambda t: t.a2a_bytes),
        "epserve_transfers": ("hidden-state vectors sent between ranks per MoE layer", lambda t: t.transfers),
        "epserve_kv_coherence_bytes": ("bytes of K/V copies sent by all ranks for the attention layers up to "
                                       "each MoE layer (coherent strategies)", lambda t: t.kv_bytes),
        "epserve_cross_node_bytes": ("all-to-all and K/V bytes that crossed between nodes per MoE layer",
                                     lambda t: t.cross_node_bytes),
        "epserve_activations": ("router (token, expert) choices per MoE layer", lambda t: t.activations),
        "epserve_local_activations": ("activations whose expert was on the token's rank",
                                      lambda t: t.local_activations),
    }
    gauges = {
        "epserve_local_activation_ratio": ("LAR: local activations / activations per MoE layer (0..1)",
                                           lambda t: t.lar),
        "epserve_expert_load_imbalance_ratio": ("max / mean expert load per MoE layer (1 = balanced)",
                                                lambda t: t.imbalance),
    }
    for name, (doc, get) in counters.items():
        fam = CounterMetricFamily(name, doc, labels=["moe_layer"])
        for t in snap.layers:
            fam.add_metric([str(t.moe_layer)], float(get(t)))
        yield fam
    for name, (doc, get) in gauges.items():
        fam = GaugeMetricFamily(name, doc, labels=["moe_layer"])
        for t in snap.layers:
            fam.add_metric([str(t.moe_layer)], float(get(t)))
        yield fam
    load = CounterMetricFamily("epserve_gpu_activations", "activations served per GPU per MoE layer",
                               labels=["moe_layer", "gpu"])
    for layer, row in enumerate(snap.gpu_load):
        for gpu, value in enumerate(row):
            load.add_metric([str(layer), str(gpu)], float(value))
    yield load


class ServerMetrics:
    """The app's registry: request counts, token counts, latency histograms, and the engine collector."""

    def __init__(self, engine: EngineClient) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("epserve_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=self.registry)
        self.prompt_tokens = Counter("epserve_prompt_tokens", "prompt tokens submitted", registry=self.registry)
        self.generation_tokens = Counter("epserve_generation_tokens", "tokens generated and received",
                                         registry=self.registry)
        self.ttft = Histogram("epserve_time_to_first_token_seconds", "request arrival to its first token",
                              buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.tpot = Histogram("epserve_time_per_output_token_seconds",
                              "mean time between output tokens of one request (after the first)",
                              buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(EngineCollector(engine))

    def observe_request(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()

    def observe_finish(self, timing: Timing) -> None:
        if timing.first_token is None:
            return
        self.ttft.observe(timing.first_token - timing.arrived)
        if timing.tokens > 1 and timing.last_token is not None:
            self.tpot.observe((timing.last_token - timing.first_token) / (timing.tokens - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)

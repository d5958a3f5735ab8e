"""CommCounters measured on real ranks equal the placement simulator replaying the recorded routing: per MoE
layer, dispatch and combine transfers, their cross-node parts (4 ranks run as 2 nodes x 2), KV-entry copies,
and data all-to-all calls (coherent with top-1 routing: exactly one per MoE layer on decode steps).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from comm.counters import CollKind, CommCounters
from epserve.model.config import ModelConfig
from placement.cluster import ClusterShape
from placement.placement import contiguous_placement
from placement.predictor import SpeculativePredictor
from placement.simulate import SimOptions, Strategy, simulate
from tests.dist._grid import GPUS_PER_NODE


@pytest.mark.dist
@pytest.mark.parametrize("G", [2, 4])
def test_counters_equal_the_simulator_on_the_recorded_routing(dist_grid, G):
    grid, per_rank = dist_grid(G)
    checked = speculative = moved = anchored = anchor_moved = 0
    for i, case in enumerate(grid.runner):
        if not case.record or case.stagger or case.prefill_chunk:
            continue
        cfg = ModelConfig.from_dir(case.ckpt)
        cluster = ClusterShape(nodes=G // GPUS_PER_NODE[G], gpus_per_node=GPUS_PER_NODE[G])
        placement = case.placement or contiguous_placement(cfg.num_moe_layers, cfg.num_experts, cluster)
        placement = dataclasses.replace(placement, cluster=cluster)   # keeps its anchor table
        res0 = per_rank[0]["runner"][i]
        predictor = None if case.predictor_path is None else SpeculativePredictor.load(case.predictor_path)
        sim = simulate(res0["trace"], placement, case.strategy, prefill_T=res0["is_prefill"], predictor=predictor,
                       options=SimOptions(attention_layers=cfg.num_layers))
        c = CommCounters.merged([CommCounters.from_rows(per_rank[r]["runner"][i]["counters"]) for r in range(G)])
        steps = res0["steps"]                        # step 0 prefills every prompt; the others are decode steps
        for m in range(cfg.num_moe_layers):
            dispatch = c.total(CollKind.ALL_TO_ALL, phase="dispatch", layer=m)
            combine = c.total(CollKind.ALL_TO_ALL, phase="combine", layer=m)
            assert (dispatch.rows, combine.rows) == (sim.dispatch_L[m], sim.combine_L[m]), f"{case.name} layer {m}"
            assert (dispatch.cross_node_rows, combine.cross_node_rows) == \
                (sim.cross_node_dispatch_L[m], sim.cross_node_combine_L[m]), f"{case.name} layer {m}"
            assert dispatch.calls + combine.calls == 2 + (steps - 1) * sim.a2a_calls_per_layer, case.name
            if case.strategy.coherent and cfg.top_k == 1:
                assert combine.calls == 1 and dispatch.calls == steps   # the prefill step's combine only
        assert c.total(CollKind.KV_COHERENCE).rows == sim.kv_entry_copies, case.name
        checked += 1
        if case.strategy.needs_predictor:   # the prediction must really have moved tokens somewhere
            plain = Strategy.COHERENT if case.strategy.coherent else Strategy.TWO_A2A
            base = simulate(res0["trace"], placement, plain, prefill_T=res0["is_prefill"])
            speculative += 1
            moved += not np.array_equal(base.dispatch_L, sim.dispatch_L)
        if placement.anchors is not None:   # the table must really have moved sums away from the top-1 rank
            base = simulate(res0["trace"], placement.with_anchors(None), case.strategy, prefill_T=res0["is_prefill"])
            anchored += 1
            anchor_moved += not (np.array_equal(base.dispatch_L, sim.dispatch_L) and
                                 np.array_equal(base.local_activations_L, sim.local_activations_L))
    assert checked >= 16 and speculative >= 4 and moved >= 2 and anchored == 2 and anchor_moved >= 1

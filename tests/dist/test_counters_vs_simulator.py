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
from placement.transport import Transport
from tests.dist._grid import GPUS_PER_NODE


@pytest.mark.dist
@pytest.mark.parametrize("G", [2, 4])
def test_counters_equal_the_simulator_on_the_recorded_routing(dist_grid, G):
    grid, per_rank = dist_grid(G)
    checked = speculative = moved = anchored = anchor_moved = replicated = replica_used = 0
    for i, case in enumerate(grid.runner):
        if not case.record or case.stagger or case.prefill_chunk or per_rank[0]["runner"][i]["retried_steps"]:
            continue   # (a step run again after a fixed buffer overflowed moves its rows twice: real, not modelled)
        cfg = ModelConfig.from_dir(case.ckpt)
        cluster = ClusterShape(nodes=G // GPUS_PER_NODE[G], gpus_per_node=GPUS_PER_NODE[G])
        placement = case.placement or contiguous_placement(cfg.num_moe_layers, cfg.num_experts, cluster)
        placement = dataclasses.replace(placement, cluster=cluster)   # keeps its anchor table
        res0 = per_rank[0]["runner"][i]
        predictor = None if case.predictor_path is None else SpeculativePredictor.load(case.predictor_path)
        sim = simulate(res0["trace"], placement, case.strategy, prefill_T=res0["is_prefill"], predictor=predictor,
                       options=SimOptions(attention_layers=cfg.num_layers), transport=case.transport)
        c = CommCounters.merged([CommCounters.from_rows(per_rank[r]["runner"][i]["counters"]) for r in range(G)])
        steps = res0["steps"]                        # step 0 prefills every prompt; the others are decode steps
        stages = 2 if case.transport is Transport.NODE_AWARE else 1
        for m in range(cfg.num_moe_layers):
            for phase in sim.phases:   # every phase of the transport, rows and their cross-node part
                got = c.total(CollKind.ALL_TO_ALL, phase=phase, layer=m)
                assert (got.rows, got.cross_node_rows) == \
                    (sim.phase_transfers_L(phase)[m], sim.phase_cross_node_L(phase)[m]), f"{case.name} {phase} {m}"
            dispatch = c.total(CollKind.ALL_TO_ALL, phase="dispatch", layer=m)
            combine = c.total(CollKind.ALL_TO_ALL, phase="combine", layer=m)
            assert c.total(CollKind.ALL_TO_ALL, layer=m).rows == sim.dispatch_L[m] + sim.combine_L[m], case.name
            calls = c.total(CollKind.ALL_TO_ALL, layer=m).calls
            assert calls == 2 * stages + (steps - 1) * sim.a2a_calls_per_layer, case.name
            assert c.total(CollKind.A2A_SPLITS, layer=m).calls == steps * sim.counts_exchanges_per_layer, case.name
            if case.strategy.coherent and cfg.top_k == 1:
                assert combine.calls == 1 and dispatch.calls == steps   # the prefill step's combine only
        assert c.total(CollKind.KV_COHERENCE).rows == sim.kv_entry_copies, case.name
        assert c.total(CollKind.KV_COHERENCE).cross_node_rows == sim.kv_cross_node_copies, case.name
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
        if placement.has_replicas:   # the replicas must really have been used: activations off the primary copy
            experts_TLK = res0["trace"].experts_TLK.astype(np.int64)
            L_, G_ = placement.num_layers, placement.num_gpus
            primary_TLK = placement.expert_to_gpu_LE[np.arange(L_)[None, :, None], experts_TLK]
            layer_TLK = np.broadcast_to(np.arange(L_)[None, :, None], experts_TLK.shape)
            primary_LG = np.bincount((layer_TLK * G_ + primary_TLK).ravel(), minlength=L_ * G_).reshape(L_, G_)
            replicated += 1
            replica_used += int(not np.array_equal(sim.load_LG, primary_LG))
    assert checked >= 16 and speculative >= 4 and moved >= 2 and anchored == 3 and anchor_moved >= 1
    assert replicated >= 8 and replica_used == replicated
    assert {case.transport for i, case in enumerate(grid.runner)
            if case.record and not per_rank[0]["runner"][i]["retried_steps"]} >= \
        ({Transport.A2A, Transport.FIXED, Transport.NODE_AWARE} if G == 4 else {Transport.A2A, Transport.FIXED})

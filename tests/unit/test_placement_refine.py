"""The exact swap refinement (placement/refine.py): its transfer count equals the simulator's, its swap deltas
equal brute force, and it never makes the fit transfers worse."""

from __future__ import annotations

import numpy as np
import pytest

from placement import ClusterShape, Placement, RoutingTrace
from placement.anchor import fit_anchor_table
from placement.refine import _Routing, coherent_transfers, refine_placement
from placement.simulate import Strategy, simulate


def _random_case(seed: int, *, T=150, L=3, E=8, G=4, K=3, seqs=True):
    g = np.random.default_rng(seed)
    experts_TLK = np.stack([[g.permutation(E)[:K] for _ in range(L)] for _ in range(T)]).astype(np.int16)
    weights = np.full(experts_TLK.shape, 1.0 / K, dtype=np.float32)
    seq_T = g.integers(0, 12, size=T).astype(np.int32) if seqs else None
    pos_T = None
    if seqs:   # positions in order of appearance within each sequence, with a few gaps (unchained tokens)
        pos_T = np.zeros(T, dtype=np.int32)
        for s in range(12):
            rows = np.flatnonzero(seq_T == s)
            pos_T[rows] = np.cumsum(1 + (g.random(len(rows)) < 0.2)) - 1
    trace = RoutingTrace(experts_TLK, weights, E, None, seq_T, pos_T)
    p_LE = np.stack([g.permutation(np.arange(E) // (E // G)) for _ in range(L)])
    return trace, Placement(p_LE, ClusterShape(gpus_per_node=G))


@pytest.mark.parametrize("seqs", [True, False])
def test_transfer_count_equals_the_simulator(seqs):
    trace, placement = _random_case(1, seqs=seqs)
    assert coherent_transfers(trace, placement.expert_to_gpu_LE, 4) == \
        simulate(trace, placement, Strategy.COHERENT).transfers


@pytest.mark.parametrize("seed", [2, 3])
@pytest.mark.parametrize("lead", ["top1", "other"])
def test_swap_deltas_equal_brute_force(seed, lead):
    trace, placement = _random_case(seed)
    lead_TL = None
    if lead == "other":   # any expert of the token may lead (the anchor table's choice): here a random one
        slot_TL = np.random.default_rng(seed).integers(0, 3, size=trace.experts_TLK.shape[:2])
        lead_TL = np.take_along_axis(trace.experts_TLK.astype(np.int64), slot_TL[..., None], axis=2)[..., 0]
    r = _Routing(trace, 4, lead_TL)
    p_LE = placement.expert_to_gpu_LE
    base = coherent_transfers(trace, p_LE, 4, lead_TL)
    for l in range(3):
        delta_EE = r.swap_deltas(p_LE, l)
        for i in range(8):
            for j in range(8):
                q_LE = p_LE.copy()
                q_LE[l, i], q_LE[l, j] = p_LE[l, j], p_LE[l, i]
                assert delta_EE[i, j] == coherent_transfers(trace, q_LE, 4, lead_TL) - base, (l, i, j)


def test_refinement_lowers_fit_transfers_and_keeps_capacity():
    trace, placement = _random_case(4, T=400)
    refined = refine_placement(trace, placement, anchored=False)
    info = refined.solver["refine"]
    assert info["fit_transfers_before"] == simulate(trace, placement, Strategy.COHERENT).transfers
    assert info["fit_transfers_after"] == simulate(trace, refined, Strategy.COHERENT).transfers
    assert info["fit_transfers_after"] < info["fit_transfers_before"] and info["swaps"] > 0
    # a local optimum: no single swap saves a transfer any more
    r = _Routing(trace, 4)
    assert all(r.swap_deltas(refined.expert_to_gpu_LE, l).min() > -0.5 for l in range(3))
    anchored = refine_placement(trace, placement, anchored=True)
    info = anchored.solver["refine"]
    assert info["anchored"] and anchored.anchors is None
    for name, p in (("before", placement), ("after", anchored)):   # a table fitted to each, as simulate applies it
        table = fit_anchor_table(trace, p.expert_to_gpu_LE, 4)
        assert info[f"fit_transfers_with_table_{name}"] == simulate(trace, p.with_anchors(table),
                                                                    Strategy.COHERENT).transfers
    assert info["fit_transfers_with_table_after"] < info["fit_transfers_with_table_before"]

"""Statistics and the solver objective, on traces small enough to count by hand."""

from __future__ import annotations

import numpy as np
import pytest

from placement import ClusterShape, InputError, RoutingTrace
from placement.stats import StatsOptions, compute_stats, objective, objective_upper_bound, saving_GG

# 2 tokens, 2 layers, top-2, 4 experts.
EXPERTS = [[[0, 1], [2, 3]],
           [[0, 2], [2, 1]]]


def _trace():
    experts = np.array(EXPERTS, dtype=np.int16)
    weights = np.broadcast_to(np.float32([0.75, 0.25]), experts.shape).copy()
    return RoutingTrace(experts, weights, 4)


def test_affinity_coactivation_and_load_with_slot_decay():
    st = compute_stats(_trace(), StatsOptions(slot_decay=0.5, coact_weight=2.0))
    A = st.affinity_LEE[0]
    # token 0: (0,2) w1, (0,3) w.5, (1,2) w.5, (1,3) w.25; token 1: (0,2) 1, (0,1) .5, (2,2) .5, (2,1) .25
    assert A[0, 2] == 2.0 and A[0, 3] == 0.5 and A[1, 2] == 0.5 and A[1, 3] == 0.25
    assert A[0, 1] == 0.5 and A[2, 2] == 0.5 and A[2, 1] == 0.25
    assert A.sum() == pytest.approx(2 * (1 + 0.5 + 0.5 + 0.25))
    C0 = st.coact_LEE[0]
    assert C0[0, 1] == C0[1, 0] == 2.0 * 0.5 and C0[0, 2] == 2.0 * 0.5 and C0[1, 2] == 0.0
    assert np.all(np.diag(C0) == 0)
    assert st.load_LE.tolist() == [[2, 1, 1, 0], [0, 1, 2, 1]]


def test_top1_only_affinity_and_router_weights():
    st = compute_stats(_trace(), StatsOptions(slot_decay=0.0, coact_weight=1.0))
    assert st.affinity_LEE[0][0, 2] == 2.0 and st.affinity_LEE[0].sum() == 2.0
    assert st.coact_LEE.sum() == 0.0   # every co-activated pair involves slot 1, weight 0
    wst = compute_stats(_trace(), StatsOptions(slot_decay=1.0, coact_weight=0.0, weighted=True))
    assert wst.affinity_LEE[0][0, 2] == pytest.approx(2 * 0.75 * 0.75)


def test_objective_counts_colocated_pairs_and_bound_holds():
    st = compute_stats(_trace(), StatsOptions(slot_decay=1.0, coact_weight=1.0))
    cluster = ClusterShape(gpus_per_node=2)
    p = np.array([[0, 0, 1, 1], [0, 1, 0, 1]])
    # inter (0,0)-(0,0): pairs (0,2) 2, (1,2) 1, (0,0)? none; GPU0 at l: {0,1}, at l+1: {0,2}: A[0,0]+A[0,2]+A[1,0]+A[1,2]
    A = st.affinity_LEE[0]
    inter = A[0, 0] + A[0, 2] + A[1, 0] + A[1, 2] + A[2, 1] + A[2, 3] + A[3, 1] + A[3, 3]
    intra = st.coact_LEE[0][0, 1] + st.coact_LEE[0][2, 3] + st.coact_LEE[1][0, 2] + st.coact_LEE[1][1, 3]
    assert objective(st, p, cluster) == pytest.approx(inter + intra)
    assert objective_upper_bound(st, cluster) >= objective(st, p, cluster)


def test_saving_matrix_on_two_nodes():
    s = saving_GG(ClusterShape(nodes=2, gpus_per_node=2, intra_node_cost=1.0, inter_node_cost=4.0))
    assert s.tolist() == [[1, 0.75, 0, 0], [0.75, 1, 0, 0], [0, 0, 1, 0.75], [0, 0, 0.75, 1]]


def test_bad_stats_options():
    with pytest.raises(InputError, match="slot_decay must be in"):
        StatsOptions(slot_decay=2.0)
    with pytest.raises(InputError, match="coact_weight must be a finite number"):
        StatsOptions(coact_weight=float("nan"))


def test_shrink_toward_the_product_of_marginals_by_hand():
    from placement.stats import shrink_pairs

    W = np.array([[3.0, 1.0], [0.0, 4.0]])          # rows 4, 4; columns 3, 5; total 8
    target = np.array([[4 * 3, 4 * 5], [4 * 3, 4 * 5]]) / 8.0
    assert np.allclose(shrink_pairs(W, 0.25), 0.75 * W + 0.25 * target)
    assert np.allclose(shrink_pairs(W, 1.0), target) and np.array_equal(shrink_pairs(W, 0.0), W)
    shrunk = shrink_pairs(W, 0.5)
    assert np.allclose(shrunk.sum(1), W.sum(1)) and np.allclose(shrunk.sum(0), W.sum(0))
    C = np.array([[0.0, 2.0, 0.0], [2.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    Cs = shrink_pairs(C, 0.5, symmetric=True)
    assert np.allclose(Cs, Cs.T) and np.all(np.diag(Cs) == 0) and Cs.sum() == pytest.approx(C.sum())
    assert Cs[0, 2] > 0                                # a pair never seen gets some weight


def test_compute_stats_applies_shrink_and_records_it():
    plain = compute_stats(_trace(), StatsOptions())
    st = compute_stats(_trace(), StatsOptions(shrink=0.5))
    A = plain.affinity_LEE[0]
    assert np.allclose(st.affinity_LEE[0], 0.5 * A + 0.5 * np.outer(A.sum(1), A.sum(0)) / A.sum())
    assert st.affinity_LEE.sum() == pytest.approx(plain.affinity_LEE.sum())
    assert st.coact_LEE.sum() == pytest.approx(plain.coact_LEE.sum())
    assert np.array_equal(st.load_LE, plain.load_LE)
    assert st.options.to_dict()["shrink"] == 0.5
    with pytest.raises(InputError, match="shrink must be a number in"):
        StatsOptions(shrink=1.5)

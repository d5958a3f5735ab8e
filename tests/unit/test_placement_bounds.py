"""Every solver's upper bound against optima computed here by brute force (every balanced assignment).

On tiny instances: value <= brute-force optimum <= bound for every solver, value == optimum for the exact one
(ilp with time to spare), and a solver whose bound is below its value makes solve() raise.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from placement import ClusterShape
from placement.solvers import BoundError, SolveOptions, SolverKind, SolverResult, solve
from placement.stats import StatsOptions, compute_stats
from placement.synthetic import SyntheticSpec, synthetic_trace


def _stats(layers: int, experts: int, top_k: int = 2, seed: int = 3, **stats_options):
    spec = SyntheticSpec(num_tokens=400, num_layers=layers, num_experts=experts, top_k=top_k, num_clusters=2,
                         noise=0.5, seed=seed)
    return compute_stats(synthetic_trace(spec), StatsOptions(**stats_options))


def _brute_force_optimum(st, cluster: ClusterShape) -> float:
    """max over every balanced assignment (E/G experts per GPU in each layer) of the objective, written out
    independently of stats.objective: pair weight x saving (1 same GPU, 1 - alpha same node, 0 otherwise)."""
    L, E = st.load_LE.shape
    G, M = cluster.num_gpus, E // cluster.num_gpus
    rows = np.array(sorted(set(itertools.permutations(np.repeat(np.arange(G), M)))))     # [R, E]
    alpha = 1.0 if cluster.nodes == 1 else min(cluster.intra_node_cost / cluster.inter_node_cost, 1.0)
    node_RE = rows // cluster.gpus_per_node

    def saving(a_RE, b_RE, na_RE, nb_RE):     # [R, R, E, E] saving of (expert i in row a, expert j in row b)
        same_gpu = a_RE[:, None, :, None] == b_RE[None, :, None, :]
        same_node = na_RE[:, None, :, None] == nb_RE[None, :, None, :]
        return alpha * same_gpu + (1.0 - alpha) * same_node

    S_RREE = saving(rows, rows, node_RE, node_RE)
    inter_RR = [np.einsum("abij,ij->ab", S_RREE, A) for A in st.affinity_LEE]                  # row at l, row at l+1
    diag = np.arange(len(rows))
    intra_R = [0.5 * np.einsum("aij,ij->a", S_RREE[diag, diag], C) for C in st.coact_LEE]
    best_R = intra_R[0]                    # dynamic programming over layers = every combination of rows
    for l in range(L - 1):
        best_R = (best_R[:, None] + inter_RR[l]).max(axis=0) + intra_R[l + 1]
    return float(best_R.max())


INSTANCES = [
    # (layers, experts, top_k, nodes, gpus_per_node, stats options)
    (2, 4, 2, 1, 2, {}),
    (3, 6, 2, 1, 2, {}),
    (3, 4, 2, 1, 2, {"slot_decay": 1.0, "coact_weight": 2.0}),
    (3, 6, 3, 1, 3, {}),
    (3, 4, 2, 2, 2, {}),
    (3, 4, 3, 2, 2, {"coact_weight": 1.0}),
]


@pytest.mark.parametrize("layers,experts,top_k,nodes,per,opts", INSTANCES)
def test_every_bound_is_at_least_the_brute_force_optimum(layers, experts, top_k, nodes, per, opts):
    st = _stats(layers, experts, top_k, **opts)
    cluster = ClusterShape(nodes=nodes, gpus_per_node=per)
    optimum = _brute_force_optimum(st, cluster)
    assert optimum > 0
    for kind in SolverKind:
        p = solve(st, cluster, SolveOptions(solver=kind, time_limit=20, restarts=2, rounds=20))
        value, bound = p.objective["value"], p.objective["upper_bound"]
        assert value <= optimum + 1e-9 * optimum, kind
        assert bound >= optimum - 1e-9 * optimum, (kind, bound, optimum)
        assert p.objective["gap"] == pytest.approx((bound - value) / bound)


def _set_partitioning_lp(st, G: int) -> float:
    """The LP relaxation ilp's Lagrangian dual converges to, with EVERY column (one M-subset per layer) written
    out: max sum v(c) x_c, each (layer, expert) covered once, 0 <= x <= 1. Its value can exceed the optimum
    (an integrality gap), which only branching would close."""
    from scipy.optimize import linprog

    L, E = st.load_LE.shape
    M = E // G
    subsets = list(itertools.combinations(range(E), M))
    cols = list(itertools.product(range(len(subsets)), repeat=L))
    value, cover = np.zeros(len(cols)), np.zeros((L * E, len(cols)))
    for k, col in enumerate(cols):
        for l, s in enumerate(col):
            idx = np.array(subsets[s])
            cover[l * E + idx, k] = 1.0
            value[k] += 0.5 * st.coact_LEE[l][np.ix_(idx, idx)].sum()
            if l + 1 < L:
                value[k] += st.affinity_LEE[l][np.ix_(idx, np.array(subsets[col[l + 1]]))].sum()
    res = linprog(-value, A_eq=cover, b_eq=np.ones(L * E), bounds=(0, 1), method="highs")
    assert res.status == 0
    return float(-res.fun)


@pytest.mark.parametrize("layers,experts,top_k,nodes,per,opts",
                         [inst for inst in INSTANCES if inst[3] == 1])
def test_ilp_reaches_the_brute_force_optimum_and_its_bound_is_the_lp_bound(layers, experts, top_k, nodes, per,
                                                                           opts):
    st = _stats(layers, experts, top_k, **opts)
    cluster = ClusterShape(nodes=nodes, gpus_per_node=per)
    optimum = _brute_force_optimum(st, cluster)
    lp = _set_partitioning_lp(st, per)
    p = solve(st, cluster, SolveOptions(solver=SolverKind.ILP, time_limit=20))
    assert p.objective["value"] == pytest.approx(optimum, rel=1e-12)
    assert optimum <= lp * (1 + 1e-12)
    assert lp * (1 - 1e-9) <= p.objective["upper_bound"] <= lp * (1 + 1e-4)
    # "optimal" exactly when the LP has no integrality gap (3 layers x 6 experts x 3 GPUs has one: 1106.94 vs
    # the optimum 1105.69, and ilp says "gap" there rather than claim a proof it lacks)
    lp_is_tight = lp <= optimum * (1 + 1e-4)
    assert (p.solver["status"] == "optimal") == lp_is_tight, (lp, optimum)


def test_local_is_exact_on_the_tiniest_instances():
    for layers, experts, top_k, nodes, per, opts in INSTANCES[:3]:
        st = _stats(layers, experts, top_k, **opts)
        cluster = ClusterShape(nodes=nodes, gpus_per_node=per)
        p = solve(st, cluster, SolveOptions(solver=SolverKind.LOCAL, restarts=4, rounds=50))
        assert p.objective["value"] == pytest.approx(_brute_force_optimum(st, cluster), rel=1e-12)


def test_a_bound_below_the_value_raises(monkeypatch):
    from placement.solvers import baseline

    st = _stats(2, 4)
    cluster = ClusterShape(gpus_per_node=2)
    honest = solve(st, cluster, SolveOptions(solver=SolverKind.CONTIGUOUS)).objective["value"]
    assert honest > 0

    def wrong(stats, cluster, options):
        return SolverResult(np.tile(np.arange(4) // 2, (2, 1)), upper_bound=0.5 * honest)

    monkeypatch.setattr(baseline, "solve_contiguous", wrong)
    with pytest.raises(BoundError, match=r"solver contiguous reported upper bound .* below its objective"):
        solve(st, cluster, SolveOptions(solver=SolverKind.CONTIGUOUS))
    monkeypatch.setattr(baseline, "solve_contiguous",
                        lambda s, c, o: SolverResult(np.tile(np.arange(4) // 2, (2, 1)), upper_bound=float("nan")))
    with pytest.raises(BoundError, match="solver contiguous reported upper bound nan"):
        solve(st, cluster, SolveOptions(solver=SolverKind.CONTIGUOUS))


def test_the_brute_force_itself_on_a_hand_instance():
    """2 layers, 4 experts, 2 GPUs: only (0 -> 1) and (2 -> 3) carry weight, 5 and 3; the best placement
    co-locates both pairs (value 8); a single pair is worth its own weight."""
    from placement.stats import TraceStats

    A = np.zeros((1, 4, 4))
    A[0, 0, 1], A[0, 2, 3] = 5.0, 3.0
    st = TraceStats(A, np.zeros((2, 4, 4)), np.ones((2, 4)), 8, 1, StatsOptions())
    assert _brute_force_optimum(st, ClusterShape(gpus_per_node=2)) == 8.0
    assert _brute_force_optimum(st, ClusterShape(gpus_per_node=4)) == 8.0
